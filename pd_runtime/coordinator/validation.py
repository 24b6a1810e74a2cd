"""Light checks of a generation request body, before it is scheduled.

Only the shape of the fields the coordinator reads or that could make a worker fail badly are
checked (types, presence, the range of ``max_tokens``): no tokenization, no defaults filled in.
vLLM stays the authority on everything else (sampling parameters, context length, chat
templates), and the body is forwarded byte for byte, so a request that passes here is exactly the
one vLLM sees. Each failure is a ``BadRequestError`` with ``param`` naming the field.
"""

from __future__ import annotations

from typing import Any

from pd_runtime.errors import BadRequestError, NotFoundError

__all__ = ["validate_generation_body"]

CHAT_PATH = "/v1/chat/completions"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) for t in value)


def _check_prompt(prompt: Any) -> None:
    """``prompt`` as vLLM takes it: a string, a list of strings, token ids, or lists of those."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and (
        all(isinstance(p, str) for p in prompt)
        or _is_token_ids(prompt)
        or all(_is_token_ids(p) for p in prompt)
    ):
        return
    raise BadRequestError(
        "'prompt' must be a string, a list of strings, a list of token ids (integers) or a list "
        "of lists of token ids",
        param="prompt",
    )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequestError(
                f"'messages[{i}]' must be an object with a string 'role'", param="messages"
            )


def validate_generation_body(
    route: str, body: dict[str, Any], *, models: list[str], max_tokens_limit: int
) -> str:
    """Check ``body`` for ``route``; return the model name. Raises 400s, or 404 for a model not
    served here."""
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequestError("'model' is required and must be a string", param="model")
    if model not in models:
        raise NotFoundError(
            f"The model `{model}` does not exist. Models served here: {', '.join(models)}",
            param="model",
        )

    if route == CHAT_PATH:
        if "messages" not in body:
            raise BadRequestError("'messages' is required", param="messages")
        _check_messages(body["messages"])
    else:
        prompt = body.get("prompt")
        if prompt is None and body.get("prompt_embeds") is None:
            raise BadRequestError("'prompt' is required", param="prompt")
        if prompt is not None:
            _check_prompt(prompt)

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequestError("'stream' must be a boolean", param="stream")

    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise BadRequestError(f"'{name}' must be an integer", param=name)
        if value < 0:
            raise BadRequestError(f"'{name}' must not be negative, got {value}", param=name)
        if value > max_tokens_limit:
            raise BadRequestError(
                f"'{name}' of {value} is over this server's limit of {max_tokens_limit}",
                param=name,
            )
    return model

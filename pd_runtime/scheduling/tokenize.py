"""Turn an OpenAI request into the token ids the engine will see, with the model's own tokenizer.

Precise prefix matching needs the exact tokens: for ``/v1/completions`` the prompt (a string,
tokenized with special tokens as vLLM does by default, or already a list of token ids); for
``/v1/chat/completions`` the messages rendered through the model's chat template with vLLM's
defaults (``add_generation_prompt`` true, no extra special tokens). Anything else (batched
prompts, multimodal parts) yields None: the request is routed on load alone.

Loading ``transformers`` and the tokenizer takes seconds, so it happens once in ``load`` (the
scheduler awaits it in a thread at start-up). Tokenizing runs on a single dedicated thread: it
keeps CPU work off the event loop, and Hugging Face fast tokenizers are not safe to share between
threads that encode at the same time.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["PromptTokenizer", "chat_messages"]


def chat_messages(messages: Any) -> list[dict[str, Any]] | None:
    """Messages with text-part lists flattened to strings (as vLLM does for string-content
    templates); None when a message carries anything but text."""
    if not isinstance(messages, list) or not messages:
        return None
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    return None
                texts.append(str(part.get("text", "")))
            message = {**message, "content": "\n".join(texts)}
        elif content is not None and not isinstance(content, str):
            return None
        out.append(message)
    return out


class PromptTokenizer:
    def __init__(self, name_or_path: str) -> None:
        self.name_or_path = name_or_path
        self._tokenizer: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None

    def load(self) -> None:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)

    async def aload(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    async def atokenize(self, path: str, body: dict[str, Any]) -> list[int] | None:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.tokenize, path, body
        )

    def tokenize(self, path: str, body: dict[str, Any]) -> list[int] | None:
        if self._tokenizer is None:
            return None
        if path.endswith("/chat/completions"):
            return self._chat(body)
        return self._completion(body)

    def _completion(self, body: dict[str, Any]) -> list[int] | None:
        prompt = body.get("prompt")
        # A batch of one prompt (["text"] or [[ids]]), but not a one-token prompt ([id]).
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            add_special = body.get("add_special_tokens", True)
            return list(self._tokenizer.encode(prompt, add_special_tokens=bool(add_special)))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return None

    def _chat(self, body: dict[str, Any]) -> list[int] | None:
        messages = chat_messages(body.get("messages"))
        if messages is None:
            return None
        kwargs = body.get("chat_template_kwargs")
        try:
            text = self._tokenizer.apply_chat_template(
                messages,
                tools=body.get("tools"),
                tokenize=False,
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=bool(body.get("continue_final_message", False)),
                **(kwargs if isinstance(kwargs, dict) else {}),
            )
        except Exception:  # a template that rejects these messages: vLLM will say why
            return None
        add_special = bool(body.get("add_special_tokens", False))
        return list(self._tokenizer.encode(text, add_special_tokens=add_special))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

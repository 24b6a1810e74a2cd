"""The generated model is deterministic, idempotent and shaped as its config says.

Why these checks: every end-to-end test compares greedy outputs token for token, which is only
meaningful if the same seed always yields the same bytes, and a cached model directory is only safe
to reuse if a complete one is recognised and an incomplete one is not. No vLLM here: seconds only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
import tokenizers  # noqa: F401
import torch  # noqa: F401
from safetensors import safe_open

from pd_runtime.model.tiny import (
    MARKER_FILE,
    MODEL_SIZES,
    _tokenizer_json,
    describe,
    is_complete,
    write_model,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny") / "model", "tiny", seed=0)


def test_same_seed_same_bytes(tiny: Path, tmp_path: Path) -> None:
    _tokenizer_json.cache_clear()  # retrain: BPE training itself must be deterministic
    again = write_model(tmp_path / "again", "tiny", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name


def test_other_seed_other_weights_same_tokenizer(tiny: Path, tmp_path: Path) -> None:
    other = write_model(tmp_path / "other", "tiny", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    # Prompts must mean the same ids whatever the weight seed.
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_second_call_does_not_rewrite(tiny: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}
    assert write_model(tiny, "tiny", seed=0) == tiny
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == before


def test_incomplete_directory_is_not_taken_as_done(tiny: Path, tmp_path: Path) -> None:
    # What an interrupted copy or a hand-edited directory looks like: marker present, a file missing.
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "model.safetensors").unlink()
    assert is_complete(tiny, "tiny", 0)
    assert not is_complete(broken, "tiny", 0)
    assert not is_complete(tiny, "tiny", 1)
    with pytest.raises(FileExistsError):
        write_model(broken, "tiny", seed=0)


def test_foreign_directory_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "stray.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        write_model(target, "tiny")
    write_model(target, "tiny", overwrite=True)
    assert not (target / "stray.txt").exists()
    assert json.loads((target / MARKER_FILE).read_text())["seed"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_unknown_size_names_valid_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        write_model(tmp_path / "x", "enormous")
    for name in MODEL_SIZES:
        assert name in str(err.value)
    assert not (tmp_path / "x").exists()


def test_tensor_shapes_match_config(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    tok = json.loads((tiny / "tokenizer.json").read_text())
    tok_vocab = len(tok["model"]["vocab"])
    assert cfg["vocab_size"] >= tok_vocab and cfg["vocab_size"] % 64 == 0
    h, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    expected = {"model.embed_tokens.weight": [cfg["vocab_size"], h], "model.norm.weight": [h]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": [q, h],
            p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h],
            p + "self_attn.o_proj.weight": [h, q],
            p + "self_attn.q_norm.weight": [hd],
            p + "self_attn.k_norm.weight": [hd],
            p + "mlp.gate_proj.weight": [inter, h],
            p + "mlp.up_proj.weight": [inter, h],
            p + "mlp.down_proj.weight": [h, inter],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        assert str(f.get_tensor("model.norm.weight").dtype) == "torch.bfloat16"
        # The q/k gain is what makes greedy output depend on the prompt (see ModelSize).
        q_norm = f.get_tensor("model.layers.0.self_attn.q_norm.weight").float()
        assert q_norm.eq(MODEL_SIZES["tiny"].qk_norm_gain).all()
        assert f.get_tensor("model.norm.weight").float().eq(1.0).all()
    assert got == expected
    info = describe(tiny)
    assert (info["size"], info["seed"]) == ("tiny", 0)
    assert info["num_parameters"] == sum(_prod(s) for s in expected.values())


def test_tokenizer_round_trip_and_chat_template(tiny: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    text = "The river ran quietly past the old mill. Zürich 2026 ✓\n  indented"
    assert tok.decode(tok.encode(text).ids) == text
    special = tok.encode("<|im_start|>user").ids
    assert special[0] == tok.token_to_id("<|im_start|>")

    template = json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    rendered = jinja2.Template(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = jinja2.Template(template).render(messages=messages[:2], add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

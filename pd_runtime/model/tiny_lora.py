"""A deterministic LoRA adapter for a generated tiny model, written without peft.

vLLM loads a LoRA adapter from a directory holding ``adapter_config.json`` (peft's format) and
``adapter_model.safetensors`` (peft's tensor names)::

    out_dir/
      adapter_config.json          peft_type LORA, r, lora_alpha, target_modules
      adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.{q,v}_proj
                                   .lora_A.weight (r, in) / .lora_B.weight (out, r)

Both A and B are seeded random (peft initialises B to zeros, which would make the adapter a no-op):
the adapter's greedy output then differs from the base model's, which is what routing tests need
to tell an adapter request from a base one. Like :mod:`pd_runtime.model.tiny`, the text is
gibberish but deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

from pd_runtime.model.tiny import MODEL_SIZES

__all__ = ["write_lora"]

_TARGETS = ("q_proj", "v_proj")


def write_lora(out_dir: str | Path, size: str = "tiny", rank: int = 8, seed: int = 1) -> Path:
    """Write a rank-``rank`` LoRA adapter for a generated model of ``size``; idempotent for the
    same arguments (a marker in ``adapter_config.json``)."""
    import torch
    from safetensors.torch import save_file

    shape = MODEL_SIZES[size]
    out = Path(out_dir).resolve()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(_TARGETS),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "pd_runtime_lora": {"size": size, "rank": rank, "seed": seed},
    }
    config_path = out / "adapter_config.json"
    if config_path.exists() and json.loads(config_path.read_text()) == config:
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    h, hd = shape.hidden_size, shape.head_dim
    outs = {"q_proj": shape.num_heads * hd, "v_proj": shape.num_kv_heads * hd}
    tensors: dict[str, torch.Tensor] = {}
    for i in range(shape.num_layers):
        for target in _TARGETS:
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            a = torch.empty((rank, h)).normal_(0.0, 0.2, generator=gen)
            b = torch.empty((outs[target], rank)).normal_(0.0, 0.2, generator=gen)
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2))
    return out

"""Random-weight checkpoints of real architectures, for benchmarks and tests.

Speed and memory do not depend on the weights' values, so a real model's config
with random weights measures what the real model would, without downloading it.
The checkpoint is written one shard at a time, never holding the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def write_random_checkpoint(folder: str | Path, config, *, shard_bytes: int | None = 2 * 2**30,
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            tokenizer_from: str | Path | None = None) -> Path:
    """Write normal(0, 0.02) weights (norms = 1) for `config` as safetensors shards.

    Tensors are grouped into shards of at most `shard_bytes` (one file when None or
    when everything fits), with a `model.safetensors.index.json` for several.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    groups = _shard_groups(shapes, shard_bytes, torch.finfo(dtype).bits // 8)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = {name: _random_tensor(name, shapes[name], dtype, gen) for name in group}
        file = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    if len(groups) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def _shard_groups(shapes: dict[str, tuple], shard_bytes: int | None, itemsize: int) -> list[list[str]]:
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shard_bytes and current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return groups + [current] if current else groups


def _random_tensor(name: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=gen).mul_(0.02).to(dtype)

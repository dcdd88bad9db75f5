"""ShardWriter: tensors streamed to disk as they arrive, read back by safetensors and transformers' index rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qlora_kit.checkpoint_writer import ShardWriter
from qlora_kit.errors import QLoRAKitError

TENSORS = {
    "embed.weight": torch.randn(4, 6, dtype=torch.bfloat16),
    "layer.0.weight": torch.randn(6, 6, dtype=torch.float16),
    "layer.0.bias": torch.randn(6),
    "scale": torch.tensor(2.5, dtype=torch.float64),
    "ids": torch.arange(5),
    "mask": torch.tensor([True, False, True]),
    "transposed": torch.randn(3, 4).t(),  # not contiguous
}


def read_all(folder) -> dict:
    out = {}
    for path in folder.glob("*.safetensors"):
        out.update(load_file(path))
    return out


def test_one_shard_reads_back_exactly_with_safetensors(tmp_path):
    writer = ShardWriter(tmp_path, 10**6)
    for name, tensor in TENSORS.items():
        writer.add(name, tensor)
    assert writer.finish() == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no body file left
    got = read_all(tmp_path)
    assert set(got) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers checks this key


def test_shards_split_at_the_limit_and_the_index_maps_every_tensor(tmp_path):
    writer = ShardWriter(tmp_path, 100)  # the 6x6 fp16 weight (72 bytes) and embed (48) cannot share a shard
    for name, tensor in TENSORS.items():
        writer.add(name, tensor)
    names = writer.finish()
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TENSORS) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    for shard in shards:
        assert (tmp_path / shard).stat().st_size <= 100 + 8 + 1024  # data within the limit, plus header
        with safe_open(tmp_path / shard, "pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())
    got = read_all(tmp_path)
    assert all(torch.equal(got[k], v) for k, v in TENSORS.items())


def test_a_dtype_safetensors_cannot_name_is_refused(tmp_path):
    with pytest.raises(QLoRAKitError, match="complex64 has no safetensors name"):
        ShardWriter(tmp_path, 100).add("z", torch.zeros(2, dtype=torch.complex64))


def test_a_shard_closes_before_its_header_outgrows_the_room_in_front(tmp_path):
    """Each header is written into room kept at the shard's start; many tensors mean more shards, never a bad file."""
    tensors = {f"model.layers.{i}.self_attn.q_proj.weight": torch.full((2, 3), float(i)) for i in range(40)}
    writer = ShardWriter(tmp_path, 10**6)  # data would fit one shard; 40 headers entries do not fit 1 KiB
    assert writer.header_reserve == 1024
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    shards = [n for n in writer.finish() if n.endswith(".safetensors")]
    assert len(shards) > 1
    got = read_all(tmp_path)
    assert set(got) == set(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())
    for shard in shards:
        raw = (tmp_path / shard).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert n == 1024 and raw[8:8 + n].rstrip(b" ").endswith(b"}")  # padded with spaces, data 8-byte aligned
        json.loads(raw[8:8 + n])


def test_a_name_too_long_for_any_header_is_refused(tmp_path):
    with pytest.raises(QLoRAKitError, match="would not fit a shard header"):
        ShardWriter(tmp_path, 100).add("x" * 2000, torch.zeros(1))

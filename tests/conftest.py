"""Shared fixtures: the real SmolLM2 model and tiny random checkpoints of real architectures."""

from __future__ import annotations

import os

import pytest
import torch

# Tests must never reach for the network (CI has none); the Hub path is the same code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.factories import tiny_llama_config, write_random_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def smollm2_dir():
    from qlora_kit.packaged import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama with SmolLM2's tokenizer, bf16 safetensors, one shard."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-llama"), tiny_llama_config(), tokenizer_from=smollm2_dir
    )


@pytest.fixture(scope="session")
def smollm2_4bit(smollm2_dir):
    """SmolLM2-135M-Instruct in NF4 (shared, read-only: tests must not wrap or train it)."""
    from qlora_kit import load_base

    return load_base(str(smollm2_dir))


@pytest.fixture(scope="session")
def fp32_base_and_adapter(tmp_path_factory, smollm2_dir):
    """A tiny random Llama saved in fp32 (so `original`-mode merges are exact) and a trained-looking adapter for it."""
    from tests.test_export import make_adapter

    root = tmp_path_factory.mktemp("fp32")
    base = write_random_checkpoint(root / "base", tiny_llama_config(), dtype=torch.float32, seed=3,
                                   tokenizer_from=smollm2_dir)
    return base, make_adapter(base, root / "adapter", seed=4)

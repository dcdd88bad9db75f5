"""The models the benchmark trains: where their weights come from.

- smollm2-135m: the real SmolLM2-135M-Instruct (packaged offline, `qlora_kit.packaged`).
- tiny-llama: a 2-layer random Llama with SmolLM2's vocabulary (seconds per step; smoke runs).
- llama-3.2-1b, llama-3.1-8b: the real architectures' config values with random weights,
  written shard by shard to a scratch folder (never the whole model in RAM). Random weights
  train at exactly the speed and memory of real ones; only the loss values are meaningless.

Every model uses SmolLM2's tokenizer (the only one available offline); its ids are below
every vocabulary here, and the Llama-3 configs keep their 128,256-row embedding and head, so
the LM-head cost is that of the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

# Values from the models' published config.json files (meta-llama/Llama-3.2-1B, Llama-3.1-8B).
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
CONFIGS = {
    "tiny-llama": dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=128001, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0},
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, rope_parameters={**_LLAMA3_ROPE, "factor": 8.0},
    ),
}
REAL = {"smollm2-135m"}
MODELS = sorted(REAL | set(CONFIGS))


def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIGS[name])


def model_folder(name: str, scratch: Path) -> Path:
    """A local HF folder (config, safetensors, tokenizer) for `name`, written under `scratch` if random."""
    from qlora_kit.packaged import smollm2_path
    from benchmarks.synthetic import write_random_checkpoint

    if name == "smollm2-135m":
        return smollm2_path()
    if name not in CONFIGS:
        raise SystemExit(f"unknown model '{name}'; choose from {', '.join(MODELS)}")
    folder = scratch / name
    if (folder / "config.json").is_file() and (folder / "DONE").is_file():
        return folder
    write_random_checkpoint(folder, llama_config(name), tokenizer_from=smollm2_path())
    (folder / "DONE").write_text("ok\n")
    return folder


def count_parameters(folder: Path) -> int:
    """N for model FLOPs: every base parameter (tied embeddings once), from the config alone."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in skeleton.parameters())

"""Real checkpoints for tests: tiny random configs of real architectures, written as safetensors."""

from __future__ import annotations

from transformers import LlamaConfig

from benchmarks.synthetic import write_random_checkpoint  # noqa: F401  (re-exported for tests)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A Llama with SmolLM2's tokenizer vocabulary, small enough to train in seconds."""
    settings = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def rewrite_adapter_weights(folder, tensors: dict) -> None:
    """Replace an adapter's weights as if it had been saved with them: its manifest's checksums follow."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from qlora_kit import integrity

    folder = Path(folder)
    save_file(tensors, folder / "adapter_model.safetensors")
    manifest_path = folder / "qlora_kit.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = integrity.record_files(folder, ["adapter_model.safetensors", "adapter_config.json"])
    manifest_path.write_text(json.dumps(manifest))

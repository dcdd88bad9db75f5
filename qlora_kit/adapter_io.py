"""Adapters on disk in PEFT's format, plus our manifest of what PEFT's format leaves out.

An adapter folder holds:
  adapter_config.json         PEFT's LoraConfig (vLLM, TGI and PEFT read it)
  adapter_model.safetensors   keys `base_model.model.<module>.lora_{A,B}.weight`
  qlora_kit.json              our manifest: quantization of the base, base fingerprint, versions
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, quantization
from .errors import QLoRAKitError
from .lora import LoRAConfig, apply_lora, lora_layers, lora_state_dict

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "qlora_kit.json"
PEFT_PREFIX = "base_model.model."
MANIFEST_VERSION = 1
RUN_ADAPTER_DIR = "adapter"  # where a training run folder keeps its final adapter


def save_adapter(model: nn.Module, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the model's adapters as a PEFT-format folder, atomically.

    The folder is assembled beside its target and renamed into place, so a crash
    never leaves a half-written adapter where a good one was. `extra` is merged
    into the manifest (e.g. the training step).
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise QLoRAKitError("the model has no LoRA adapters to save; call apply_lora first")
    cfg: LoRAConfig = model.qlora_kit_lora
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, peft_config(model, cfg, list(layers)))
        _write_json(tmp / MANIFEST_FILE, manifest(model, cfg, list(layers), extra))
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_adapter(path: str | os.PathLike) -> Path:
    """The adapter folder itself, or `<run>/adapter` for a training run folder."""
    path = Path(path).expanduser()
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / RUN_ADAPTER_DIR / CONFIG_FILE).is_file():
        return path / RUN_ADAPTER_DIR
    if not path.exists():
        raise QLoRAKitError(f"adapter or run folder not found: {path}")
    raise QLoRAKitError(
        f"{path} is neither an adapter folder ({CONFIG_FILE}) nor a run folder with {RUN_ADAPTER_DIR}/{CONFIG_FILE}"
    )


def replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, replacing any old one with at most a rename's gap.

    The old folder is moved aside first and deleted only after the new one is in
    place; if the process dies between the two renames, the old one survives
    beside the target as `.<name>.old-*`.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def peft_config(model: nn.Module, cfg: LoRAConfig, names: list[str]) -> dict:
    """PEFT's `adapter_config.json` for exactly the wrapped layers."""
    base = getattr(model, "qlora_kit_base", None)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.source if base else None,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model, names),
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """Leaf names when they pick out exactly the wrapped layers, else an exact-match regex.

    PEFT matches a list by name suffix and a string as a full-name regex; the list
    form is what most serving stacks expect, so prefer it whenever it is exact.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    would_match = {
        n for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in leaves and not n.endswith((".base", ".lora_A", ".lora_B"))
    }
    if would_match == set(names):
        return leaves
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def manifest(model: nn.Module, cfg: LoRAConfig, names: list[str], extra: dict | None) -> dict:
    base = getattr(model, "qlora_kit_base", None)
    data = {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": {
            "source": base.source if base else None,
            "folder": base.folder if base else None,
            "fingerprint": base.fingerprint if base else None,
            "model_type": base.model_type if base else None,
        },
        "quantization": base.quant if base else None,
        "lora": {
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora,
            "dtype": str(next(iter(dict(lora_layers(model)).values())).lora_A.weight.dtype).removeprefix("torch."),
            "modules": names,
        },
        "versions": versions(),
    }
    data.update(extra or {})
    return data


def versions() -> dict:
    return {
        "qlora_kit": __version__,
        "torch": torch.__version__,
        "bitsandbytes": quantization.bitsandbytes_version(),
        "transformers": transformers.__version__,
    }


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(PEFT config, weights keyed by module name, our manifest or None) of an adapter folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QLoRAKitError(f"adapter folder not found: {folder}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            hint = " (pickled adapter_model.bin files are not loaded; resave with safetensors)" if (
                name == WEIGHTS_FILE and (folder / "adapter_model.bin").exists()) else ""
            raise QLoRAKitError(f"{folder} is not an adapter folder: {name} is missing{hint}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise QLoRAKitError(f"{folder / CONFIG_FILE} is not valid JSON ({exc})") from exc
    try:
        raw = load_file(folder / WEIGHTS_FILE)
    except SafetensorError as exc:
        raise QLoRAKitError(f"{folder / WEIGHTS_FILE} is corrupt ({exc})") from exc
    manifest_path = folder / MANIFEST_FILE
    return config, _module_keys(raw, folder), json.loads(manifest_path.read_text()) if manifest_path.is_file() else None


def _module_keys(raw: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """Strip PEFT's prefix and adapter name: `base_model.model.x.lora_A[.default].weight` -> `x.lora_A.weight`."""
    weights = {}
    for key, value in raw.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise QLoRAKitError(
                f"{folder / WEIGHTS_FILE} holds '{key}', which is not a LoRA A/B weight; "
                "only plain LoRA adapters (no DoRA, biases or modules_to_save) are supported"
            )
        weights[f"{match.group(1)}.{match.group(2)}.weight"] = value
    return weights


def lora_config_from_peft(config: dict, folder: Path) -> LoRAConfig:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')}, only LORA is supported")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-layer rank_pattern/alpha_pattern is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} is not supported")
    if problems:
        raise QLoRAKitError(f"cannot load adapter {folder}: " + "; ".join(problems))
    return LoRAConfig(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout", 0.0)),
        use_rslora=bool(config.get("use_rslora", False)),
    )


def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy an adapter's weights into a model that already has exactly those LoRA layers."""
    folder = Path(folder)
    _, weights, _ = read_adapter(folder)
    layers = dict(lora_layers(model))
    expected = {f"{name}.{part}.weight" for name in layers for part in ("lora_A", "lora_B")}
    if set(weights) != expected:
        raise QLoRAKitError(
            f"adapter {folder} does not match the model's LoRA layers "
            f"({len(weights)} tensors saved, {len(expected)} expected); was the config changed?"
        )
    _copy_weights(layers, weights, folder)


def _copy_weights(layers: dict, weights: dict[str, torch.Tensor], folder: Path) -> None:
    for key, value in weights.items():
        module_name, part, _ = key.rsplit(".", 2)
        param = getattr(layers[module_name], part).weight
        if tuple(param.shape) != tuple(value.shape):
            raise QLoRAKitError(
                f"adapter {folder}: {key} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}; "
                "the adapter was trained on a base of another size"
            )
        with torch.no_grad():
            param.copy_(value)


def load_adapter(model: nn.Module, folder: str | os.PathLike, *, strict_base: bool = True,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap `model`'s layers as the adapter in `folder` describes and load its weights.

    Works for adapters saved by qlora_kit or by PEFT. When our manifest is present,
    the base's fingerprint and quantization are compared with the loaded base: a
    different base raises (or only warns with `strict_base=False`), a different
    quantization warns.
    """
    folder = Path(folder)
    config, weights, manifest_data = read_adapter(folder)
    cfg = lora_config_from_peft(config, folder)
    if manifest_data is not None:
        check_base(model, manifest_data, folder, strict_base)
        cfg.dtype = manifest_data.get("lora", {}).get("dtype", cfg.dtype)
    if dtype is not None:
        cfg.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    names = sorted({k.rsplit(".", 2)[0] for k in weights})
    missing = [n for n in names if _get(model, n) is None]
    if missing:
        raise QLoRAKitError(
            f"adapter {folder} targets layer(s) this model lacks, e.g. {', '.join(missing[:3])}: "
            "it was trained on a different architecture"
        )
    apply_lora(model, cfg, targets=names)
    _copy_weights(dict(lora_layers(model)), weights, folder)
    return model


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_base(model: nn.Module, manifest_data: dict, folder: Path, strict: bool) -> None:
    """Compare the base an adapter was trained on with the loaded one."""
    base = getattr(model, "qlora_kit_base", None)
    if base is None:
        return
    trained_on = manifest_data.get("base", {}).get("fingerprint")
    if trained_on and trained_on != base.fingerprint:
        message = (
            f"adapter {folder} was trained on base '{manifest_data['base'].get('source')}' "
            f"(fingerprint {trained_on[:30]}...) but the loaded base '{base.source}' differs "
            f"({base.fingerprint[:30]}...). Load the base it was trained on"
        )
        if strict:
            raise QLoRAKitError(message + ", or pass strict_base=False / --force to use it anyway")
        warnings.warn(message, stacklevel=3)
    trained_quant = manifest_data.get("quantization") or {}
    # Compare only what both sides record: older manifests lack newer keys.
    diff = {k: (v, base.quant[k]) for k, v in trained_quant.items() if k in base.quant and v != base.quant[k]}
    if diff:
        warnings.warn(
            f"adapter {folder} was trained on a base quantized differently (trained, now): {diff}; "
            "outputs will differ from training",
            stacklevel=3,
        )

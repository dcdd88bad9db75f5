"""Adapters on disk in PEFT's format, plus our manifest of what PEFT's format leaves out.

An adapter folder holds:
  adapter_config.json         PEFT's LoraConfig (vLLM, TGI and PEFT read it)
  adapter_model.safetensors   keys `base_model.model.<module>.lora_{A,B}.weight`; a classifier's
                              head (PEFT's `modules_to_save`) as `base_model.model.<head>.<param>`
  qlora_kit.json              our manifest: quantization of the base, base fingerprint, versions,
                              and the size and SHA-256 of the two files above (`files`), checked on load

`AdapterRecord` reads a folder once (PEFT config, manifest, and the run config
when the adapter sits in a training run folder) and owns the rules that depend
on it: which base the adapter was trained on, and the one fingerprint check.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, atomic, classification, integrity, quantization
from .errors import QLoRAKitError
from .loading import BaseInfo
from .gguf_origin import gguf_origin
from .packaged import cache_dir
from .layers import stores_transposed
from .lora import (DEFAULT_ADAPTER, adapter_config, adapter_names, add_adapter, apply_lora, lora_layers,
                   lora_state_dict, wrapped_layers)
from .settings import LoRAConfig, ModelConfig, QuantConfig, RunConfig, load_recipe

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "qlora_kit.json"
PEFT_PREFIX = "base_model.model."
MANIFEST_VERSION = 1
RUN_ADAPTER_DIR = "adapter"  # where a training run folder keeps its final adapter
RUN_CONFIG_FILE = "config.yaml"  # a training run folder's resolved config


def save_adapter(model: nn.Module, folder: str | os.PathLike, *, base: BaseInfo | None = None,
                 extra: dict | None = None) -> Path:
    """Write the model's adapters as a PEFT-format folder, atomically.

    `base` is the `BaseInfo` that `load_base` returned: the manifest records it, so
    the adapter is later loaded on (and checked against) the same base. The folder
    is assembled beside its target and renamed into place, so a crash never
    leaves a half-written adapter where a good one was. `extra` is merged into
    the manifest (e.g. the training step).
    """
    cfg = adapter_config(model)
    names = [name for name, _ in lora_layers(model)]
    target = Path(folder)
    with atomic.staged_folder(target, overwrite=True) as tmp:
        state = {**lora_state_dict(model), **classification.head_state_dict(model)}
        tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        atomic.write_json(tmp / CONFIG_FILE, peft_config(model, cfg, names, base))
        files = integrity.record_files(tmp, [WEIGHTS_FILE, CONFIG_FILE])
        atomic.write_json(tmp / MANIFEST_FILE, manifest(model, cfg, names, base, extra, files=files))
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


def peft_config(model: nn.Module, cfg: LoRAConfig, names: list[str], base: BaseInfo | None) -> dict:
    """PEFT's `adapter_config.json` for exactly the wrapped layers."""
    heads = classification.head_names(model)
    return {
        "peft_type": "LORA",
        "task_type": classification.PEFT_TASK_TYPE if heads else "CAUSAL_LM",
        "base_model_name_or_path": loadable_base_name(base) if base else None,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model, names),
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        # PEFT marks adapters on Conv1D layers (GPT-2) so; A and B are shaped as for nn.Linear either way.
        "fan_in_fan_out": any(stores_transposed(model.get_submodule(n).base) for n in names),
        # A classifier's head, trained fully; PEFT saves it under its module name.
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": cfg.use_dora,
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


def loadable_base_name(base: BaseInfo) -> str:
    """What PEFT, vLLM and transformers can load the base from: a local folder or a Hub id.

    A GGUF file or the packaged model's name means nothing to them; the folder it
    was converted into does.
    """
    source = Path(base.source).expanduser()
    converted = Path(base.folder).resolve().is_relative_to(cache_dir().resolve())
    if source.exists() or converted:
        return str(source.resolve() if source.is_dir() else Path(base.folder).resolve())
    return base.source  # a Hub id


def manifest(model: nn.Module, cfg: LoRAConfig, names: list[str], base: BaseInfo | None,
             extra: dict | None, *, files: dict | None = None) -> dict:
    """Our `qlora_kit.json`: what PEFT's config leaves out (the base, its quantization, versions)."""
    data = {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": {
            "source": base.source if base else None,
            "folder": base.folder if base else None,
            "fingerprint": base.fingerprint if base else None,
            "model_type": base.model_type if base else None,
            # A base converted from GGUF: the file it came from and, where known, its Hub id.
            "gguf": gguf_origin(base.folder) if base else None,
        },
        "quantization": base.quant if base else None,
        "lora": {
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora,
            "dtype": str(next(lora_layers(model))[1].lora_A.weight.dtype).removeprefix("torch."),
            "modules": names,
        },
        "versions": versions(),
    }
    if classification.is_classifier(model):
        # PEFT's config records neither the task's classes nor their names: exports need both.
        data["task"] = {"type": classification.TASK, "labels": classification.labels_of(model.config),
                        "heads": classification.head_names(model)}
    if files is not None:
        data["files"] = files  # integrity records: checked before the files are read
    data.update(extra or {})
    return data


def versions() -> dict:
    """The versions of the libraries that decide what a saved adapter computes."""
    return {
        "qlora_kit": __version__,
        "torch": torch.__version__,
        "bitsandbytes": quantization.bitsandbytes_version(),
        "transformers": transformers.__version__,
    }


@dataclass
class AdapterRecord:
    """An adapter folder read once: PEFT's config, our manifest, and its run's config if it has one.

    Weights are read on demand (`weights()`): finding the base or checking it needs
    only the small JSON files.
    """

    folder: Path
    peft: dict  # adapter_config.json
    manifest: dict  # qlora_kit.json; empty for adapters made by PEFT itself
    run: RunConfig | None  # config.yaml of the training run the adapter belongs to

    @classmethod
    def read(cls, path: str | os.PathLike) -> "AdapterRecord":
        """Read an adapter folder, or the `adapter/` of a training run folder."""
        folder = find_adapter(path)
        if not (folder / WEIGHTS_FILE).is_file():
            hint = (" (pickled adapter_model.bin files are not loaded; resave with safetensors)"
                    if (folder / "adapter_model.bin").exists() else "")
            raise QLoRAKitError(f"{folder} is not an adapter folder: {WEIGHTS_FILE} is missing{hint}")
        manifest_data = _read_json(folder / MANIFEST_FILE) if (folder / MANIFEST_FILE).is_file() else {}
        if "files" in manifest_data:  # the weights are checked when read (`weights()`)
            integrity.check_files(folder, manifest_data["files"], recorded_in=folder / MANIFEST_FILE,
                                  fix=_DAMAGED_FIX, skip=(WEIGHTS_FILE,))
        peft = _read_json(folder / CONFIG_FILE)
        run_config = folder.parent / RUN_CONFIG_FILE
        run = load_recipe(run_config) if folder.name == RUN_ADAPTER_DIR and run_config.is_file() else None
        return cls(folder, peft, manifest_data, run)

    def weights(self) -> dict[str, torch.Tensor]:
        """The LoRA weights keyed `<module>.lora_A.weight` / `<module>.lora_B.weight`.

        Checked first against the size and SHA-256 the manifest recorded (adapters
        made by PEFT, or by qlora_kit before it recorded them, have none to check).
        """
        return self._read()[0]

    def head_weights(self) -> dict[str, torch.Tensor]:
        """A classifier's head (PEFT's `modules_to_save`) keyed by parameter name (`score.weight`); {} if none."""
        return self._read()[1]

    def _read(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if "files" in self.manifest:
            integrity.check_files(self.folder, self.manifest["files"], recorded_in=self.folder / MANIFEST_FILE,
                                  fix=_DAMAGED_FIX, only=[WEIGHTS_FILE])
        try:
            raw = load_file(self.folder / WEIGHTS_FILE)
        except SafetensorError as exc:
            raise QLoRAKitError(f"{self.folder / WEIGHTS_FILE} is corrupt ({exc})") from exc
        return _module_keys(raw, self.folder, self.peft.get("modules_to_save") or [])

    def task(self) -> tuple[str, list[str]]:
        """(model.task, class names) the adapter was trained for; names empty when only the base config knows them."""
        recorded = self.manifest.get("task") or {}
        if recorded.get("type") == classification.TASK or self.peft.get("task_type") == classification.PEFT_TASK_TYPE:
            return classification.TASK, list(recorded.get("labels") or [])
        return "causal_lm", []

    def lora_config(self) -> LoRAConfig:
        """The adapter's shape from PEFT's config; the weights' dtype from our manifest."""
        cfg = lora_config_from_peft(self.peft, self.folder)
        return replace(cfg, dtype=(self.manifest.get("lora") or {}).get("dtype", cfg.dtype))

    def quant_config(self) -> QuantConfig:
        """How the base was quantized in training: the run's settings, else the manifest's record."""
        if self.run is not None:
            return self.run.quant
        return quantization.quant_config_from_record(self.manifest.get("quantization"))

    def base_model(self, base: str | None = None) -> ModelConfig:
        """The base to load the adapter on: `base` if given, else the one it was trained on.

        The run's model section keeps its loading settings (attention kernel,
        remote code); the manifest's resolved folder is preferred while it still
        exists, so a run trained from a relative path or a Hub id loads offline.
        """
        recorded = self.manifest.get("base") or {}
        folder = recorded.get("folder")
        trained_on = folder if folder and Path(folder).is_dir() else None
        if self.run is not None:
            trained_on = trained_on or self.run.model.base
        trained_on = trained_on or recorded.get("source") or self.peft.get("base_model_name_or_path")
        if not (base or trained_on):
            raise QLoRAKitError(f"adapter {self.folder} does not say which base it was trained on; pass --base")
        if self.run is not None:
            model = self.run.model
        else:
            task, labels = self.task()
            model = ModelConfig(task=task, labels=labels)
        return replace(model, base=base or trained_on, revision=None if base else model.revision)

    def check_base(self, fingerprint: str, source: str, *, force: bool = False, folder: str | None = None) -> None:
        """Refuse (or, with `force`, warn about) a base other than the one the adapter was trained on.

        `folder` is the local folder `source` resolved to (default: `source` itself);
        when it is the folder training used, the message says its files changed.
        """
        trained_on = (self.manifest.get("base") or {}).get("fingerprint")
        if not trained_on:
            log.warning("adapter %s records no base fingerprint; cannot check it was trained on %s",
                        self.folder, source)
            return
        if trained_on == fingerprint:
            return
        recorded_folder = self.manifest["base"].get("folder")
        if recorded_folder and Path(folder or source).expanduser().resolve() == Path(recorded_folder).resolve():
            # The same folder with other contents: most likely replaced or damaged files, not a choice.
            message = (
                f"adapter {self.folder} was trained on a different base: the files in {recorded_folder} changed "
                f"since training (fingerprint {trained_on[:32]}... then, {fingerprint[:32]}... now): they were "
                "replaced, modified or damaged. Restore the base it was trained on"
            )
        else:
            message = (
                f"adapter {self.folder} was trained on a different base: it was trained on base "
                f"'{self.manifest['base'].get('source')}' (fingerprint {trained_on[:32]}...), and the base "
                f"'{source}' differs ({fingerprint[:32]}...). "
                "Use the base it was trained on"
            )
        if not force:
            raise QLoRAKitError(message + ", or pass --force (strict_base=False) to use this one anyway")
        warnings.warn(message + "; using it anyway (--force)", stacklevel=3)

    def check_quantization(self, record: dict) -> None:
        """Warn when the loaded base is quantized differently from the one training used."""
        trained = self.manifest.get("quantization") or {}
        # Compare only what both sides record: older manifests lack newer keys.
        diff = {k: (v, record[k]) for k, v in trained.items() if k in record and v != record[k]}
        if diff:
            warnings.warn(
                f"adapter {self.folder} was trained on a base quantized differently (trained, now): {diff}; "
                "outputs will differ from training",
                stacklevel=3,
            )


_DAMAGED_FIX = (
    "Copy the adapter again from a good source or train it again (a run's checkpoints/ may hold an intact "
    f"earlier adapter); if you changed the file on purpose, delete its entry under 'files' in {MANIFEST_FILE}"
)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise QLoRAKitError(f"{path} is not valid JSON ({exc}); the adapter folder is damaged") from exc
    if not isinstance(data, dict):
        raise QLoRAKitError(f"{path} should hold a JSON object; the adapter folder is damaged")
    return data


MAGNITUDE = "lora_magnitude_vector"  # DoRA's per-row magnitude, keyed as PEFT keys it


def _module_keys(raw: dict[str, torch.Tensor], folder: Path, saved_modules: list[str] = ()
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA weights, `modules_to_save` weights), PEFT's prefix and adapter name stripped.

    `base_model.model.x.lora_A[.default].weight` -> `x.lora_A.weight`; DoRA's
    magnitude keeps PEFT's key without `.weight`: `x.lora_magnitude_vector`. A module
    to save, `base_model.model.score[.modules_to_save.default].weight` -> `score.weight`.
    """
    weights, saved = {}, {}
    for key, value in raw.items():
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key.removeprefix(PEFT_PREFIX))
        if classification.in_head(name, list(saved_modules)):
            saved[name] = value
            continue
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        magnitude = re.fullmatch(rf"(?:base_model\.model\.)?(.+)\.{MAGNITUDE}(?:\.[^.]+)?(?:\.weight)?", key)
        if match is not None:
            weights[f"{match.group(1)}.{match.group(2)}.weight"] = value
        elif magnitude is not None:
            weights[f"{magnitude.group(1)}.{MAGNITUDE}"] = value
        else:
            raise QLoRAKitError(
                f"{folder / WEIGHTS_FILE} holds '{key}', which is not a LoRA A/B weight, DoRA magnitude or a "
                "module its config lists in modules_to_save; LoRA adapters with biases are not supported"
            )
    return weights, saved


def split_key(key: str) -> tuple[str, str]:
    """`x.lora_A.weight` -> (`x`, `lora_A`); `x.lora_magnitude_vector` -> (`x`, `lora_magnitude_vector`)."""
    if key.endswith("." + MAGNITUDE):
        return key[: -len(MAGNITUDE) - 1], MAGNITUDE
    module, part, _ = key.rsplit(".", 2)
    return module, part


def lora_config_from_peft(config: dict, folder: Path) -> LoRAConfig:
    """Our `LoRAConfig` from PEFT's adapter_config.json; variants we cannot load are refused by name."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')}, only LORA is supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-layer rank_pattern/alpha_pattern is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} is not supported (only 'none')")
    if problems:
        raise QLoRAKitError(f"cannot load adapter {folder}: " + "; ".join(problems))
    try:
        return LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                          dropout=float(config.get("lora_dropout", 0.0)),
                          use_rslora=bool(config.get("use_rslora", False)),
                          use_dora=bool(config.get("use_dora", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise QLoRAKitError(f"{folder / CONFIG_FILE} lacks a valid r / lora_alpha ({exc})") from exc


def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy an adapter's weights into a model whose active adapter has exactly those LoRA layers.

    The adapter's config comes with them: every layer's alpha, scaling and dropout
    are re-derived from it (the rank must match).
    """
    record = AdapterRecord.read(folder)
    weights = record.weights()
    layers = dict(lora_layers(model))
    expected = {f"{name}.{part}.weight" for name in layers for part in ("lora_A", "lora_B")}
    if set(weights) != expected:
        raise QLoRAKitError(
            f"adapter {record.folder} does not match the model's LoRA layers "
            f"({len(weights)} tensors saved, {len(expected)} expected); was the config changed?"
        )
    updates = {name: layer.adapters[layer.active] for name, layer in layers.items()}
    _copy_weights(updates, weights, record.folder)
    _copy_heads(model, record)
    cfg = record.lora_config()
    for update in updates.values():
        update.set_config(replace(cfg, dtype=update.config.dtype))  # the weights keep their dtype


def _copy_weights(layers: dict, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy `<module>.lora_{A,B}.weight` (and DoRA magnitude) tensors into `layers[module]` (a `LoRAUpdate` or
    `LoRALinear`)."""
    for key, value in weights.items():
        module_name, part = split_key(key)
        param = getattr(layers[module_name], part)
        param = param if part == MAGNITUDE else param.weight
        if param is None:
            raise QLoRAKitError(f"adapter {folder}: {key} is a DoRA magnitude, but its config does not say use_dora")
        if tuple(param.shape) != tuple(value.shape):
            raise QLoRAKitError(
                f"adapter {folder}: {key} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}; "
                "the adapter was trained on a base of another size"
            )
        with torch.no_grad():
            param.copy_(value)


def load_adapter(model: nn.Module, folder: str | os.PathLike, *, base: BaseInfo | None = None,
                 strict_base: bool = True, dtype: torch.dtype | None = None,
                 adapter_name: str | None = None) -> nn.Module:
    """Wrap `model`'s layers as the adapter in `folder` describes and load its weights.

    Works for adapters saved by qlora_kit or by PEFT. Given `base` (the `BaseInfo`
    that `load_base` returned), the base's fingerprint and quantization are
    compared with those the adapter was trained on: a different base raises (or
    only warns with `strict_base=False`), a different quantization warns.

    The first adapter on a model is named `adapter_name` ('default' if not given)
    and made active. Further adapters need a name of their own; they are added
    beside the loaded ones, sharing the base, and `lora.set_active_adapter` picks
    the one the model computes with (or `model(..., adapter_names=[...])` per row).
    Adapters trained on different bases are refused on one model (a warning with
    `strict_base=False`).
    """
    record = AdapterRecord.read(folder)
    if base is not None:
        record.check_base(base.fingerprint, base.source, force=not strict_base, folder=base.folder)
        record.check_quantization(base.quant)
    cfg = record.lora_config()
    if dtype is not None:
        cfg.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    weights = record.weights()
    names = sorted({split_key(k)[0] for k in weights})
    missing = [n for n in names if _get(model, n) is None]
    if missing:
        raise QLoRAKitError(
            f"adapter {record.folder} targets layer(s) this model lacks, e.g. {', '.join(missing[:3])}: "
            "it was trained on a different architecture"
        )
    trained_on = (record.manifest.get("base") or {}).get("fingerprint")
    loaded = adapter_names(model)
    if loaded and record.head_weights():
        # A classifier has one head: this adapter's would silently replace the loaded one's.
        raise QLoRAKitError(f"adapter {record.folder} brings its own classification head, and this model already "
                            "has an adapter: a classifier holds one head, so load it on a fresh base")
    if not loaded:
        name = adapter_name or DEFAULT_ADAPTER
        apply_lora(model, cfg, targets=names, adapter_name=name)
        updates = {n: layer.adapters[name] for n, layer in lora_layers(model)}
    else:
        if adapter_name is None:
            raise QLoRAKitError(f"the model already has adapter(s) {', '.join(loaded)}; give adapter {record.folder} "
                                "a name of its own (adapter_name=...) to load it beside them")
        _check_same_base(model, record.folder, trained_on, force=not strict_base)
        updates = add_adapter(model, adapter_name, cfg, names)
    _copy_weights(updates, weights, record.folder)
    _copy_heads(model, record)
    for update in updates.values():
        update.trained_on = trained_on
    return model


def _copy_heads(model: nn.Module, record: AdapterRecord) -> None:
    """Load a classifier's trained head (`modules_to_save`) into the model's head, checked against it."""
    saved = record.head_weights()
    if not saved:
        if record.task()[0] == classification.TASK:
            raise QLoRAKitError(f"adapter {record.folder} is a sequence-classification adapter without its head "
                                "(modules_to_save): it cannot classify; train it again")
        return
    if not classification.is_classifier(model):
        raise QLoRAKitError(
            f"adapter {record.folder} was trained for sequence classification (it holds the head "
            f"{', '.join(sorted(saved))}), but the model is a {type(model).__name__}: load the base with "
            "model.task=sequence_classification")
    params = classification.head_state_dict(model)
    if set(saved) != set(params):
        raise QLoRAKitError(f"adapter {record.folder} holds head parameters {sorted(saved)}, the model's head has "
                            f"{sorted(params)}: it was trained on another architecture")
    for name, value in saved.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise QLoRAKitError(
                f"adapter {record.folder}: {name} has shape {tuple(value.shape)}, the model's head needs "
                f"{tuple(params[name].shape)}: the adapter was trained for {value.shape[0]} classes; load the base "
                "with the adapter's model.labels")
        with torch.no_grad():
            params[name].copy_(value)


def _check_same_base(model: nn.Module, folder: Path, trained_on: str | None, *, force: bool) -> None:
    """Refuse a second adapter trained on another base than the adapters already loaded."""
    others = {}
    for _, layer in wrapped_layers(model):
        for name, update in layer.adapters.items():
            if update.trained_on and trained_on and update.trained_on != trained_on:
                others.setdefault(name, update.trained_on)
    if not others:
        return
    shown = "; ".join(f"'{name}': {fp[:32]}..." for name, fp in others.items())
    message = (f"adapter {folder} was trained on a base with fingerprint {trained_on[:32]}..., but adapter(s) "
               f"already loaded on this model were trained on another ({shown}): adapters sharing a base must "
               "have been trained on it")
    if not force:
        raise QLoRAKitError(message + "; pass strict_base=False (--force) to load it anyway")
    warnings.warn(message + "; loading it anyway (strict_base=False)", stacklevel=3)


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None

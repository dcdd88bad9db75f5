"""Exporting plain 16/32-bit Hugging Face checkpoints: merging an adapter into its base, dequantizing a 4-bit checkpoint.

Both read the source one tensor at a time (plain reads, no memory map), transform
it and stream the result to disk as it is made (`checkpoint_writer.ShardWriter`),
so host RAM stays near the largest tensor and its temporaries (4-bit weights are
quantized a block of rows at a time, so the quantizer's temporaries stay near
15 MB). The GPU is never used. Verification comes after, and streams too (one
decoder layer of each model at a time). The output is assembled in `.OUT.tmp-*`
beside OUT and renamed into place only after it is complete and, for merges,
verified (`qlora_kit.verify`).

Merge arithmetic: each merged weight is base + scaling * (B @ A) computed in fp32
and rounded once to the output dtype (float16 by default: `settings.MergeOptions`
explains the choice with measurements).

    merge("runs/r1", "exports/r1")                          # NF4-faithful merge, float16, verified
    merge("runs/r1/adapter", "exports/r1-orig", mode="original", dtype="float16")
    dequantize("saved-4bit-model", "exports/plain")
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import memory, quantization
from .classification import TASK as CLASSIFICATION
from .adapter_io import MAGNITUDE, AdapterRecord, split_key
from .atomic import staged_folder
from .checkpoint import EXPORT_MANIFEST, INDEX_FILE, Checkpoint, resolve
from .checkpoint_writer import ShardWriter, copy_side_files, parse_size, write_config
from .config import make
from .errors import QLoRAKitError
from .precision import torch_dtype
from .settings import DequantizeOptions, MergeOptions, ModelConfig

log = logging.getLogger(__name__)

# Tokenizer files a run may have changed (e.g. a chat template added for training); the
# adapter folder's copies win over the base's.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

@dataclass
class ExportResult:
    """What an export wrote."""

    out_dir: Path
    files: list[str]
    tensors: int
    bytes: int
    seconds: float
    merged_modules: int = 0
    verification: dict | None = None


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------


@dataclass
class MergePlan:
    """Everything a merge needs, checked before a byte is written."""

    adapter_dir: Path
    checkpoint: Checkpoint
    mode: str
    scaling: float
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)
    quant: dict  # the manifest's quantization record (quantization.quant_record)
    quantized: set[str]  # weight names that were 4-bit during training
    transposed: set[str]  # weight names stored (in, out), as transformers' Conv1D holds them
    skip: set[str]  # tensors not written (lm_head of a tied model)
    manifest: dict | None
    classifier: object | None = None  # classifier_export.ClassifierMerge for a sequence-classification adapter
    record: AdapterRecord | None = None
    model: ModelConfig | None = None


def merge(adapter: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True,
          **options) -> ExportResult:
    """Merge an adapter into its base and write a plain Hugging Face checkpoint at `out_dir`.

    `adapter` is an adapter folder or a run folder holding `adapter/`; `options` are
    those of `qlora-kit merge` (`settings.MergeOptions`: base, mode, dtype, force,
    overwrite, verify, verify_file, min_agreement, max_shard_size), checked as the
    command line checks them. `progress` shows progress bars on stderr.

    Raises QLoRAKitError, before writing anything, for a missing adapter or base, a
    base with another fingerprint (unless `force`), missing shards, adapter modules
    the base lacks or whose shapes differ; and, leaving no export, when verification
    fails.
    """
    opts = make(MergeOptions, adapter=adapter, out_dir=out_dir, **options)
    started = time.monotonic()
    max_bytes = parse_size(opts.max_shard_size)
    plan = plan_merge(AdapterRecord.read(opts.adapter), base=opts.base, mode=opts.mode, force=opts.force)
    with staged_folder(opts.out_dir, overwrite=opts.overwrite) as tmp:
        files, tensors, nbytes = _write_merged(plan, tmp, torch_dtype(opts.dtype), max_bytes, progress)
        _write_export_manifest(tmp, plan, opts.dtype)
        report = None
        if opts.verify > 0 and plan.classifier is not None:
            report = _verify_classifier(tmp, plan, opts)
        elif opts.verify > 0:
            from . import verify  # imports transformers' model classes; only needed here

            report = verify.verify_export(
                tmp, plan.adapter_dir, plan.checkpoint.folder, plan.quant, mode=opts.mode, batches=opts.verify,
                texts=opts.verify_file, min_agreement=opts.min_agreement, force=opts.force,
            )
            verify.write_report(tmp, report)
            if not report["passed"]:
                served = report.get("served") or {}
                if report["metrics"]["finite"] and served.get("finite") is False:
                    raise QLoRAKitError(
                        f"verification failed, export not written: computed in {report['served_dtype']} (as "
                        "transformers' and vLLM's dtype 'auto' would serve it) the merged model's logits "
                        f"overflow: {verify.summary(report)}. Export it with --dtype bfloat16 (or float32)"
                    )
                noise = report.get("noise_floor") or {}
                if report.get("within_noise_floor"):
                    raise QLoRAKitError(
                        f"verification failed, export not written: {verify.summary(report)}. The export agrees "
                        "with the reference better than the reference agrees with itself computed in bf16: "
                        f"--min-agreement {opts.min_agreement} is stricter than this model's precision noise"
                    )
                if opts.dtype != "float32" and report["metrics"]["mean_kl"] <= 2 * noise.get("mean_kl", 0):
                    raise QLoRAKitError(  # the merge is right; rounding to the output dtype costs too much
                        f"verification failed, export not written: {verify.summary(report)}. Rounding the merged "
                        f"weights to {opts.dtype} moves this model about as much as computing it in bf16 does; "
                        "export with --dtype float16 or float32 (or lower --min-agreement if you accept it)"
                    )
                raise QLoRAKitError(
                    f"verification failed, export not written: {verify.summary(report)}. The merged model "
                    "does not reproduce the adapter on its base; check the base, mode and adapter "
                    "(or lower --min-agreement / pass --verify 0 if you accept it)"
                )
    return ExportResult(
        out_dir=Path(opts.out_dir), files=files, tensors=tensors, bytes=nbytes, seconds=time.monotonic() - started,
        merged_modules=len(plan.adapters), verification=report,
    )


def _verify_classifier(folder: Path, plan: MergePlan, opts) -> dict:
    """Whole-model verification of class logits (the streaming verifier compares LM logits only)."""
    from . import classifier_export

    quant = quantization.quant_config_from_record(plan.quant) if plan.quant else plan.record.quant_config()
    if plan.mode == "original":  # the update went onto the 16-bit weights: the reference keeps them unquantized
        quant = replace(quant, skip_modules=["*"])
    model = replace(plan.model, labels=plan.classifier.labels)
    report = classifier_export.verify(folder, plan.record, model, quant, batches=opts.verify,
                                      min_agreement=opts.min_agreement, texts=opts.verify_file, force=opts.force)
    classifier_export.write_report(folder, report)
    if not report["passed"]:
        raise QLoRAKitError(
            f"verification failed, export not written: {classifier_export.summary(report)}. The merged classifier "
            "does not reproduce the adapter on its base; check the base, mode and adapter "
            "(or lower --min-agreement / pass --verify 0 if you accept it)")
    return report


def plan_merge(record: AdapterRecord, *, base: str | None, mode: str, force: bool) -> MergePlan:
    """Read the adapter, find and check its base; raise before writing anything if they do not fit."""
    checkpoint = resolve(record.base_model(base).base)
    record.check_base(checkpoint.fingerprint(), str(checkpoint.folder), force=force)
    quant = record.manifest.get("quantization") or {}
    if mode == "nf4" and not quant:
        quant = quantization.quant_record(record.quant_config())
        log.warning("adapter %s has no qlora_kit.json quantization record; assuming %s", record.folder, quant)
    shapes = checkpoint.tensor_shapes()
    adapters, quantized, transposed = _in_checkpoint_names(
        _pair_weights(record.weights(), record.folder), shapes, checkpoint, quant, record.base_model(base))
    _check_shapes(adapters, shapes, record.folder, checkpoint, transposed)
    config = _read_config(checkpoint.folder)
    tied = bool(config.get("tie_word_embeddings", False))
    model = record.base_model(base)
    classifier = None
    if model.task == CLASSIFICATION:
        from . import classifier_export

        classifier = classifier_export.plan(record, checkpoint, model,
                                            quantization.quant_config_from_record(quant) if quant else record.quant_config())
    return MergePlan(
        adapter_dir=record.folder, checkpoint=checkpoint, mode=mode, scaling=record.lora_config().scaling,
        adapters=adapters, quant=quant, quantized=quantized if mode == "nf4" else set(), transposed=transposed,
        skip={"lm_head.weight"} if tied and classifier is None else set(), manifest=record.manifest or None,
        classifier=classifier, record=record, model=model,
    )



def _pair_weights(weights: dict[str, torch.Tensor], adapter_dir: Path) -> dict[str, tuple]:
    """module -> (A, B, DoRA magnitude or None)."""
    modules = sorted({split_key(key)[0] for key in weights})
    pairs = {}
    for module in modules:
        a, b = weights.get(f"{module}.lora_A.weight"), weights.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise QLoRAKitError(f"adapter {adapter_dir} has only one of lora_A/lora_B for {module}; it is incomplete")
        pairs[module] = (a, b, weights.get(f"{module}.{MAGNITUDE}"))
    return pairs


def _check_shapes(adapters, shapes, adapter_dir: Path, checkpoint: Checkpoint, transposed: set[str]) -> None:
    missing = [m for m in adapters if f"{m}.weight" not in shapes]
    if missing:
        raise QLoRAKitError(
            f"adapter {adapter_dir} has weights for {len(missing)} module(s) the base {checkpoint.folder} lacks, "
            f"e.g. {', '.join(missing[:3])}: it was trained on another architecture"
        )
    for module, (a, b, _) in adapters.items():
        shape = shapes[f"{module}.weight"]
        out_features, in_features = shape[::-1] if f"{module}.weight" in transposed else shape
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
            raise QLoRAKitError(
                f"adapter {adapter_dir}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the "
                f"base weight is {(out_features, in_features)} (needs A (r, {in_features}), B ({out_features}, r)): "
                "the adapter was trained on a base of another size"
            )


def _in_checkpoint_names(adapters: dict, shapes: dict, checkpoint: Checkpoint, quant: dict,
                         model: ModelConfig) -> tuple[dict, set[str], set[str]]:
    """The adapters keyed by the checkpoint's module names, and the checkpoint weights that training held
    in 4-bit and that are stored (in, out) (a `Conv1D`'s).

    Decided by the code that loads the base (`loading.weight_layout`): transformers' renames
    map the model's names back to the checkpoint's (GPT-NeoX's `lm_head` is stored as
    `embed_out`), and the skeleton is built with the run's own model settings (attention
    kernel, remote code), so a model that needs e.g. eager attention merges as it trained.
    """
    from .loading import weight_layout

    layout = weight_layout(checkpoint, quantization.quant_config_from_record(quant), model)
    model_key = {}
    for name in shapes:
        key, fused = layout.keys.target(name)
        if fused is None:  # tensors fused on load (MoE experts) are no LoRA target; they pass through unchanged
            model_key[name] = key
    stored_as = {key: name for name, key in model_key.items()}
    renamed = {m: stored_as.get(f"{m}.weight", f"{m}.weight").removesuffix(".weight") for m in adapters}
    return ({renamed[m]: pair for m, pair in adapters.items()},
            {name for name, key in model_key.items() if key in layout.quantized},
            {name for name, key in model_key.items() if key in layout.transposed})


def _read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def _write_merged(plan: MergePlan, folder: Path, out_dtype: torch.dtype, max_bytes: int,
                  progress: bool) -> tuple[list[str], int, int]:
    writer = ShardWriter(folder, max_bytes)
    compute_dtype = torch_dtype(plan.quant.get("compute_dtype", "bfloat16")) if plan.mode == "nf4" else None
    pending = set(plan.adapters)
    count = 0
    total = sum(shard.stat().st_size for shard in plan.checkpoint.shards)
    freed = _trimmer(max_bytes)
    with tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
        for name, tensor in plan.checkpoint.iter_tensors():
            bar.update(tensor.numel() * tensor.element_size())
            freed.processed(tensor.numel() * tensor.element_size())
            if name in plan.skip:
                continue
            module = name.removesuffix(".weight") if name.endswith(".weight") else None
            # A classifier writes its base under the classifier's names and drops other heads.
            out_name = plan.classifier.output_name(name) if plan.classifier is not None else name
            if out_name is None:
                continue
            writer.add(out_name, merged_tensor(name, tensor, plan, compute_dtype, out_dtype, module))
            pending.discard(module)
            count += 1
    if pending:  # cannot happen after _check_shapes, unless the shards changed under us
        raise QLoRAKitError(f"base {plan.checkpoint.folder} changed during the merge: {sorted(pending)[:3]} not found")
    if plan.classifier is not None:  # the trained head (modules_to_save), rounded once to the output dtype
        for name, value in plan.classifier.heads.items():
            writer.add(name, value.to(out_dtype))
            count += 1
    files = writer.finish()
    write_config(plan.checkpoint.folder, folder, out_dtype)
    if plan.classifier is not None:
        plan.classifier.update_config(folder)
    side = copy_side_files(plan.checkpoint.folder, folder)
    for name in TOKENIZER_FILES:
        if (plan.adapter_dir / name).is_file():
            (folder / name).write_bytes((plan.adapter_dir / name).read_bytes())
    log.info("merged %d modules into %d tensors; copied %s", len(plan.adapters), count, ", ".join(side))
    return files, count, writer.total_bytes


def merged_tensor(name: str, tensor: torch.Tensor, plan: MergePlan, compute_dtype: torch.dtype | None,
                  out_dtype: torch.dtype, module: str | None) -> torch.Tensor:
    """One output tensor: the base as training saw it (nf4) or as stored (original), plus the update."""
    if not tensor.is_floating_point():
        return tensor
    flip = name in plan.transposed  # a Conv1D's (in, out) weight: merged as (out, in), written back as stored
    if flip:
        tensor = tensor.T
    if compute_dtype is not None:
        # What the 4-bit training model held: every float tensor in the compute dtype, the
        # 4-bit layers quantized from it (the same calls as loading).
        tensor = tensor.to(compute_dtype)
        if name in plan.quantized:
            tensor = quantization.quantize_roundtrip(tensor, plan.quant)
    if module in plan.adapters:
        a, b, magnitude = plan.adapters[module]
        merged = tensor.to(torch.float32, copy=True)  # never write into the tensor read from the shard
        del tensor
        # The same arithmetic as LoRALinear.delta_weight (fp32, B@A, then scaling), done in
        # place to keep the temporaries of a large weight to two fp32 copies.
        delta = b.float() @ a.float()
        delta *= plan.scaling
        merged += delta
        del delta
        if magnitude is not None:  # DoRA: each row rescaled to its trained magnitude
            merged *= (magnitude.float() / torch.linalg.vector_norm(merged, dim=1))[:, None]
        tensor = merged
    result = tensor.to(out_dtype)
    if flip:
        result = result.T.contiguous()
    if out_dtype == torch.float16 and not torch.isfinite(result).all():
        raise QLoRAKitError(f"{name} overflows float16 after merging; export with --dtype bfloat16 or float32")
    return result


def _write_export_manifest(folder: Path, plan: MergePlan, dtype: str) -> None:
    data = {
        "kind": "merge",
        "mode": plan.mode,
        "dtype": dtype,
        "adapter": str(plan.adapter_dir.resolve()),
        "base": {"source": plan.checkpoint.source, "folder": str(plan.checkpoint.folder)},
        "quantization": plan.quant if plan.mode == "nf4" else None,
        "merged_modules": len(plan.adapters),
        "scaling": plan.scaling,
        "adapter_manifest": plan.manifest,
        "files": _weight_records(folder),
    }
    (folder / EXPORT_MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def _weight_records(folder: Path) -> dict:
    """Size and SHA-256 of the shards and index just written, checked whenever qlora_kit reads them back.

    Read back from disk (the page cache, usually): what is recorded is what was written.
    """
    from .integrity import record_files

    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_FILE)
    return record_files(folder, names)


def _trimmer(max_shard_bytes: int) -> memory.FreedMemory:
    """Hands freed temporaries back to the OS every eighth of a shard (at most every 256 MiB).

    Each tensor's fp32 temporaries are freed at once, but glibc keeps the freed
    blocks; without trimming, RSS creeps towards the checkpoint's size.
    """
    return memory.FreedMemory(every_bytes=min(256 * 2**20, max(max_shard_bytes // 8, 1)))


# ---------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------

_STATE_SUFFIXES = tuple(f".weight.{s}" for s in quantization.SAVED_STATE_SUFFIXES)


def dequantize(src: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True,
               **options) -> ExportResult:
    """Turn a bitsandbytes 4-bit checkpoint (as `save_pretrained` writes it) into a plain one.

    Each 4-bit weight is rebuilt from its packed data and saved quantization state
    and dequantized exactly as the 4-bit model computes with it; other tensors are
    cast to `dtype`. The output config has no quantization_config. `options` are
    those of `qlora-kit dequantize` (`settings.DequantizeOptions`).
    """
    opts = make(DequantizeOptions, src=src, out_dir=out_dir, **options)
    started = time.monotonic()
    dtype, overwrite, out_dtype = opts.dtype, opts.overwrite, torch_dtype(opts.dtype)
    max_bytes = parse_size(opts.max_shard_size)
    checkpoint = resolve(opts.src)
    config = _read_config(checkpoint.folder)
    _check_4bit_config(config, checkpoint.folder)
    names = checkpoint.tensor_names()
    parts = _saved_4bit_weights(names)
    if not parts:
        raise QLoRAKitError(f"{checkpoint.folder} holds no 4-bit weights (no '*.weight.absmax' tensors) to dequantize")
    with staged_folder(opts.out_dir, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        pending: dict[str, dict[str, torch.Tensor]] = {}
        count = 0
        total = sum(shard.stat().st_size for shard in checkpoint.shards)
        freed = _trimmer(max_bytes)
        with tqdm(total=total, unit="B", unit_scale=True, desc="dequantize", disable=not progress) as bar:
            for name, tensor in checkpoint.iter_tensors():
                bar.update(tensor.numel() * tensor.element_size())
                freed.processed(tensor.numel() * tensor.element_size())
                weight, part = _owner(name, parts)
                if weight is None:
                    writer.add(name, tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
                    count += 1
                    continue
                # A weight's pieces may sit in different shards: hold them (all small but
                # the packed data) until the last one arrives.
                pieces = pending.setdefault(weight, {})
                pieces[part] = tensor
                if len(pieces) == len(parts[weight]):
                    del pending[weight]
                    packed = pieces.pop("")
                    writer.add(weight, quantization.dequantize_saved(packed, pieces).to(out_dtype))
                    count += 1
        files = writer.finish()
        write_config(checkpoint.folder, tmp, out_dtype)
        copy_side_files(checkpoint.folder, tmp)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(
            {"kind": "dequantize", "dtype": dtype, "source": checkpoint.source,
             "quantization_config": config.get("quantization_config"), "files": _weight_records(tmp)},
            indent=2) + "\n")
    return ExportResult(out_dir=Path(opts.out_dir), files=files, tensors=count, bytes=writer.total_bytes,
                        seconds=time.monotonic() - started)


def _check_4bit_config(config: dict, folder: Path) -> None:
    qc = config.get("quantization_config")
    if qc is None:
        return  # the tensors decide; a checkpoint saved outside transformers may lack the block
    if qc.get("quant_method") not in (None, "bitsandbytes"):
        raise QLoRAKitError(f"{folder} is quantized with {qc.get('quant_method')}; only bitsandbytes 4-bit is supported")
    if qc.get("load_in_8bit"):
        raise QLoRAKitError(f"{folder} is a bitsandbytes 8-bit checkpoint; only 4-bit checkpoints can be dequantized")


def _saved_4bit_weights(names) -> dict[str, set[str]]:
    """weight name -> the parts stored for it: '' (packed data) plus state suffixes."""
    parts: dict[str, set[str]] = {}
    for name in names:
        for suffix in _STATE_SUFFIXES:
            if name.endswith(suffix):
                weight = name[: -len(suffix) + len(".weight")]
                parts.setdefault(weight, {""}).add(suffix[len(".weight."):])
    missing = [w for w in parts if w not in names]
    if missing:
        raise QLoRAKitError(f"4-bit state without packed weights for {', '.join(missing[:3])}: the checkpoint is incomplete")
    return parts


def _owner(name: str, parts: dict[str, set[str]]) -> tuple[str | None, str]:
    """(4-bit weight, part) that tensor `name` belongs to, or (None, '') for an ordinary tensor."""
    if name in parts:
        return name, ""
    for suffix in _STATE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix) + len(".weight")], suffix[len(".weight."):]
    return None, ""

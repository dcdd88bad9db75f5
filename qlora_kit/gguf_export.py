"""GGUF export for llama.cpp and Ollama: a merged checkpoint as a GGUF model, an adapter as a GGUF LoRA.

`export_gguf` turns a plain Hugging Face checkpoint (what `qlora-kit merge`
writes) of a llama-family architecture into one GGUF file, following llama.cpp's
convert_hf_to_gguf.py conventions:
  - architecture `llama` for LlamaForCausalLM and MistralForCausalLM, `qwen2` for
    Qwen2ForCausalLM, with the `<arch>.*` hyperparameter keys llama.cpp reads;
  - tensor names `token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output` (no
    `output` when the embeddings are tied: llama.cpp then reuses `token_embd`);
  - for `llama`, the rows of Q and K permuted into the rotary layout of llama.cpp's
    rope (see `rope_permute`); `qwen2` uses the other rope mode and is not permuted;
  - 1-D tensors (norms, biases) in f32, matrices in f16 or q8_0 (q8_0 falls back to
    f16 for a matrix whose rows are not a multiple of 32 values, as llama.cpp does);
  - Llama 3.1-style rope scaling as a `rope_freqs` tensor, linear scaling as keys;
  - the tokenizer as `tokenizer.ggml.*` keys (see gguf_vocab).

Memory: one source tensor at a time. Big matrices are read from the memory-mapped
shard in blocks of rows, converted and appended, so host RAM holds one block
(~64 MB of f32) plus, for the permuted Q and K, one such matrix. The file is written
beside its target under a temporary name, verified, and only then renamed into place.

Verification reads the written file back with transformers' own GGUF reader (an
independent implementation of the names, the un-permutation and the q8_0
decoding) and compares next-token logits with the source checkpoint, both in
float32, with qlora_kit.verify's metrics. That reader needs both models in RAM
at 4 bytes per parameter: skip it (`verify=False`) for models that do not fit.

`export_gguf_lora` writes an adapter as the LoRA file llama.cpp's `--lora` loads
(convert_lora_to_gguf.py's layout): `blk.N.<name>.weight.lora_a` (rank x in) and
`.lora_b` (out x rank, Q/K rows permuted like the base weights), `adapter.lora.alpha`
chosen so that llama.cpp's alpha / rank equals the adapter's own scaling.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .classification import TASK as CLASSIFICATION, checkpoint_task
from .errors import QLoRAKitError

log = logging.getLogger(__name__)

# HF architecture -> llama.cpp architecture.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# llama.cpp stores Q/K of these in the interleaved rotary layout of its "normal" rope mode.
PERMUTED = {"llama"}
TYPES = ("f16", "q8_0")
LORA_TYPES = ("f32", "f16")

# Acceptance, from measurements (4 batches x 4 x 128 tokens of the built-in texts):
#   f16   SmolLM2-135M: 100% top-1 agreement, mean KL 0, max |logit diff| 0 (its bf16 weights are exact
#         in f16); tiny random Llama: 100%, KL ~1e-9, max diff 3e-7 (tiny values round to f16 subnormals).
#   q8_0  SmolLM2-135M: 97.7%, KL 3.8e-3, perplexity 51.49 -> 51.67; tiny Llama: 98.0%, KL 1e-6. The
#         dequantized file equals the q8_0 round trip of the source weights exactly: that is q8_0 itself.
#   A wrong Q/K layout on SmolLM2 gives 34% and KL 1.9. The limits sit well between the two.
MIN_AGREEMENT = {"f16": 0.99, "q8_0": 0.95}
MAX_MEAN_KL = {"f16": 1e-3, "q8_0": 2e-2}
VERIFY_BATCHES = 4
REPORT_SUFFIX = ".verification.json"

# Rows per block when streaming a matrix: about this many values (64 MB as f32).
_BLOCK_VALUES = 1 << 24

_BLOCK_PARTS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_PARTS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Buffers some older checkpoints save; llama.cpp recomputes them.
_SKIPPED = re.compile(r".*\.rotary_emb\.inv_freq")


# --------------------------------------------------------------------------- names and layout


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a llama-family HF tensor (`model.layers.3.self_attn.q_proj.weight` ->
    `blk.3.attn_q.weight`), or None for a tensor llama.cpp has no place for."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if match:
        part = _BLOCK_PARTS.get(match.group(2))
        return f"blk.{match.group(1)}.{part}.{match.group(3)}" if part else None
    match = re.fullmatch(r"(.+)\.(weight|bias)", hf_name)
    if match and match.group(1) in _GLOBAL_PARTS:
        return f"{_GLOBAL_PARTS[match.group(1)]}.{match.group(2)}"
    return None


def rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q or K rows from HF's rotary layout to llama.cpp's.

    HF rotates each head's first half of dimensions against its second half
    (rotate_half); llama.cpp's rope rotates adjacent pairs. So within each head,
    rows (0, d/2, 1, d/2+1, ...) become (0, 1, 2, 3, ...). Works on weights (rows x
    in) and biases (rows), and on LoRA B matrices, whose rows are the same outputs.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


# --------------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class Hyper:
    """What llama.cpp needs from a llama-family config."""

    hf_arch: str
    arch: str  # llama.cpp's
    n_ctx: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rope: dict  # rope_type and its parameters
    tied: bool
    sliding_window: int | None


def read_hyper(folder: str | os.PathLike) -> Hyper:
    """The llama.cpp-relevant hyperparameters of a checkpoint folder, or a QLoRAKitError for an unsupported one."""
    from transformers import AutoConfig

    folder = Path(folder)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise QLoRAKitError(f"cannot read {folder / 'config.json'} ({exc})") from exc
    # Configs saved from a bare config object have no `architectures`; their model_type still names the family.
    hf_arch = (raw.get("architectures") or [_BY_MODEL_TYPE.get(raw.get("model_type"), raw.get("model_type"))])[0]
    if hf_arch not in ARCHITECTURES:
        raise QLoRAKitError(
            f"GGUF export does not support the {hf_arch} architecture of {folder}; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. For others use llama.cpp's convert_hf_to_gguf.py"
        )
    config = AutoConfig.from_pretrained(folder)
    n_head = config.num_attention_heads
    rope = _rope_parameters(config)
    window = getattr(config, "sliding_window", None)
    if hf_arch == "Qwen2ForCausalLM" and not getattr(config, "use_sliding_window", False):
        window = None
    return Hyper(
        hf_arch=hf_arch, arch=ARCHITECTURES[hf_arch], n_ctx=config.max_position_embeddings,
        n_embd=config.hidden_size, n_layer=config.num_hidden_layers, n_ff=config.intermediate_size,
        n_head=n_head, n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_head,
        vocab_size=config.vocab_size, rms_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)), rope=rope,
        tied=bool(getattr(config, "tie_word_embeddings", False)), sliding_window=window,
    )


def _rope_parameters(config) -> dict:
    """rope_theta, rope_type and scaling parameters, from transformers 5's `rope_parameters` or older fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params.update(getattr(config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    if params["rope_type"] not in ("default", "llama3", "linear"):
        raise QLoRAKitError(
            f"GGUF export supports default, llama3 and linear rope scaling, not {params['rope_type']!r}; "
            "use llama.cpp's convert_hf_to_gguf.py for this model"
        )
    return params


def llama3_rope_factors(hyper: Hyper) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (llama.cpp's `rope_freqs` tensor).

    Wavelengths shorter than original_context/high_freq_factor keep their frequency,
    longer than original_context/low_freq_factor are slowed by `factor`, and the band
    between is interpolated smoothly.
    """
    rope = hyper.rope
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    dim = hyper.head_dim
    freqs = 1.0 / (hyper.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _add_hyper(writer, hyper: Hyper) -> None:
    import gguf

    writer.add_context_length(hyper.n_ctx)
    writer.add_embedding_length(hyper.n_embd)
    writer.add_block_count(hyper.n_layer)
    writer.add_feed_forward_length(hyper.n_ff)
    writer.add_head_count(hyper.n_head)
    writer.add_head_count_kv(hyper.n_head_kv)
    writer.add_rope_freq_base(hyper.rope_theta)
    writer.add_layer_norm_rms_eps(hyper.rms_eps)
    writer.add_key_length(hyper.head_dim)
    writer.add_value_length(hyper.head_dim)
    writer.add_rope_dimension_count(hyper.head_dim)
    writer.add_vocab_size(hyper.vocab_size)
    if hyper.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hyper.rope["factor"]))


# --------------------------------------------------------------------------- tensor plan


@dataclass
class TensorJob:
    """One tensor of the output file: where its values come from and how they are stored."""

    name: str  # in the GGUF file
    shape: tuple[int, ...]  # numpy order (rows, columns)
    qtype: object  # gguf.GGMLQuantizationType
    source: str | None = None  # tensor in the shard
    shard: Path | None = None
    permute_heads: int | None = None  # rope_permute with this many heads
    data: np.ndarray | None = None  # values computed here (rope_freqs, LoRA matrices)

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size


def _storage_type(shape: tuple[int, ...], out_type: str):
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if out_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def plan_model(checkpoint, hyper: Hyper, out_type: str) -> list[TensorJob]:
    """Every tensor of the GGUF model, in source order (rope_freqs first), or a QLoRAKitError for a stray one."""
    import gguf

    jobs = []
    if hyper.rope["rope_type"] == "llama3":
        jobs.append(TensorJob("rope_freqs.weight", (hyper.head_dim // 2,), gguf.GGMLQuantizationType.F32,
                              data=llama3_rope_factors(hyper)))
    shards = checkpoint.tensor_names()
    shapes = checkpoint.tensor_shapes()
    unknown = []
    for hf_name, shape in shapes.items():
        if _SKIPPED.fullmatch(hf_name) or (hyper.tied and hf_name == "lm_head.weight"):
            continue
        name = gguf_tensor_name(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        jobs.append(TensorJob(name, tuple(shape), _storage_type(tuple(shape), out_type), source=hf_name,
                              shard=shards[hf_name], permute_heads=_rope_heads(name, hyper)))
    if unknown:
        raise QLoRAKitError(
            f"{checkpoint.folder} has tensors a llama.cpp {hyper.arch} model has no place for: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    return jobs


def _rope_heads(gguf_name: str, hyper: Hyper) -> int | None:
    """How many heads `rope_permute` splits this tensor's rows into, or None if it is not permuted."""
    if hyper.arch not in PERMUTED:
        return None
    if ".attn_q." in gguf_name:
        return hyper.n_head
    if ".attn_k." in gguf_name:
        return hyper.n_head_kv
    return None


def _blocks(job: TensorJob, shard_file) -> Iterator[np.ndarray]:
    """The job's stored bytes, in blocks of rows (one block for vectors and permuted matrices)."""
    import gguf

    if job.data is not None:
        values: torch.Tensor | None = torch.from_numpy(job.data)
    elif job.permute_heads or len(job.shape) == 1:
        values = shard_file.get_tensor(job.source)
        if job.permute_heads:
            values = rope_permute(values, job.permute_heads)
    else:
        values = None  # read lazily, block by block
    rows = job.shape[0]
    step = rows if len(job.shape) == 1 else max(1, _BLOCK_VALUES // job.shape[-1])
    lazy = shard_file.get_slice(job.source) if values is None else None
    for start in range(0, rows, step):
        block = values[start:start + step] if values is not None else lazy[start:start + step]
        if job.qtype == gguf.GGMLQuantizationType.F32:
            yield block.to(torch.float32).numpy()
        elif job.qtype == gguf.GGMLQuantizationType.F16:
            half = block.to(torch.float16)
            if not torch.isfinite(half).all():
                raise QLoRAKitError(f"{job.source} has values beyond float16's range (65504); export it as q8_0, "
                                    "whose per-block scales reach further")
            yield half.numpy()
        else:
            yield gguf.quants.quantize(block.to(torch.float32).numpy(), job.qtype)


# --------------------------------------------------------------------------- writing


def _write_file(path: Path, arch: str, add_metadata, jobs: list[TensorJob], progress: bool) -> None:
    """Header, metadata and tensor infos first, then each tensor's data streamed in blocks.

    gguf's writer wants every tensor registered before the header is written; its
    `write_tensor_data` then takes whole arrays, so data is appended here block by
    block with the same alignment padding it would write.
    """
    import gguf
    from safetensors import SafetensorError, safe_open
    from tqdm import tqdm

    writer = gguf.GGUFWriter(path, arch)
    add_metadata(writer)
    for job in jobs:
        # A float placeholder dtype with raw_dtype keeps the shape in values, not bytes.
        writer.add_tensor_info(job.name, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    bar = tqdm(total=sum(j.nbytes for j in jobs), unit="B", unit_scale=True, desc="gguf", disable=not progress)
    try:
        for job in jobs:
            writer.write_padding(out, out.tell())
            written = 0
            try:
                with _open(job.shard, safe_open) as shard_file:
                    for block in _blocks(job, shard_file):
                        block.tofile(out)
                        written += block.nbytes
                        bar.update(block.nbytes)
            except SafetensorError as exc:
                raise QLoRAKitError(f"shard {job.shard} is corrupt or truncated ({exc}); copy it again") from exc
            if written != job.nbytes:  # a bug here, not the user's: the header already promised nbytes
                raise RuntimeError(f"{job.name}: wrote {written} bytes, header says {job.nbytes}")
            writer.write_padding(out, written)
        out.flush()
        os.fsync(out.fileno())
    finally:
        bar.close()
        writer.close()


@contextmanager
def _open(shard: Path | None, safe_open):
    if shard is None:
        yield None
    else:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            yield handle


def _staged(out: Path, overwrite: bool):
    """atomic.staged_file, for a name llama.cpp and Ollama accept."""
    from . import atomic

    if out.suffix.lower() != ".gguf":
        raise QLoRAKitError(f"the output file must end in .gguf (llama.cpp and Ollama expect it): {out}")
    return atomic.staged_file(out, overwrite=overwrite)


def _check_type(out_type: str, allowed: tuple[str, ...]) -> None:
    if out_type not in allowed:
        raise QLoRAKitError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(allowed)}")


def _file_type(qtypes) -> int:
    """general.file_type: llama.cpp names a file by its matrices' type."""
    import gguf

    kinds = {q for q in qtypes if q != gguf.GGMLQuantizationType.F32}
    if gguf.GGMLQuantizationType.Q8_0 in kinds:
        return gguf.LlamaFileType.MOSTLY_Q8_0
    if gguf.GGMLQuantizationType.F16 in kinds:
        return gguf.LlamaFileType.MOSTLY_F16
    return gguf.LlamaFileType.ALL_F32


def _type_counts(jobs: list[TensorJob]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.qtype.name] = counts.get(job.qtype.name, 0) + 1
    return counts


# --------------------------------------------------------------------------- model export


def _refuse_classifier(task: str, what) -> None:
    """GGUF holds language models here: llama.cpp's model files have no sequence-classification head."""
    if task == CLASSIFICATION:
        raise QLoRAKitError(f"{what} is a sequence classifier; GGUF export covers causal language models "
                            "(llama.cpp has no classification head to load it into). Use the merged "
                            "safetensors checkpoint (qlora-kit merge) instead")


def export_gguf(source: str | os.PathLike, out_file: str | os.PathLike, *, type: str = "f16",  # noqa: A002
                overwrite: bool = False, verify: bool = True, progress: bool = True,
                verify_batches: int = VERIFY_BATCHES, min_agreement: float | None = None,
                name: str | None = None) -> dict:
    """Write the checkpoint `source` as the GGUF model `out_file`; returns the report (also beside the file).

    `source` is anything qlora_kit.checkpoint.resolve accepts: a merged folder, a Hub
    id, the packaged model's name. `type` is "f16" or "q8_0". With `verify`, the file
    only lands at `out_file` if its logits agree with the source's (see the module
    docstring); `min_agreement` overrides the type's minimum top-1 agreement.
    """
    import gguf

    from . import atomic
    from .checkpoint import resolve
    from .gguf_vocab import add_tokenizer

    _check_type(type, TYPES)
    out = Path(out_file)
    checkpoint = resolve(source)
    _refuse_classifier(checkpoint_task(checkpoint.folder), checkpoint.folder)
    hyper = read_hyper(checkpoint.folder)
    notes = _model_notes(hyper)
    jobs = plan_model(checkpoint, hyper, type)
    tokenizer_summary: dict = {}

    def metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or _model_name(checkpoint.folder))
        _add_hyper(writer, hyper)
        writer.add_file_type(_file_type(j.qtype for j in jobs))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer_summary.update(add_tokenizer(writer, checkpoint.folder, hyper.vocab_size))

    report_path = out.with_name(out.name + REPORT_SUFFIX)
    started = time.perf_counter()
    with _staged(out, overwrite) as tmp:
        _write_file(tmp, hyper.arch, metadata, jobs, progress)
        written = time.perf_counter()
        log.info("wrote %s (%.1f MB) in %.1fs", out.name, tmp.stat().st_size / 1e6, written - started)
        verification = None
        if verify:
            verification = verify_gguf(tmp, checkpoint.folder, type=type, batches=verify_batches,
                                       min_agreement=min_agreement, hyper=hyper)
            if not verification["passed"]:
                raise QLoRAKitError(f"GGUF verification failed, {out} not written: {_summary(verification)}")
        size = tmp.stat().st_size
    report = {
        "file": str(out), "type": type, "source": str(checkpoint.folder), "architecture": hyper.hf_arch,
        "gguf_architecture": hyper.arch, "bytes": size, "tensors": len(jobs),
        "tensor_types": _type_counts(jobs), "tied_embeddings": hyper.tied, "tokenizer": tokenizer_summary,
        "notes": notes, "seconds": {"write": round(written - started, 2),
                                    "verify": round(time.perf_counter() - written, 2) if verify else None},
        "verification": verification,
    }
    # After the rename: a report only ever describes the file beside it.
    if verification is not None:
        atomic.write_json(report_path, report)
    else:
        report_path.unlink(missing_ok=True)  # an overwritten file's old report would describe another file
    return report


def _model_name(folder: Path) -> str:
    """general.name: the folder's name, or for a converted GGUF base (cache folders are named by hash) its own."""
    from .gguf_origin import gguf_origin

    origin = gguf_origin(folder) or {}
    return (origin.get("general") or {}).get("general.name") or folder.name


def _model_notes(hyper: Hyper) -> list[str]:
    notes = []
    if hyper.sliding_window and hyper.sliding_window < hyper.n_ctx:
        notes.append(f"the model attends within a sliding window of {hyper.sliding_window} tokens; llama.cpp's "
                     f"{hyper.arch} architecture attends to the whole context, so outputs differ beyond that length")
        log.warning(notes[-1])
    return notes


# --------------------------------------------------------------------------- verification


def verify_gguf(gguf_file: str | os.PathLike, source_folder: str | os.PathLike, *, type: str = "f16",  # noqa: A002
                batches: int = VERIFY_BATCHES, min_agreement: float | None = None, hyper: Hyper | None = None,
                texts=None) -> dict:
    """Logit agreement of a GGUF file (read by transformers) with its source checkpoint, both in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .verify import compare, load_texts, token_batches

    gguf_file, source_folder = Path(gguf_file), Path(source_folder)
    hyper = hyper or read_hyper(source_folder)
    threshold = MIN_AGREEMENT[type] if min_agreement is None else float(min_agreement)
    text_list, text_source = load_texts(texts)
    tokenizer = AutoTokenizer.from_pretrained(source_folder)
    inputs = token_batches(tokenizer, text_list, batches)
    reference = AutoModelForCausalLM.from_pretrained(source_folder, dtype=torch.float32).eval()
    candidate, config_note = _load_gguf_model(gguf_file, hyper)
    metrics = compare(reference, candidate.eval(), inputs)
    del reference, candidate
    report = {
        "passed": (metrics["top1_agreement"] >= threshold and metrics["finite"]
                   and metrics["mean_kl"] <= MAX_MEAN_KL[type]),
        "min_agreement": threshold,
        "max_mean_kl": MAX_MEAN_KL[type],
        "reference": "source checkpoint in float32; candidate: the GGUF file read by transformers' GGUF loader "
                     "(dequantized to float32)" + (f"; {config_note}" if config_note else ""),
        "texts": text_source,
        "batches": len(inputs),
        "metrics": metrics,
        "tokenizer_roundtrip": _tokenizer_roundtrip(gguf_file, tokenizer, text_list),
    }
    log.info("GGUF verification: %s", _summary(report))
    return report


def _load_gguf_model(gguf_file: Path, hyper: Hyper):
    """The GGUF file as a transformers model; rope scaling, which its reader does not restore, from the source."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, filename = str(gguf_file.parent), gguf_file.name
    if hyper.rope["rope_type"] == "default":
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32), None
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)  # each read parses the file: only when needed
    config.rope_parameters = dict(hyper.rope)
    note = f"{hyper.rope['rope_type']} rope scaling taken from the source config (transformers' reader ignores it)"
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, config=config, dtype=torch.float32), note


def _tokenizer_roundtrip(gguf_file: Path, tokenizer, texts: list[str]) -> dict:
    """How many texts transformers' reading of the file's tokenizer encodes exactly as the source tokenizer.

    For information: transformers rebuilds the tokenizer from the same keys llama.cpp
    reads, but with its own pre-tokenizer table, so a mismatch may be its gap, not the file's.
    """
    from transformers import AutoTokenizer

    try:
        rebuilt = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except Exception as exc:  # transformers raises many types for tokenizers it cannot rebuild
        return {"error": f"{type(exc).__name__}: {exc}"}
    same = sum(rebuilt(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts)
    return {"texts": len(texts), "identical": same}


def _summary(report: dict) -> str:
    m = report["metrics"]
    return (f"top-1 agreement {m['top1_agreement']:.2%} (min {report['min_agreement']:.2%}), mean KL "
            f"{m['mean_kl']:.2e} nats (max {report['max_mean_kl']:.0e}), max |logit diff| "
            f"{m['max_abs_logit_diff']:.3g}, {m['tokens']} tokens: {'passed' if report['passed'] else 'FAILED'}")


# --------------------------------------------------------------------------- LoRA export


def export_gguf_lora(adapter_dir: str | os.PathLike, out_file: str | os.PathLike, *, base: str | None = None,
                     type: str = "f32", overwrite: bool = False, progress: bool = True,  # noqa: A002
                     name: str | None = None) -> dict:
    """Write a PEFT-format adapter (or a run folder's) as a GGUF LoRA for llama.cpp's `--lora`; returns a report.

    llama.cpp needs the base's architecture and head counts (for the Q/K permutation):
    they come from `base` (a model folder with config.json, or anything resolve accepts)
    or else from the base the adapter records. `type` is "f32" (llama.cpp's converter's
    default) or "f16".
    """
    import gguf

    from .adapter_io import AdapterRecord

    _check_type(type, LORA_TYPES)
    out = Path(out_file)
    record = AdapterRecord.read(adapter_dir)
    _refuse_classifier(record.task()[0], record.folder)
    folder, lora = record.folder, record.lora_config()
    if lora.use_dora:
        raise QLoRAKitError(f"adapter {folder} is a DoRA adapter, which llama.cpp's LoRA files cannot express; "
                            "export the merged model instead: qlora-kit export-gguf RUN_OR_ADAPTER OUT.gguf")
    base_folder = _base_folder(record.base_model(base).base)
    hyper = read_hyper(base_folder)
    # llama.cpp scales by alpha / rank; rsLoRA's alpha / sqrt(rank) is the same with another alpha.
    alpha = lora.scaling * lora.rank
    weights = record.weights()
    jobs = plan_lora(weights, hyper, type, folder)

    def metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name or folder.name)
        writer.add_file_type(_file_type(j.qtype for j in jobs))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    started = time.perf_counter()
    with _staged(out, overwrite) as tmp:
        _write_file(tmp, hyper.arch, metadata, jobs, progress)
        size = tmp.stat().st_size
    return {"file": str(out), "type": type, "adapter": str(folder), "base": str(base_folder),
            "gguf_architecture": hyper.arch, "alpha": alpha, "rank": lora.rank, "tensors": len(jobs),
            "bytes": size, "seconds": round(time.perf_counter() - started, 2)}


def plan_lora(weights: dict[str, torch.Tensor], hyper: Hyper, out_type: str, folder: Path) -> list[TensorJob]:
    """lora_a/lora_b tensors named after their base weight, B's rows rope-permuted for llama's Q and K."""
    import gguf

    from .adapter_io import split_key

    qtype = gguf.GGMLQuantizationType.F32 if out_type == "f32" else gguf.GGMLQuantizationType.F16
    jobs = []
    modules = sorted({split_key(key)[0] for key in weights}, key=_natural)
    for module in modules:
        base_name = gguf_tensor_name(module + ".weight")
        if base_name is None or base_name.startswith(("token_embd", "output_norm")):
            raise QLoRAKitError(f"adapter {folder} adapts {module}, which llama.cpp's {hyper.arch} LoRA loader "
                                "has no tensor for")
        if base_name == "output.weight" and hyper.tied:
            raise QLoRAKitError(f"adapter {folder} adapts lm_head, but the base ties it to the embeddings: "
                                "llama.cpp has no separate output tensor to apply it to")
        if f"{module}.lora_A.weight" not in weights or f"{module}.lora_B.weight" not in weights:
            raise QLoRAKitError(f"adapter {folder} has only one of lora_A/lora_B for {module}; it is damaged")
        lora_a, lora_b = weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"]
        heads = _rope_heads(base_name, hyper)
        if heads:
            lora_b = rope_permute(lora_b, heads)
        for suffix, matrix in ((".lora_a", lora_a), (".lora_b", lora_b)):
            jobs.append(TensorJob(base_name + suffix, tuple(matrix.shape), qtype,
                                  data=matrix.to(torch.float32).contiguous().numpy()))
    return jobs


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _base_folder(base: str) -> Path:
    """A folder with the base's config.json: `base` itself if it is one, else what resolve makes of it."""
    from .checkpoint import resolve

    if (Path(base).expanduser() / "config.json").is_file():
        return Path(base).expanduser()
    return resolve(base).folder

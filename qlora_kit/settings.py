"""Every setting qlora_kit takes, declared once: the config sections of a run and the options of each command.

Each field is written once, here, with its type, default, range and a comment
that documents it. Everything else is derived from these declarations: recipe
YAML files and `section.key=value` overrides (`qlora_kit.config`), the command
line's flags and `--help` (`qlora_kit.cli`), and `qlora-kit config`. This module
imports nothing heavy (no torch), so the command line starts fast; dtype names
become torch dtypes in `qlora_kit.precision`.

Dtypes are spelled as torch names everywhere (`bfloat16`, `float16`, `float32`);
`train.mixed_precision` is a mode in Accelerate's vocabulary (`bf16`, `fp16`, `no`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from .config import bounded, load_config, positional

ALL_LINEAR = "all-linear"
FloatDtype = Literal["bfloat16", "float16", "float32"]
DEFAULT_MAX_SHARD_SIZE = "2GB"


# ---------------------------------------------------------------- a training run


@dataclass
class ModelConfig:
    """Which base model to load, and how."""

    base: str = "smollm2-135m-instruct"  # local HF folder, Hub id, .gguf file, or 'smollm2-135m-instruct'
    revision: Optional[str] = None  # Hub branch, tag or commit
    trust_remote_code: bool = False  # run modelling code shipped with the checkpoint (only for sources you trust)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel
    device: Optional[str] = None  # 'cuda', 'cuda:1', 'cpu'; default: CUDA when present, else CPU
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"  # causal_lm: next-token loss; sequence_classification: a ...ForSequenceClassification with its head trained fully beside the adapters (rows {text, label})
    labels: list[str] = field(default_factory=list)  # sequence_classification: class names in id order (become id2label); empty: the sorted labels of the training data


@dataclass
class QuantConfig:
    """How the frozen base is stored in 4-bit and computed."""

    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit data type; NF4 suits normally distributed weights
    double_quant: bool = True  # quantize the per-block constants too (~0.37 bits/param saved)
    compute_dtype: FloatDtype = "bfloat16"  # dtype of matmuls and unquantized modules
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"  # container dtype; bfloat16 for FSDP
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])  # linears kept unquantized, in compute_dtype


@dataclass
class LoRAConfig:
    """Which layers get adapters, and their shape."""

    rank: int = bounded(16, ge=1)  # adapter rank r; higher = more capacity and memory
    alpha: float = bounded(32.0, gt=0)  # scale numerator: the update is (alpha / rank) · B A
    dropout: float = bounded(0.05, ge=0, lt=1)  # dropout on the adapter's input during training
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])  # leaf names ('q_proj'), globs over full names, or 'all-linear'
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank), better for large ranks
    use_dora: bool = False  # DoRA: also train a magnitude per output row (weight-decomposed LoRA); each step dequantizes the base weights once more
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # adapter weights; auto = float32 (mixed precision keeps fp32 masters)

    def problems(self) -> list[str]:
        if not self.target_modules:
            return [f"target_modules is empty: name layers (e.g. [q_proj, v_proj]) or use [{ALL_LINEAR}]"]
        return []

    @property
    def scaling(self) -> float:
        """The factor on B·A: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class DataConfig:
    """Where the training data comes from and how rows become token sequences."""

    path: str = ""  # a .jsonl/.json/.csv/.parquet file, or a Hub dataset name such as "tatsu-lab/alpaca"
    format: Literal["instruction", "chat", "text"] = "instruction"  # instruction: instruction/input/output; chat: messages (or ShareGPT conversations); text: text (model.task=sequence_classification reads text and label instead)
    split: str = "train"  # which split of a Hub dataset to read (local files are read whole)
    eval_file: Optional[str] = None  # a held-out file in the same format; when set, eval_fraction is ignored
    eval_fraction: float = bounded(0.05, ge=0, lt=1)  # share of rows carved off (seeded) as the held-out set when there is no eval_file; 0 for none
    max_seq_len: int = bounded(1024, ge=2)  # tokens per example (or per packed row); longer examples are cut at the end
    packing: bool = False  # concatenate examples into rows of up to max_seq_len, each attending only to itself
    train_on_prompt: bool = False  # also take loss on prompt / user / system tokens, not just responses
    prompt_style: Literal["auto", "chat_template", "alpaca"] = "auto"  # instruction rows: auto = tokenizer's chat template if it has one, else the Alpaca prompt
    chat_template: Optional[str] = None  # override or supply a chat template: "chatml" or a Jinja string; None = the tokenizer's own
    max_samples: Optional[int] = bounded(None, ge=1)  # use only the first N rows of the file (quick runs)
    csv_delimiter: str = ","  # .csv files: the column separator ("\t" for tab-separated files)
    csv_columns: list[str] = field(default_factory=list)  # .csv files without a header row: their column names in order (e.g. [label, text])

    def problems(self) -> list[str]:
        if not self.path:
            return ["path is empty: give a .jsonl/.json/.csv/.parquet file or a Hub dataset name"]
        return []


@dataclass
class TrainConfig:
    """How to train: steps, batch, optimizer, schedule, evaluation and checkpoints."""

    output_dir: str = "runs/run"  # the run folder: config, metrics, adapter, checkpoints, plots
    seed: int = 0  # seeds data order, adapter init and dropout
    max_steps: Optional[int] = bounded(None, ge=1)  # optimizer steps; default: num_epochs over the training set
    num_epochs: int = bounded(1, ge=1)  # passes over the training set when max_steps is not set
    batch_size: int = bounded(4, ge=1)  # examples per micro-batch (per process)
    gradient_accumulation_steps: int = bounded(1, ge=1)  # micro-batches per optimizer step (loss normalised by all their tokens)
    learning_rate: float = bounded(2e-4, gt=0)  # peak learning rate
    weight_decay: float = bounded(0.0, ge=0)  # AdamW decoupled weight decay on adapter weights
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup (transformers' schedules; the logged lr is the rate after each step)
    warmup_steps: int = bounded(10, ge=0)  # linear warmup from 0 to learning_rate
    max_grad_norm: float = bounded(1.0, ge=0)  # clip the global gradient norm; 0 disables
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = "auto"  # auto: paged_adamw_8bit on CUDA, adamw on CPU
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 where supported, else fp16 (CUDA) with loss scaling
    gradient_checkpointing: bool = True  # recompute activations in backward: much less memory, ~30% more compute
    ignore_memory_plan: bool = False  # CUDA: train even when the memory plan predicts the step will not fit the free GPU memory
    compile: bool = False  # torch.compile each decoder layer once (regional compilation; LoRA, 4-bit and checkpointing kept); default off: not a win on the 2-core CPU measured (see README, Performance); needs a C++ compiler on the CPU, else trains eagerly with one warning
    activation_offloading: bool = False  # CUDA: keep what forward saves for backward (with checkpointing: each layer's input) in pinned host memory; frees layers x tokens x hidden x 2 bytes of GPU memory for two PCIe copies per step
    loss_chunk_tokens: int = bounded(128, ge=1)  # supervised tokens per LM-head chunk in the fused loss: bounds the logits memory (128 x vocab fp32 floats); on the CPU measured, 128 was as fast as 256 and faster than 1024
    mlp_chunk_tokens: int = bounded(0, ge=0)  # compute each decoder layer's MLP this many tokens at a time, each slice recomputed in backward (tiled MLP): for long sequences, the MLP activations stop growing with the sequence for ~1/6 more compute; 0 = whole sequence
    eval_every: int = bounded(50, ge=0)  # evaluate every N steps (and at the start and end); 0: only start and end
    eval_batches: Optional[int] = bounded(None, ge=1)  # cap evaluation at N micro-batches; default: the whole held-out set
    save_every: int = bounded(50, ge=0)  # checkpoint every N steps; 0: only the final adapter
    keep_checkpoints: int = bounded(2, ge=0)  # newest checkpoints kept, older ones deleted; 0 keeps all
    resume: bool = False  # continue from the newest checkpoint in output_dir
    overwrite: bool = False  # delete what output_dir holds (an earlier run, or any other files) and start a new run there; without it, train refuses a non-empty folder that is not one of its runs
    log_every: int = bounded(1, ge=1)  # write metrics every N steps
    sample_prompts: int = bounded(3, ge=0)  # held-out prompts to generate from before and after training; 0 disables
    sample_max_new_tokens: int = bounded(64, ge=1)  # length of those generations
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"  # extra tracker through Accelerate (its package must be installed)
    cpu_threads: Optional[int] = bounded(None, ge=1)  # CPU training: torch threads per process; default: the cores this process may use, shared among the processes on this machine (OMP_NUM_THREADS also sets it)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # under several processes (accelerate launch, torchrun): ddp keeps a whole model per process, fsdp shards the 4-bit base and adapters across them (needs quant.quant_storage=bfloat16); auto: fsdp under `accelerate launch --use_fsdp`, else ddp
    fsdp_cpu_offload: bool = False  # fsdp: keep the shards in host RAM and copy each layer to the GPU as it runs (70B on 24 GB GPUs); false: as `accelerate launch --fsdp_offload_params` says
    distributed_timeout_s: int = bounded(1800, ge=1)  # seconds a process waits for the others (a step, a checkpoint, an evaluation) before failing instead of hanging


@dataclass
class RunConfig:
    """Everything a training run needs; written resolved into the run folder as config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the base model
    quant: QuantConfig = field(default_factory=QuantConfig)  # its 4-bit quantization
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # the adapters
    data: DataConfig = field(default_factory=DataConfig)  # the training data
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop


def load_recipe(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe YAML and apply `section.key=value` overrides; all problems reported at once."""
    return load_config(RunConfig, path, overrides)


# ---------------------------------------------------------------- commands
#
# Options shared by several commands are declared once, in a base class; kw_only
# lets required options (no default) follow optional ones in subclasses.


@dataclass(kw_only=True)
class ModelSourceOptions:
    """Which model a command loads: a base in 4-bit, optionally with an adapter."""

    run: Optional[str] = positional(None, metavar="RUN|ADAPTER")  # a training run folder or an adapter folder (same as --adapter)
    adapter: list[str] = field(default_factory=list)  # adapter or run folder; repeat as --adapter NAME=PATH to load several on one base (the first is active)
    base: Optional[str] = None  # base model: local folder, Hub id, .gguf file or 'smollm2-135m-instruct' (default with an adapter: the base it was trained on)
    device: Optional[str] = None  # 'cuda', 'cuda:1', 'cpu' (default: CUDA when present)
    force: bool = False  # load the adapter even if the base differs from the one it was trained on


@dataclass(kw_only=True)
class GenerationOptions:
    """How replies are generated."""

    max_new_tokens: int = bounded(256, ge=1)  # longest reply in tokens
    temperature: float = bounded(0.0, ge=0)  # 0 = greedy (deterministic); > 0 samples
    top_p: float = bounded(1.0, gt=0, le=1)  # nucleus sampling when temperature > 0
    seed: Optional[int] = None  # seeds sampling, for repeatable outputs


@dataclass(kw_only=True)
class ChatOptions(ModelSourceOptions, GenerationOptions):
    """`qlora-kit chat`: talk with a base and optional adapters; reads lines from stdin (/reset, /use NAME, /exit)."""

    system: Optional[str] = None  # system message


@dataclass(kw_only=True)
class GenerateOptions(ChatOptions):
    """`qlora-kit generate`: one reply to one prompt."""

    prompt: Optional[str] = None  # the user's message
    prompts: Optional[str] = None  # a .jsonl file of {"prompt", "adapter", "system"} rows, answered --batch-size rows at a time, each row by its own adapter (null: the base); prints one JSON line per row
    use: Optional[str] = None  # which loaded adapter answers --prompt ('base' for none; default: the first)
    batch_size: int = bounded(8, ge=1)  # rows of a --prompts file generated together
    no_chat_template: bool = False  # send the prompt as plain text instead of through the chat template / prompt style


@dataclass(kw_only=True)
class EvalOptions(ModelSourceOptions):
    """`qlora-kit eval`: loss and perplexity of a base, or base + adapter, on a dataset (loss and accuracy for a classifier)."""

    data: Optional[str] = None  # a .jsonl/.json/.csv/.parquet file, pkg:// path or Hub dataset (default with a run folder: the run's held-out split)
    format: Optional[Literal["instruction", "chat", "text"]] = None  # row format (default: the run's, else instruction)
    split: Optional[str] = None  # split of a Hub dataset (default train)
    max_seq_len: Optional[int] = bounded(None, ge=2)  # tokens per example; longer ones are cut (default: the run's)
    max_samples: Optional[int] = bounded(None, ge=1)  # evaluate at most N examples (of the held-out split, for a run)
    batch_size: int = bounded(8, ge=1)  # examples per forward pass
    json: Optional[str] = None  # also write the result as JSON to this file


@dataclass(kw_only=True)
class ExportOptions:
    """Where and how an export writes its checkpoint."""

    dtype: FloatDtype = "bfloat16"  # dtype of the written weights
    overwrite: bool = False  # replace an existing output folder (only after the new one is complete)
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE  # largest output shard, in bytes or e.g. 500MB, 5GB; host RAM does not depend on it (tensors are read and written one at a time)


@dataclass(kw_only=True)
class MergeOptions(ExportOptions):
    """`qlora-kit merge`: merge an adapter into its base and write a plain Hugging Face checkpoint.

    Merge a LoRA adapter into its base model and write a standard Hugging Face
    checkpoint (sharded safetensors, config, tokenizer, chat template) that loads
    with plain transformers, vLLM or llama.cpp converters: no PEFT, no bitsandbytes.

    Which base weights the adapter is added to (--mode):

      nf4 (default)  The adapter was trained on top of the NF4-quantized base, so it
                     learned corrections relative to *those* weights. The merge
                     re-quantizes every layer that was 4-bit during training exactly
                     as training did (quant type, block size, double quant, compute
                     dtype from the adapter's qlora_kit.json), dequantizes it and adds
                     scaling*B*A. The export computes what the trained model computed
                     (up to rounding to --dtype): the losses and evaluations you saw in
                     training carry over. The cost: the base keeps its 4-bit
                     quantization error, stored in 16 bits.

      original       Add scaling*B*A to the original 16-bit weights. Choose it when
                     you will serve the original-precision base anyway and want the
                     adapter on top of the more accurate weights. But the adapter never
                     saw these weights: outputs differ from the trained model, usually
                     slightly, sometimes noticeably (small models, large updates). Its
                     verification checks the merge against the 16-bit base + adapter
                     and also reports the drift from the trained 4-bit model.

    If unsure, export nf4 (it is what you evaluated); export both and evaluate them
    if the last bit of quality matters.

    Output dtype (--dtype): each merged weight is computed in fp32 (base + scaling*B*A)
    and rounded once to the output dtype. The base's NF4 values are exact in 16 bits,
    so the only loss is the rounding of the sum. Measured on the quickstart (held-out
    rows; merged model vs the 4-bit model + adapter, both computing in fp32; the
    noise floor is that reference computed in bf16 instead, 98.77% / KL 1.8e-3 after
    the full recipe, 95.6% / KL 5.1e-3 after 5 steps):

                         80 steps                 5 steps
      float16 (default)  top-1 99.94%, KL 1.5e-6  100.00%, KL 7.5e-6
      bfloat16           top-1 99.32%, KL 4.6e-4   95.94%, KL 5.3e-3 (fails 0.98)
      float32            top-1 100%,   KL 3e-9    100.00%, KL 2e-11

    float16 keeps 3 more mantissa bits than bfloat16 (8x less rounding) at the same 2
    bytes/param; bfloat16's rounding can cost as much as computing in bf16 does.
    float32 is exact and twice the size. Computed in float16 (what transformers' and
    vLLM's dtype 'auto' pick for a float16 checkpoint) the float16 export still agrees
    99.57% (KL 3e-5) with the fp32 reference; a bfloat16 export computed in bf16, 98.0%.
    float16 cannot hold values beyond 65504: a weight that overflows fails the merge,
    and verification also runs the export in float16 and fails it if any logit is not
    finite (some models' activations exceed float16 when computed in it); export
    such models with --dtype bfloat16 or float32.

    Verification (on by default, --verify N batches, 0 to skip) runs the merged model
    and the adapter on its base on the same tokens and refuses to put the export in
    place if their top-1 agreement is below --min-agreement. The tokens are held-out
    rows of the training run's data when ADAPTER is (in) a run folder, else
    --verify-file or built-in English text. Both sides compute in fp32; it also
    reports the noise floor (the reference computed in bf16 vs fp32) and whether the
    export is within it, and layer-by-layer differences. It streams: one decoder layer
    of each model is in host RAM at a time (the export's layer, the 4-bit reference
    layer and activations), so it runs for models of any size.
    """

    adapter: str = positional(metavar="ADAPTER")  # adapter folder, or a training run folder containing adapter/
    out_dir: str = positional(metavar="OUT")  # folder to write the merged checkpoint to
    dtype: FloatDtype = "float16"  # dtype of the written weights (merged in fp32, rounded once); float16 keeps 8x more of the update than bfloat16 at the same size
    base: Optional[str] = None  # base checkpoint (default: the one recorded with the adapter)
    mode: Literal["nf4", "original"] = "nf4"  # add the update to the base as 4-bit training saw it (nf4) or to the original weights (original)
    force: bool = False  # merge even if the base's fingerprint differs from the one the adapter was trained on
    verify: int = bounded(4, ge=0)  # compare merged vs adapter-on-base on N batches (4 rows or 4x128 tokens each) before putting the export in place; 0 skips
    verify_file: Optional[str] = None  # text for verification: .txt (paragraphs) or .jsonl (all strings of each record); default: the run's held-out rows, else built-in English paragraphs
    min_agreement: float = bounded(0.98, ge=0, le=1)  # fail when the top-1 token agreement with the reference is below this


@dataclass(kw_only=True)
class DequantizeOptions(ExportOptions):
    """`qlora-kit dequantize`: turn a bitsandbytes 4-bit checkpoint into a plain 16/32-bit one.

    The checkpoint is one transformers saved with BitsAndBytesConfig(load_in_4bit=True).
    Each weight is dequantized exactly as the 4-bit model computes with it, so the
    result computes what the 4-bit model did, without bitsandbytes. It does not
    recover the original pre-quantization weights: that information is gone.
    """

    src: str = positional(metavar="SRC")  # 4-bit bitsandbytes checkpoint folder (or Hub id)
    out_dir: str = positional(metavar="OUT")  # folder to write the plain checkpoint to


@dataclass(kw_only=True)
class PlanOptions:
    """`qlora-kit plan`: predict a training run's peak GPU memory without a GPU, and what fits.

    Builds the recipe's model from its config alone (no weights are downloaded or
    loaded), then runs real training steps of qlora_kit's training loop on fake,
    data-less tensors on a simulated GPU, counting every tensor the step keeps alive.
    Prints the peak and what it is made of (4-bit weights, 16-bit weights, adapters,
    gradients, optimizer state, activations, the loss's logits chunk, transients),
    plus an assumed allowance for the CUDA context and workspaces, and whether it
    fits the GPU. Every number is simulated; the simulation assumes no padding and
    every token supervised. Without --no-search it also finds the longest sequence
    (batch 1) and the largest batch (at the recipe's sequence length) that fit, by
    bisection over simulations (a minute or more for 7-9B models).

    Overrides (`section.key=value`) follow the recipe, as for train.
    """

    recipe: str = positional(metavar="RECIPE")  # a recipe YAML, as for train
    overrides: list[str] = positional([], metavar="section.key=value")  # overrides of the recipe, as for train
    gpu_memory: str = "24GiB"  # the GPU's memory: 24GiB, 80GB, 16000MB or bytes (GB = 10^9, GiB = 2^30)
    batch_size: Optional[int] = bounded(None, ge=1)  # micro-batch to plan for (default: train.batch_size)
    seq_len: Optional[int] = bounded(None, ge=2)  # tokens per row to plan for (default: data.max_seq_len)
    no_search: bool = False  # skip the longest-sequence and largest-batch searches (one simulation only)
    json: Optional[str] = None  # also write the plan as JSON to this file


@dataclass(kw_only=True)
class ExportGGUFOptions:
    """`qlora-kit export-gguf`: write a model (or an adapter) as a GGUF file for llama.cpp, Ollama and LM Studio.

    SOURCE is a merged checkpoint (what `qlora-kit merge` writes), or a training run
    or adapter folder, which is merged first (nf4 mode, verified) into a temporary
    folder beside OUT. Llama, Mistral and Qwen2 architectures, following llama.cpp's
    own conversion rules (tensor names, Q/K rotary permutation, tokenizer metadata).
    With --adapter-only the adapter alone becomes a GGUF LoRA file for llama.cpp's
    `--lora` (types f32 or f16) on the base GGUF it was trained on.

    The file is written under a temporary name, read back with transformers' own GGUF
    reader and compared with its source (top-1 agreement, KL, as `merge` reports), and
    only then renamed to OUT; the report lands beside it as OUT.verification.json.
    """

    source: str = positional(metavar="SOURCE")  # merged checkpoint folder, or a run / adapter folder
    out_file: str = positional(metavar="OUT.gguf")  # the GGUF file to write
    type: Literal["f16", "q8_0", "f32"] = "f16"  # tensor type: f16 (lossless from bf16 up to rounding), q8_0 (half the size, ~98% top-1), f32 (adapters only)
    adapter_only: bool = False  # write only the adapter, as a GGUF LoRA for llama.cpp's --lora
    base: Optional[str] = None  # with --adapter-only: the base checkpoint whose layout the LoRA follows (default: the one recorded with the adapter)
    overwrite: bool = False  # replace an existing OUT (only after the new file is complete and verified)
    verify: int = bounded(4, ge=0)  # batches of 4x128 tokens to compare the file with its source before it lands; 0 skips


"""The reference QLoRA recipe (transformers + PEFT + bitsandbytes), simulated like qlora_kit's step.

What is simulated, exactly:

- The base: transformers' `AutoModelForCausalLM.from_config` of the model's published
  config on the meta device, its linear layers (all but the output head, as
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)` leaves `lm_head`)
  swapped for bitsandbytes `Linear4bit` layers holding fake packed NF4 data and
  quantization constants of the real sizes, the rest in bf16 (`dtype=bfloat16`). This is
  the model `from_pretrained(..., quantization_config=...)` returns; it is built by the
  same code as qlora_kit's simulated base (`qlora_kit.memory_plan.simulated_base`)
  because `from_pretrained` cannot run without weights. `is_loaded_in_4bit` is set as
  from_pretrained sets it, so PEFT takes its bitsandbytes paths.
- Then the real library calls, as the PEFT/transformers QLoRA docs and this repository's
  measured benchmark (`benchmarks/worker.py: reference_setup`) do them:
  `prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
  gradient_checkpointing_kwargs={"use_reentrant": False})` (freezes the base, casts every
  non-4-bit parameter - embeddings, norms, lm_head - to fp32, enables checkpointing),
  `get_peft_model(model, LoraConfig(r, lora_alpha, lora_dropout, target_modules="all-linear",
  task_type="CAUSAL_LM"))` (fp32 adapters), bitsandbytes `PagedAdamW8bit` (Trainer's
  `optim="paged_adamw_8bit"`), and a step as Trainer runs it with `bf16=True`: under
  autocast `loss = model(input_ids, attention_mask, labels=labels).loss` (full logits,
  transformers' cross-entropy in fp32), `loss.backward()`, gradient clipping,
  `optimizer.step()`, `zero_grad(set_to_none=True)`.
- `fp32_cast=False`: the same without the fp32 cast (parameters frozen and checkpointing
  enabled by hand, as prepare_model_for_kbit_training does otherwise).

The GPU itself is simulated as for qlora_kit (`qlora_kit.gpu_sim`): same tracker, same
kernel choices, same assumed CUDA overhead.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_kit import memory_plan as mp  # noqa: E402
from qlora_kit.settings import RunConfig  # noqa: E402


def reference_setup(fp32_cast: bool = True):
    """A `setup_fn` for `qlora_kit.memory_plan.measure`: the reference recipe's model, step and optimizer."""

    def setup(model, run: RunConfig, device, planned: str) -> mp.StepSetup:
        import bitsandbytes as bnb
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) leaves it
        kwargs = {"use_reentrant": False}
        if fp32_cast:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=run.train.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=kwargs)
        else:
            model.requires_grad_(False)
            if run.train.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
        lora = run.lora
        peft_model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                      target_modules="all-linear", bias="none",
                                                      task_type="CAUSAL_LM"))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        if planned == "cuda":
            optimizer = bnb.optim.PagedAdamW8bit(params, lr=run.train.learning_rate, weight_decay=0.0)
        else:
            optimizer = torch.optim.AdamW(params, lr=run.train.learning_rate, weight_decay=0.0)
        peft_model.train()

        def forward(batch):
            return peft_model(**batch).loss

        return mp.StepSetup(model=model, forward=forward, params=params, optimizer=optimizer, entry=peft_model)

    return setup


def simulate_reference(run: RunConfig, *, batch_size: int, seq_len: int, fp32_cast: bool = True,
                       flops: bool = True, hf_config=None) -> mp.MemoryReport:
    """The reference's simulated step on a GPU (call in a worker process: see qlora_kit.gpu_sim)."""
    from qlora_kit.gpu_sim import install_simulated_gpu, simulated_device

    hf_config = hf_config or mp.model_config(run.model)
    device = install_simulated_gpu()
    tracker = mp.MemoryTracker(device, mp.ALLOCATOR_ROUNDING)
    report = mp.measure(mp.simulated_base(hf_config, run.quant, run.model), run, planned="cuda", device=device,
                        tracker=tracker, batch_size=batch_size, seq_len=seq_len, steps=1, flops=flops,
                        simulated=True, setup_fn=reference_setup(fp32_cast),
                        label=f"{run.model.base} (reference{'' if fp32_cast else ', no fp32 cast'})",
                        env=lambda modes: simulated_device(device, modes))
    report.settings["optimizer"] = "paged_adamw_8bit (PEFT recipe)"
    report.settings["loss"] = "full logits, transformers cross-entropy"
    report.settings["fp32_cast"] = fp32_cast
    return report


def estimate_reference_total(run: RunConfig, batch_size: int, seq_len: int, hf_config, fp32_cast: bool) -> int:
    """Like `memory_plan.estimate_total`, for the reference: two short copies, extrapolated per layer."""
    return mp.extrapolated_total(lambda config: simulate_reference(run, batch_size=batch_size, seq_len=seq_len,
                                                                   fp32_cast=fp32_cast, flops=False,
                                                                   hf_config=config).total_bytes, hf_config)


def longest_reference_sequence(run: RunConfig, gpu_bytes: int, *, fp32_cast: bool = True, batch_size: int = 1,
                               hf_config=None) -> int:
    """The reference's longest sequence (multiple of 64) that fits, as memory_plan.longest_sequence searches."""
    hf_config = hf_config or mp.model_config(run.model)
    cache: dict = {}

    def fits(t: int) -> bool:
        if t not in cache:
            cache[t] = estimate_reference_total(run, batch_size, t, hf_config, fp32_cast)
        return cache[t] <= gpu_bytes

    def confirmed(t: int) -> bool:
        return simulate_reference(run, batch_size=batch_size, seq_len=t, fp32_cast=fp32_cast, flops=False,
                                  hf_config=hf_config).total_bytes <= gpu_bytes

    return mp.longest_fitting(fits, confirmed, mp.sequence_cap(hf_config))

"""qlora_kit.memory_plan: GPU memory predicted without a GPU, checked where it can be.

(a) On the CPU the simulation can be checked against reality: the fake-tensor step
    and a real step of the same tiny Llama, counted by the same tracker, agree.
(b) The CUDA path runs on a simulated GPU (a worker process): model build, LoRA,
    SupervisedLoss, the CUDA default optimizer, bf16 autocast and the fp16 branch;
    every parameter, gradient and optimizer state must end up on the GPU with the
    dtype training expects.
(c) The searches and the plan's text.
(d) Bad input is the user's error, with a message that says what is wrong.
"""

from __future__ import annotations

import json

import pytest

from qlora_kit import memory_plan as mp
from qlora_kit.errors import QLoRAKitError
from qlora_kit.settings import ModelConfig, RunConfig


def _run(base, **train) -> RunConfig:
    run = RunConfig(model=ModelConfig(base=str(base)))
    run.train.batch_size = 2
    run.data.max_seq_len = 64
    for key, value in train.items():
        setattr(run.train, key, value)
    return run


# ---------------------------------------------------------------- (a) the CPU: simulation vs reality


def test_cpu_simulation_matches_a_real_cpu_step(tiny_llama_dir):
    run = _run(tiny_llama_dir)
    run.model.device = "cpu"
    simulated = mp.simulate_step(run, device="cpu", flops=False)
    real = mp.measure_step(run)
    assert simulated.simulated and not real.simulated
    assert real.peak_bytes > 0
    assert abs(simulated.peak_bytes - real.peak_bytes) <= 0.10 * real.peak_bytes, (simulated.breakdown,
                                                                                    real.breakdown)
    # The same persistent pieces, byte for byte.
    for key in ("weights_4bit", "weights_16bit", "lora_weights", "lora_grads"):
        assert simulated.sizes[key] == real.sizes[key], key
    assert simulated.peak_phase == real.peak_phase
    assert simulated.audit["lora_weights"]["problems"] == []


# ---------------------------------------------------------------- (b), (c): one worker process


@pytest.fixture(scope="module")
def cuda_results(tiny_llama_dir, tmp_path_factory):
    """Every simulated-GPU call of this file, in one worker (one interpreter start)."""
    # Wide enough that a layer's input (2 x 512 x 1024 x 2 bytes) is worth offloading (>= 1 MiB).
    wide = tmp_path_factory.mktemp("wide") / "config.json"
    wide.write_text(json.dumps({"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2048,
                                "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                                "vocab_size": 1000, "max_position_embeddings": 1024}))
    base = _run(tiny_llama_dir)
    rank64 = _run(tiny_llama_dir)
    rank64.lora.rank = 64  # adapters of >= 4096 values: bitsandbytes keeps 8-bit states for them
    fp16 = _run(tiny_llama_dir, mixed_precision="fp16")
    fp16.quant.compute_dtype = "float16"
    eight_bit = _run(tiny_llama_dir, optimizer="adamw_8bit", gradient_accumulation_steps=2)
    kept = _run(wide)
    offload = _run(wide, activation_offloading=True)
    tiled = _run(wide, mlp_chunk_tokens=128)
    overhead = mp.CUDA_OVERHEAD_BYTES
    calls = [
        ("simulate_step", rank64, {}),
        ("simulate_step", fp16, {}),
        ("simulate_step", eight_bit, {"flops": False}),
        ("simulate_step", kept, {"seq_len": 512, "flops": False}),
        ("simulate_step", offload, {"seq_len": 512, "flops": False}),
        ("simulate_step", tiled, {"seq_len": 512, "flops": False}),
        ("plan", base, {"gpu_memory": "24GiB", "search": False}),
        ("longest_sequence", base, {"gpu_bytes": overhead + 42 * 2**20}),
        ("longest_sequence", base, {"gpu_bytes": overhead + 400 * 2**20}),
        ("simulate_step", RunConfig(model=ModelConfig(base=str(tiny_llama_dir / "no-such-model"))), {}),
    ]
    names = ["bf16", "fp16", "adamw_8bit", "kept", "offloaded", "tiled", "plan", "longest_small", "longest_large",
             "missing"]
    return dict(zip(names, mp.run_batch(calls)))


def _report(results, name) -> mp.MemoryReport:
    value = results[name]
    if isinstance(value, Exception):
        raise value
    return mp.MemoryReport.from_dict(value)


def _assert_on_gpu(report: mp.MemoryReport):
    for what in ("lora_weights", "gradients", "frozen_weights", "optimizer_state"):
        audit = report.audit[what]
        assert audit["problems"] == [], (what, audit)
        assert audit["counts"] and all(key.startswith("cuda:") for key in audit["counts"]), (what, audit)


def test_cuda_default_path_runs_on_the_simulated_gpu(cuda_results):
    report = _report(cuda_results, "bf16")
    assert report.device == "cuda" and report.simulated
    assert report.settings["optimizer"] == "paged_adamw_8bit"  # train.optimizer=auto on CUDA
    assert report.settings["mixed_precision"] == "bf16"
    _assert_on_gpu(report)
    assert set(report.audit["lora_weights"]["counts"]) == {"cuda:float32"}  # fp32 masters under autocast
    assert set(report.audit["gradients"]["counts"]) == {"cuda:float32"}
    assert set(report.audit["optimizer_state"]["counts"]) == {"cuda:uint8", "cuda:float32"}  # states, qmaps
    assert "cuda:uint8" in report.audit["frozen_weights"]["counts"]  # packed NF4
    # The 4-bit weights are counted exactly: half a byte per value plus the block constants.
    assert 0 < report.sizes["weights_4bit"] < report.sizes["weights_16bit"]
    assert report.peak_bytes >= sum(report.sizes[k] for k in ("weights_4bit", "weights_16bit", "lora_weights"))
    assert report.total_bytes == report.peak_bytes + mp.CUDA_OVERHEAD_BYTES
    assert report.flops_per_step > report.model_flops_per_step > 0  # recompute counted


def test_cuda_fp16_branch_with_loss_scaling(cuda_results):
    report = _report(cuda_results, "fp16")
    assert report.settings["mixed_precision"] == "fp16"
    _assert_on_gpu(report)
    assert set(report.audit["lora_weights"]["counts"]) == {"cuda:float32"}
    assert "cuda:float16" in report.audit["frozen_weights"]["counts"]  # the unquantized modules


def test_cuda_adamw_8bit_with_accumulated_gradients(cuda_results):
    report = _report(cuda_results, "adamw_8bit")
    assert report.settings["optimizer"] == "adamw_8bit"
    _assert_on_gpu(report)
    # Accumulation: gradients of earlier micro-batches exist during this one's backward.
    assert report.breakdown.get("lora_grads", 0) >= report.sizes["lora_grads"]


def test_activation_offloading_moves_the_checkpointed_inputs_off_the_gpu(cuda_results):
    kept = _report(cuda_results, "kept")
    offloaded = _report(cuda_results, "offloaded")
    assert offloaded.settings["activation_offloading"]
    layer_inputs = 2 * 2 * 512 * 1024 * 2  # layers x batch x seq x hidden x bf16
    assert kept.breakdown["forward"] - offloaded.breakdown.get("forward", 0) >= layer_inputs
    assert offloaded.peak_bytes < kept.peak_bytes


def test_tiled_mlp_keeps_a_slice_of_the_mlp_activations_in_backward(cuda_results):
    kept, tiled = _report(cuda_results, "kept"), _report(cuda_results, "tiled")
    assert tiled.settings["mlp_chunk_tokens"] == 128 and tiled.peak_phase == kept.peak_phase == "backward"
    # The recomputed layer's MLP holds gate and up outputs (batch x seq x intermediate, bf16) at least;
    # slices of 128 of the 512 tokens keep a quarter of them.
    mlp_outputs = 2 * (2 * 512 * 2048 * 2)
    assert kept.breakdown["backward"] - tiled.breakdown["backward"] >= mlp_outputs * 3 / 4
    _assert_on_gpu(tiled)


def test_longest_sequence_is_monotone_in_memory(cuda_results):
    small, large = cuda_results["longest_small"], cuda_results["longest_large"]
    assert 0 < small < large <= 512  # the tiny Llama's max_position_embeddings caps the search
    assert small % mp.SEQ_GRANULARITY == 0 and large % mp.SEQ_GRANULARITY == 0


def test_plan_render_names_every_breakdown_line(cuda_results):
    data = cuda_results["plan"]
    plan = mp.Plan(gpu_bytes=data["gpu_bytes"], report=mp.MemoryReport.from_dict(data["report"]))
    assert plan.fits
    text = plan.render()
    for key, label in mp.CATEGORIES.items():
        if key != "setup":
            assert label in text, label
    assert mp.OVERHEAD_LABEL in text and "simulated" in text and "fits" in text


def test_worker_reports_a_missing_model_as_the_users_error(cuda_results):
    error = cuda_results["missing"]
    assert isinstance(error, QLoRAKitError)
    assert "no-such-model" in str(error)


# ---------------------------------------------------------------- (d) bad input


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "hidden_size": 64}))
    with pytest.raises(QLoRAKitError, match="unknown model type 'no-such-architecture'"):
        mp.simulate_step(_run(tmp_path), device="cpu")
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(QLoRAKitError, match="unknown model type"):
        mp.model_config(ModelConfig(base=str(config)))


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 100, "num_attention_heads": 3}, "cannot be built.*(not a multiple|not divisible)"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"intermediate_size": -8}, "intermediate_size must be a positive integer"),
])
def test_config_whose_shapes_cannot_be_built(tmp_path, change, message):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    config.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(QLoRAKitError, match=message):
        mp.simulate_step(_run(path), device="cpu")


@pytest.mark.parametrize("text", ["lots", "24 parsecs", "-3GB", "0GB", ""])
def test_gpu_memory_that_does_not_parse(text):
    with pytest.raises(QLoRAKitError, match="invalid GPU memory"):
        mp.parse_gpu_memory(text)
    with pytest.raises(QLoRAKitError, match="invalid GPU memory"):
        mp.plan(RunConfig(), text)


def test_gpu_memory_units():
    assert mp.parse_gpu_memory("24GiB") == 24 * 2**30
    assert mp.parse_gpu_memory("80GB") == 80 * 10**9
    assert mp.parse_gpu_memory(1000) == 1000


def test_bundled_shapes_resolve_by_hub_id():
    config = mp.model_config(ModelConfig(base="meta-llama/Llama-3.2-1B-Instruct"))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (2048, 16, 128256)
    config = mp.model_config(ModelConfig(base="meta-llama/Llama-3.1-8B"))  # the base model: the same shapes
    assert config.intermediate_size == 14336


# ---------------------------------------------------------------- activation offloading (qlora_kit.offload)


def test_activation_offloading_is_a_logged_no_op_on_the_cpu(caplog):
    from torch import nn

    from qlora_kit.offload import enable_activation_offloading

    with caplog.at_level("INFO", logger="qlora_kit.offload"):
        assert enable_activation_offloading(nn.Linear(2, 2), "cpu") is None
    assert "nothing to do on cpu" in caplog.text


def test_offloaded_saved_tensors_give_the_same_gradients(tiny_llama_dir):
    """The hooks' pack/unpack round trip (here CPU to CPU, every tensor) changes no gradient."""
    import torch

    from qlora_kit import load_base
    from qlora_kit.lora import apply_lora, trainable_parameters
    from qlora_kit.losses import SupervisedLoss
    from qlora_kit.offload import OffloadSavedTensors
    from qlora_kit.training import enable_checkpointing

    model, _, _ = load_base(ModelConfig(base=str(tiny_llama_dir), device="cpu"))
    apply_lora(model)
    enable_checkpointing(model)
    model.train()
    torch.manual_seed(0)
    for p in trainable_parameters(model):
        torch.nn.init.normal_(p, std=0.02)
    for module in model.modules():  # LoRA dropout off: two passes must compute the same thing
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout = torch.nn.Identity()
    ids = torch.randint(0, 1000, (2, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_fn = SupervisedLoss(model)

    def grads(hooks):
        model.zero_grad(set_to_none=True)
        with hooks:
            loss, _ = loss_fn(batch)
        loss.backward()
        return [p.grad.clone() for p in trainable_parameters(model)]

    import contextlib

    offload = OffloadSavedTensors("cpu", pin_memory=False, min_bytes=0)
    reference = grads(contextlib.nullcontext())
    moved = grads(offload)
    assert offload.offloaded_bytes > 0
    for a, b in zip(reference, moved):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_llama_8b_step_on_the_simulated_gpu_counts_the_4bit_weights_exactly():
    """Llama-3.1-8B from its bundled config: the 4-bit bytes are bitsandbytes' layout, to the byte."""
    run = RunConfig(model=ModelConfig(base="meta-llama/Llama-3.1-8B-Instruct"))
    report = mp.simulate_step(run, batch_size=1, seq_len=2048)
    config = mp.model_config(run.model)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * layers  # q k v o gate up down
    expected = 0
    for a, b in shapes:
        n = a * b
        blocks = -(-n // 64)
        # packed NF4 + uint8 absmax + fp32 nested absmax + 16-value code + offset + 256-value nested code
        expected += n // 2 + blocks + 4 * -(-blocks // 256) + 4 * 16 + 4 + 4 * 256
    assert report.sizes["weights_4bit"] == expected
    bf16_params = 2 * (2 * config.vocab_size * h + (2 * layers + 1) * h)  # embedding, head, norms
    assert 0 <= report.sizes["weights_16bit"] - bf16_params < 4096  # + the rotary inv_freq buffer
    _assert_on_gpu(report)
    assert 6 * 2**30 < report.peak_bytes < 9 * 2**30

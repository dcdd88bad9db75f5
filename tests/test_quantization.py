"""4-bit quantization against transformers' own BitsAndBytesConfig, and the CPU gradient guard."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_kit import LoRAConfig, QuantConfig, apply_lora, load_base
from qlora_kit.lora import lora_layers
from qlora_kit.quantization import dequantize_weight, is_4bit_linear, quantized_bytes


def transformers_4bit(folder, quant_type="nf4", double_quant=True):
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16, device_map="cpu")


def test_nf4_double_quant_is_bit_identical_to_transformers(smollm2_dir, smollm2_4bit):
    ours = smollm2_4bit[0].state_dict()
    theirs = transformers_4bit(smollm2_dir).state_dict()
    assert set(ours) == set(theirs)
    quant_keys = [k for k in theirs if k.endswith("quant_state.bitsandbytes__nf4")]
    assert len(quant_keys) == 30 * 7  # every projection of all 30 layers is 4-bit, lm_head is not
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("quant_type,double_quant", [("fp4", True), ("nf4", False)])
def test_other_settings_match_transformers(tiny_llama_dir, quant_type, double_quant):
    ours, _, _ = load_base(str(tiny_llama_dir), QuantConfig(quant_type=quant_type, double_quant=double_quant))
    theirs = transformers_4bit(tiny_llama_dir, quant_type, double_quant).state_dict()
    for key, value in theirs.items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_storage_is_about_4_bits_per_parameter(smollm2_4bit):
    model = smollm2_4bit[0]
    layers = [m for m in model.modules() if is_4bit_linear(m)]
    values = sum(m.weight.quant_state.shape.numel() for m in layers)
    # Per-value storage: packed 4-bit codes, one uint8 absmax per 64 values, one fp32
    # second-level constant per 256 absmax = 4 + 8/64 + 32/(64*256) = 4.127 bits (QLoRA paper).
    per_value_bytes = sum(
        m.weight.data.numel() + m.weight.quant_state.absmax.numel() + m.weight.quant_state.state2.absmax.numel() * 4
        for m in layers
    )
    assert per_value_bytes * 8 / values == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    # Everything, fixed per-layer code books included, stays close to that.
    assert 4.12 < quantized_bytes(model) * 8 / values < 4.16


def test_unquantized_modules_stay_in_compute_dtype(smollm2_4bit):
    model = smollm2_4bit[0]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())


def test_dequantized_weight_is_close_to_the_original(tiny_llama_dir):
    from safetensors.torch import load_file

    model, _, _ = load_base(str(tiny_llama_dir))
    original = load_file(tiny_llama_dir / "model.safetensors")["model.layers.0.mlp.down_proj.weight"].float()
    restored = dequantize_weight(model.model.layers[0].mlp.down_proj).float()
    # NF4 keeps roughly 1/16 of a block's absmax as resolution: errors are small but non-zero.
    assert restored.shape == original.shape
    assert 0 < (restored - original).abs().mean() < 0.1 * original.abs().mean()


def test_generate_then_train_still_gives_lora_gradients(tiny_llama_dir):
    """Guards the bitsandbytes CPU bug: an eval no-grad forward must not freeze 4-bit layers."""
    model, tokenizer, _ = load_base(str(tiny_llama_dir))
    assert all(m.support_avx512bf16_for_cpu is False for m in model.modules() if is_4bit_linear(m))
    apply_lora(model, LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"], dropout=0.0))
    ids = tokenizer("a short prompt", return_tensors="pt")
    model.generate(**ids, max_new_tokens=3, do_sample=False)
    model.train()
    for _, layer in lora_layers(model):  # B = 0 would give A no gradient; make both flow
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    for name, layer in lora_layers(model):
        for part in (layer.lora_A, layer.lora_B):
            assert part.weight.grad is not None, name
            assert part.weight.grad.abs().sum() > 0, name


@pytest.mark.cuda
def test_cuda_quantization_matches_transformers(tiny_llama_dir):
    from qlora_kit import ModelConfig

    ours, _, _ = load_base(ModelConfig(base=str(tiny_llama_dir), device="cuda"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, dtype=torch.bfloat16,
                                                  device_map="cuda")
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key].cpu(), value.cpu()), key
    assert ours.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"


@pytest.mark.cuda
def test_cuda_bf16_forward_and_backward(tiny_llama_dir):
    from qlora_kit import ModelConfig

    model, tokenizer, _ = load_base(ModelConfig(base=str(tiny_llama_dir), device="cuda"))
    apply_lora(model, LoRAConfig(rank=4, dtype="bfloat16"))
    model.train()
    ids = tokenizer("hello there", return_tensors="pt").to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(layer.lora_B.weight.grad is not None for _, layer in lora_layers(model))


# --- the CPU NF4 quantizer: bitsandbytes' bytes from a table lookup instead of bucketize ---------------


def _nf4_bounds():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    return _get_4bit_quantize_bounds("nf4", torch.device("cpu"))[0]


def _walk_ulps(points, steps: int) -> torch.Tensor:
    """Each point and the `steps` fp32 values on either side of it."""
    x = torch.tensor(points, dtype=torch.float32)
    up, down, out = x.clone(), x.clone(), [x]
    for _ in range(steps):
        up, down = torch.nextafter(up, torch.full_like(up, 2)), torch.nextafter(down, torch.full_like(down, -2))
        out += [up, down]
    return torch.cat(out).clamp(-1, 1)


def test_nf4_codes_equal_bucketize_at_every_decision_point():
    """Around each boundary and each bin edge of the table (300 ulps either side), and at random."""
    from qlora_kit import quantization

    bounds = _nf4_bounds()
    edges = [-1 + j * 2 / quantization._NF4_BINS for j in range(quantization._NF4_BINS + 1)]
    x = torch.cat([_walk_ulps(bounds.tolist() + [-1.0, -0.0, 0.0, 1.0], 300), _walk_ulps(edges, 3),
                   torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    expected = torch.bucketize(x, bounds, out_int32=True).to(torch.uint8)
    assert torch.equal(quantization._nf4_codes(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_is_bitsandbytes_bit_for_bit(dtype, double_quant, quant_type):
    import bitsandbytes.functional as bnbF

    from qlora_kit import quantization

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(1030, 576, generator=g) * 0.05  # 1030 rows: several row chunks, the last one short
    weight[3, :64] = 0  # an all-zero block
    weight[5, 64:128] = 0.25  # a constant block: every value on the absmax
    weight[7] *= 1e4  # huge and tiny magnitudes
    weight[9] *= 1e-6
    weight = weight.to(dtype)
    for storage in (torch.uint8, torch.bfloat16):
        ours, state = quantization.quantize_4bit(weight, quant_type=quant_type, double_quant=double_quant,
                                                 quant_storage=storage)
        theirs, ref = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=quant_type,
                                         quant_storage=storage)
        assert ours.dtype == theirs.dtype and torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
        assert torch.equal(state.absmax, ref.absmax)
        if double_quant:
            assert torch.equal(state.offset, ref.offset) and torch.equal(state.state2.absmax, ref.state2.absmax)
        assert torch.equal(bnbF.dequantize_4bit(ours, state), bnbF.dequantize_4bit(theirs, ref))


def test_non_finite_weights_quantize_as_bitsandbytes_does():
    import bitsandbytes.functional as bnbF

    from qlora_kit import quantization

    weight = torch.randn(8, 128)
    weight[1, 3], weight[2, 70], weight[4, 5] = float("nan"), float("inf"), -float("inf")
    ours, _ = quantization.quantize_4bit(weight, double_quant=False)
    theirs, _ = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(ours, theirs)

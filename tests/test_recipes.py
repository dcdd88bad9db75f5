"""Every shipped recipe parses, validates, and builds its 4-bit model skeleton with LoRA targets.

Recipes name Hub models that cannot be downloaded in tests, so each model's public
config.json ships in recipes/configs/ and the skeleton is built on the meta device
from it: no weights, no network. The parameter counts checked against the
published model sizes keep those config copies honest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from qlora_kit.loading import build_skeleton
from qlora_kit.lora import select_targets
from qlora_kit.packaged import SMOLLM2_NAME
from qlora_kit.quantization import is_4bit_linear
from qlora_kit.settings import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# recipe -> (config copy in recipes/configs, decoder layers, published parameter count).
# Every layer has 7 linears (q, k, v, o, gate, up, down); lm_head stays in 16 bits.
MODELS = {
    "quickstart.yaml": (None, 30, 134_515_008),
    "smollm2-spam.yaml": (None, 30, 134_515_008),  # the same base, built as a classifier (head unquantized)
    "llama-3.1-8b-alpaca.yaml": ("llama-3.1-8b-instruct.json", 32, 8_030_261_248),
    "mistral-7b-chat.yaml": ("mistral-7b-instruct-v0.3.json", 32, 7_248_023_552),
    "qwen2.5-7b-chat.yaml": ("qwen2.5-7b-instruct.json", 28, 7_615_616_512),
    "gemma-2-9b-alpaca.yaml": ("gemma-2-9b-it.json", 42, 9_241_705_984),
    "llama-3.1-70b-fsdp.yaml": ("llama-3.1-70b-instruct.json", 80, 70_553_706_496),
}


def test_every_recipe_is_covered():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recipe_starts_with_its_command_and_comments_every_knob(name):
    lines = (RECIPES / name).read_text().splitlines()
    if load_recipe(RECIPES / name).train.distributed == "fsdp":  # several GPUs: Accelerate's launcher starts it
        assert lines[0].startswith("# accelerate launch --num_processes ")
        assert lines[0].endswith(f" -m qlora_kit train recipes/{name}")
    else:
        assert lines[0] == f"# qlora-kit train recipes/{name}"
    for line in lines:
        if line.startswith("  ") and ":" in line and not line.strip().startswith("#"):
            assert "#" in line, f"{name}: knob without a comment: {line.strip()}"


def _model_config(name: str, run, smollm2_dir):
    config_file = MODELS[name][0]
    if config_file is None:
        assert run.model.base == SMOLLM2_NAME
        return AutoConfig.from_pretrained(smollm2_dir)
    data = json.loads((RECIPES / "configs" / config_file).read_text())
    assert run.model.base.lower().endswith(config_file.removesuffix(".json"))
    return AutoConfig.for_model(**data)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recipe_builds_its_4bit_skeleton_and_finds_lora_targets(name, smollm2_dir):
    run = load_recipe(RECIPES / name)  # raises QLoRAKitError listing every problem
    config = _model_config(name, run, smollm2_dir)
    net = build_skeleton(config, run.quant, run.model)
    net.tie_weights()
    _, layers, published = MODELS[name]
    assert config.num_hidden_layers == layers
    n_4bit = sum(1 for m in net.modules() if is_4bit_linear(m))
    assert n_4bit == 7 * layers
    assert not is_4bit_linear(net.get_output_embeddings())
    targets = select_targets(net, run.lora.target_modules)
    assert len(targets) == 7 * layers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_copy_matches_the_published_model_size(name, smollm2_dir):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _model_config(name, load_recipe(RECIPES / name), smollm2_dir)
    with init_empty_weights():
        net = AutoModelForCausalLM.from_config(config)
    net.tie_weights()
    assert sum(p.numel() for p in net.parameters()) == MODELS[name][2]

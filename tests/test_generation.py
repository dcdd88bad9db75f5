"""Prompt formats for inference follow training's rendering; chat needs a template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qlora_kit.data import ALPACA_PROMPT, DataConfig
from qlora_kit.errors import QLoRAKitError
from qlora_kit.adapter_io import find_adapter
from qlora_kit.generation import prompt_format

USER = [{"role": "user", "content": "What is a bygglov?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_chat_template_by_default_and_plain_on_request(tokenizer):
    chat = prompt_format(tokenizer)
    assert chat.style == "chat" and not chat.add_special_tokens
    expected = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert chat.render(tokenizer, USER) == expected
    plain = prompt_format(tokenizer, use_template=False)
    assert plain.render(tokenizer, USER) == "What is a bygglov?" and plain.add_special_tokens


def test_a_run_trained_on_alpaca_prompts_is_prompted_the_same_way(tokenizer):
    fmt = prompt_format(tokenizer, DataConfig(path="x.jsonl", prompt_style="alpaca"))
    assert fmt.render(tokenizer, USER) == ALPACA_PROMPT.format(instruction="What is a bygglov?")
    with pytest.raises(QLoRAKitError, match="single-turn"):
        fmt.render(tokenizer, USER + [{"role": "assistant", "content": "A permit."}] + USER)


def test_a_run_with_its_own_chat_template_uses_it(tokenizer):
    fmt = prompt_format(tokenizer, DataConfig(path="x.jsonl", format="chat", chat_template="chatml"))
    assert fmt.render(tokenizer, USER).endswith("<|im_start|>user\nWhat is a bygglov?<|im_end|>\n<|im_start|>assistant\n")


def test_find_adapter_names_what_is_missing(tmp_path):
    with pytest.raises(QLoRAKitError, match="not found"):
        find_adapter(tmp_path / "nope")
    with pytest.raises(QLoRAKitError, match="neither an adapter folder"):
        find_adapter(tmp_path)

"""Tests for qlora_kit.data against the real SmolLM2 tokenizer and real files."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qlora_kit.data import (
    IGNORE_INDEX,
    DataConfig,
    batch_indices,
    batches,
    block_causal_mask,
    collate,
    count_supervised_tokens,
    load_rows,
    pack,
    prepare_data,
    split_indices,
)
from qlora_kit.errors import QLoRAKitError
from qlora_kit.packaged import smollm2_path

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module")
def tok_no_template():
    t = AutoTokenizer.from_pretrained(smollm2_path())
    t.chat_template = None  # what a base model's tokenizer looks like
    return t


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def supervised_text(tok, example) -> str:
    return tok.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])


def prepare(tok, tmp_path, rows, seed=0, **cfg):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg.setdefault("eval_fraction", 0.0)
    return prepare_data(DataConfig(path=path, **cfg), tok, seed=seed)


ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
]


# ---------------------------------------------------------------- label masking and EOS


@pytest.mark.parametrize("style", ["chat_template", "alpaca"])
def test_instruction_supervises_only_response_and_eos(tok, tmp_path, style):
    data = prepare(tok, tmp_path, ALPACA_ROWS, format="instruction", prompt_style=style)
    for ex, row in zip(data.train, ALPACA_ROWS):
        assert supervised_text(tok, ex) == row["output"] + EOS
        last = max(i for i, l in enumerate(ex["labels"]) if l != IGNORE_INDEX)
        assert ex["input_ids"][last] == tok.eos_token_id
        # Everything before the response is masked: the supervised block is one contiguous tail.
        first = next(i for i, l in enumerate(ex["labels"]) if l != IGNORE_INDEX)
        assert all(l == IGNORE_INDEX for l in ex["labels"][:first])
        assert ex["labels"][first : last + 1] == ex["input_ids"][first : last + 1]
        prompt = tok.decode(ex["input_ids"][:first])
        assert row["instruction"] in prompt and row["output"] not in prompt
    if style == "alpaca":
        assert "### Input:\n2 and 3" in tok.decode(data.train[1]["input_ids"])
    else:
        assert tok.decode(data.train[0]["input_ids"]).endswith("<|im_start|>assistant\nBlue is a colour.<|im_end|>\n")


def test_instruction_default_uses_chat_template_and_tokens_match_the_template(tok, tmp_path):
    data = prepare(tok, tmp_path, ALPACA_ROWS[:1], format="instruction")
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is a colour."}]
    # The template's own tokenization (ends "<|im_end|>\n"): ours is the same minus the trailing newline's label.
    expected = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert data.train[0]["input_ids"] == expected
    assert data.train[0]["labels"][-1] == IGNORE_INDEX  # the "\n" after <|im_end|> is not learned
    assert supervised_text(tok, data.train[0]) == "Blue is a colour." + EOS


def test_multi_turn_chat_supervises_every_assistant_turn(tok, tmp_path):
    # The user says "Yes." before the assistant does: the boundary must still land on the reply.
    rows = [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Yes."},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "And the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]}]
    ex = prepare(tok, tmp_path, rows, format="chat").train[0]
    assert supervised_text(tok, ex) == "Yes." + EOS + "Paris." + EOS
    # Each turn's supervised tokens are exactly the tokens of content + <|im_end|>, right after the header.
    ids, labels = ex["input_ids"], ex["labels"]
    runs, i = [], 0
    while i < len(labels):
        if labels[i] != IGNORE_INDEX:
            j = i
            while j < len(labels) and labels[j] != IGNORE_INDEX:
                j += 1
            runs.append((i, j))
            i = j
        i += 1
    assert [tok.decode(ids[a:b]) for a, b in runs] == ["Yes." + EOS, "Paris." + EOS]
    for a, _ in runs:
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")


def test_sharegpt_conversations_map_roles(tok, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    ex = prepare(tok, tmp_path, rows, format="chat").train[0]
    text = tok.decode(ex["input_ids"])
    assert "<|im_start|>user\nHi<|im_end|>" in text and "<|im_start|>assistant\nHello!" in text
    assert supervised_text(tok, ex) == "Hello!" + EOS


def test_text_format_supervises_everything_and_appends_eos(tok, tmp_path):
    ex = prepare(tok, tmp_path, [{"text": "The cat sat on the mat."}], format="text").train[0]
    expected = tok("The cat sat on the mat.")["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == expected
    # The first token is never a target (nothing precedes it); all the rest are.
    assert ex["labels"] == [IGNORE_INDEX] + expected[1:]


def test_train_on_prompt_supervises_prompt_too(tok, tmp_path):
    ex = prepare(tok, tmp_path, ALPACA_ROWS[:1], format="instruction", train_on_prompt=True).train[0]
    assert ex["labels"][1:] == ex["input_ids"][1:]


def test_chatml_fallback_when_tokenizer_has_no_template(tok_no_template, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    ex = prepare(tok_no_template, tmp_path, rows, format="chat", chat_template="chatml").train[0]
    assert tok_no_template.decode(ex["input_ids"]).startswith("<|im_start|>user\nHi<|im_end|>\n")  # no system prompt
    assert supervised_text(tok_no_template, ex) == "Hello!" + EOS
    with pytest.raises(QLoRAKitError, match="no chat template.*chat_template"):
        prepare(tok_no_template, tmp_path, rows, format="chat")
    # Instruction rows fall back to the Alpaca prompt when there's no template.
    ex = prepare(tok_no_template, tmp_path, ALPACA_ROWS[:1], format="instruction").train[0]
    assert "### Response:\n" in tok_no_template.decode(ex["input_ids"])


# ---------------------------------------------------------------- truncation and validation


def test_truncation_is_counted_and_unsupervised_rows_reported(tok, tmp_path):
    long_answer = {"instruction": "Count.", "input": "", "output": " ".join(["one"] * 200)}
    data = prepare(tok, tmp_path, [long_answer, ALPACA_ROWS[0]], format="instruction", max_seq_len=64)
    assert data.stats["truncated"] == 1
    assert len(data.train[0]["input_ids"]) == 64 and data.train[0]["labels"][-1] != IGNORE_INDEX
    long_prompt = {"instruction": " ".join(["word"] * 200), "input": "", "output": "Short."}
    with pytest.raises(QLoRAKitError) as err:
        prepare(tok, tmp_path, [ALPACA_ROWS[0], long_prompt], format="instruction", max_seq_len=64)
    assert "row 2: no supervised token" in str(err.value)


def test_malformed_rows_reported_together(tok, tmp_path):
    rows = [dict(r) for r in ALPACA_ROWS * 3][:6]
    del rows[2]["output"]
    rows[4]["output"] = 42
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(QLoRAKitError) as err:
        prepare_data(DataConfig(path=path, format="instruction"), tok, seed=0)
    msg = str(err.value)
    assert path in msg and "2 bad row(s)" in msg
    assert "row 3: missing 'output'" in msg and "row 5: 'output' is int" in msg
    assert "row 1" not in msg and "row 4" not in msg


def test_malformed_chat_rows(tok, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ] + [{"messages": [{"role": "user", "content": "Hi"}]}] * 12
    with pytest.raises(QLoRAKitError) as err:
        prepare(tok, tmp_path, rows, format="chat")
    msg = str(err.value)
    assert "row 2: no assistant turn" in msg and "row 3: message 1 has role 'robot'" in msg
    assert "and 4 more" in msg  # 14 problems, 10 listed


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(QLoRAKitError, match="nope.jsonl does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    txt = tmp_path / "d.txt"
    txt.write_text("hello\n")
    with pytest.raises(QLoRAKitError, match=r"unsupported extension '\.txt'.*\.csv.*\.jsonl.*\.parquet"):
        load_rows(str(txt))


def test_csv_and_parquet_load(tmp_path):
    import pandas as pd

    df = pd.DataFrame(ALPACA_ROWS)
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ["d.csv", "d.parquet"]:
        rows = load_rows(str(tmp_path / name))
        assert [r["output"] for r in rows] == [r["output"] for r in ALPACA_ROWS]


def test_config_problems():
    from qlora_kit.config import make

    assert DataConfig(path="x.jsonl").problems() == []
    assert DataConfig().problems() != []  # no path
    with pytest.raises(QLoRAKitError, match="eval_fraction: must be >= 0 and < 1"):
        make(DataConfig, path="x.jsonl", eval_fraction=1.0)


# ---------------------------------------------------------------- splits


def test_eval_fraction_split_deterministic_and_disjoint(tok, tmp_path):
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(40)]
    a = prepare(tok, tmp_path, rows, seed=7, format="instruction", eval_fraction=0.25)
    b = prepare(tok, tmp_path, rows, seed=7, format="instruction", eval_fraction=0.25)
    c = prepare(tok, tmp_path, rows, seed=8, format="instruction", eval_fraction=0.25)
    assert len(a.eval) == 10 and len(a.train) == 30
    key = lambda exs: [tuple(e["input_ids"]) for e in exs]
    assert key(a.eval) == key(b.eval) and key(a.train) == key(b.train)
    assert key(a.eval) != key(c.eval)
    assert not set(key(a.eval)) & set(key(a.train))
    train_idx, eval_idx = split_indices(40, 0.25, 7)
    assert sorted(train_idx + eval_idx) == list(range(40))
    # Held-out prompts end where the model should start answering and come with the reference.
    assert len(a.eval_prompts) == 4 and a.eval_prompts[0].endswith("<|im_start|>assistant\n")
    assert a.eval_prompt_ids[0] == tok(a.eval_prompts[0], add_special_tokens=False)["input_ids"]
    for prompt, reference in zip(a.eval_prompts, a.eval_references):
        number = reference.removeprefix("Answer ").removesuffix(".")
        assert f"Question {number}?" in prompt


def test_eval_file_and_max_samples(tok, tmp_path):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", ALPACA_ROWS[1:])
    data = prepare(tok, tmp_path, ALPACA_ROWS * 5, format="instruction", eval_file=eval_path, max_samples=3)
    assert data.stats["rows"] == 3 and len(data.train) == 3 and len(data.eval) == 1
    assert supervised_text(tok, data.eval[0]) == ALPACA_ROWS[1]["output"] + EOS


def test_real_zaragoza_alpaca_file(tok):
    folder = Path(importlib.util.find_spec("zaragoza_construction_faq").submodule_search_locations[0]) / "data"
    path = str(folder / "faq-en-alpaca.jsonl")
    data = prepare_data(DataConfig(path=path, format="instruction", eval_fraction=0.05), tok, seed=0)
    assert data.stats["rows"] == 503
    assert len(data.train) + len(data.eval) == 503 and len(data.eval) == 25
    rows = load_rows(path)
    by_output = {r["output"] + EOS for r in rows}
    assert all(supervised_text(tok, e) in by_output for e in data.train[:20])


# ---------------------------------------------------------------- packing


def tiny_llama(tok, attn):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packing_does_not_leak_across_samples(tok, tmp_path, attn):
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
        {"instruction": "What is two plus three?", "input": "", "output": "Five."},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    plain = prepare(tok, tmp_path, rows, format="instruction", prompt_style="alpaca", max_seq_len=4096)
    packed = pack(plain.train[:2], max_seq_len=4096, seed=0) + [plain.train[2]]  # 1 packed row, 1 padded row
    assert len(packed) == 2
    row = packed[0]
    n1 = row["position_ids"].index(0, 1)
    assert row["position_ids"] == list(range(n1)) + list(range(len(row["input_ids"]) - n1))
    first, second = row["input_ids"][:n1], row["input_ids"][n1:]

    batch = collate(packed, plain.pad_id)
    assert batch["attention_mask"].shape == (2, 1, len(row["input_ids"]), len(row["input_ids"]))
    model = tiny_llama(tok, attn)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).logits
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in (first, second, plain.train[2]["input_ids"])]
        naive = model(input_ids=batch["input_ids"][:1]).logits[0]
    torch.testing.assert_close(out[0, :n1], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0, n1:], alone[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, : len(alone[2])], alone[2], atol=1e-5, rtol=1e-4)
    assert not torch.isnan(out).any()
    # Without the mask the second sample does see the first: the test can tell the difference.
    assert (naive[n1:] - alone[1]).abs().max() > 1e-3

    # The packed row's loss targets are exactly the two samples' targets.
    assert count_supervised_tokens(batch) == sum(count_supervised_tokens(collate([e], 2)) for e in plain.train)


def test_prepare_with_packing_reports_rows(tok, tmp_path):
    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(30)]
    plain = prepare(tok, tmp_path, rows, format="instruction", max_seq_len=256)
    packed = prepare(tok, tmp_path, rows, format="instruction", max_seq_len=256, packing=True)
    assert packed.stats["packed_rows"] == len(packed.train) < len(plain.train)
    assert all(len(r["input_ids"]) <= 256 for r in packed.train)
    assert sum(len(r["input_ids"]) for r in packed.train) == plain.stats["tokens"]
    assert packed.stats["supervised_tokens"] == plain.stats["supervised_tokens"]


def test_block_causal_mask_by_hand():
    pos = torch.tensor([[0, 1, 0, 1, 2, 0]])  # samples of 2 and 3 tokens, then one pad
    m = block_causal_mask(pos, torch.tensor([5]))[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


# ---------------------------------------------------------------- batching


def test_collate_pads_and_counts_supervised_tokens():
    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10], "labels": [-100, 10]},
    ]
    batch = collate(examples, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 2, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert "position_ids" not in batch
    assert count_supervised_tokens(batch) == 3


def test_batches_are_seeded_and_resumable():
    examples = [{"input_ids": [i]} for i in range(10)]
    epoch0 = list(batches(examples, 3, seed=1, epoch=0))
    assert [len(b) for b in epoch0] == [3, 3, 3, 1]
    assert sorted(e["input_ids"][0] for b in epoch0 for e in b) == list(range(10))
    assert epoch0 == list(batches(examples, 3, seed=1, epoch=0))
    assert epoch0 != list(batches(examples, 3, seed=1, epoch=1))
    assert list(batches(examples, 3, seed=1, epoch=0, start=2)) == epoch0[2:]
    assert batch_indices(10, 3, 1, 0)[2] == [e["input_ids"][0] for e in epoch0[2]]


def test_package_paths_resolve_to_installed_data():
    from qlora_kit.data import load_rows, resolve_package_path

    path = resolve_package_path("pkg://zaragoza_construction_faq/data/faq-en-alpaca.jsonl")
    assert path.endswith("zaragoza_construction_faq/data/faq-en-alpaca.jsonl")
    assert len(load_rows("pkg://zaragoza_construction_faq/data/faq-en-alpaca.jsonl")) == 503
    with pytest.raises(QLoRAKitError, match="not installed"):
        resolve_package_path("pkg://no_such_package_here/data.jsonl")


def test_malformed_jsonl_lines_are_reported_with_their_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "cut off\n\n[1, 2]\n{"text": "fine"}\n')
    with pytest.raises(QLoRAKitError) as err:
        load_rows(str(path))
    text = str(err.value)
    assert "line 2: not valid JSON" in text and "line 4: a JSON list, not an object" in text
    assert "  line 1:" not in text and "  line 5:" not in text


def test_empty_and_non_utf8_files_say_what_is_wrong(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(QLoRAKitError, match="holds no rows"):
        load_rows(str(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(QLoRAKitError, match=r"latin.jsonl:2: not valid UTF-8"):
        load_rows(str(latin))


def test_chat_rows_read_as_instructions_suggest_the_chat_format(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": "hello"}]}) + "\n"
                            for i in range(3)))
    with pytest.raises(QLoRAKitError, match="set data.format=chat"):
        prepare_data(DataConfig(path=str(path), format="instruction"), tok, seed=0)

"""The `qlora-kit` command line: user errors exit 2 without a traceback; train, generate, chat, eval, config."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kit.cli import main

ROWS = [
    {"instruction": f"What is the code word number {i}?", "input": "", "output": f"The code word is {w}."}
    for i, w in enumerate(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
                           "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"])
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(folder: Path, base: Path, data: Path, **train) -> Path:
    recipe = {
        "model": {"base": str(base)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"path": str(data), "max_seq_len": 64, "eval_fraction": 0.25},
        "train": {"output_dir": str(folder / "run"), "max_steps": 2, "batch_size": 4, "warmup_steps": 0,
                  "gradient_checkpointing": False, "eval_every": 0, "save_every": 0,
                  "sample_prompts": 1, "sample_max_new_tokens": 4, **train},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    """A 2-step training run on the tiny Llama, made through the CLI; returns its folder."""
    folder = tmp_path_factory.mktemp("cli-run")
    data = _write_jsonl(folder / "data.jsonl", ROWS)
    recipe = _recipe(folder, tiny_llama_dir, data, eval_batches=None)
    assert main(["train", str(recipe)]) == 0
    return folder / "run"


# ---------------------------------------------------------------- user errors


def test_bad_config_key_is_one_error_with_a_suggestion_and_no_traceback(tmp_path, tiny_llama_dir):
    recipe = _recipe(tmp_path, tiny_llama_dir, tmp_path / "data.jsonl")
    result = _cli("train", str(recipe), "train.learning_rat=1e-4")  # also checks `python -m qlora_kit.cli`
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1
    assert "train.learning_rat" in result.stderr and "did you mean 'learning_rate'" in result.stderr


def test_malformed_data_row_is_one_error_naming_the_row(tmp_path, tiny_llama_dir, capsys):
    data = _write_jsonl(tmp_path / "data.jsonl", ROWS[:5] + [{"instruction": "no answer here"}] + ROWS[5:])
    assert main(["train", str(_recipe(tmp_path, tiny_llama_dir, data))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("error:") == 1
    assert "row 6: missing 'output'" in err


def test_missing_files_are_clear_errors(tmp_path, tiny_llama_dir, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", str(_recipe(tmp_path, tiny_llama_dir, tmp_path / "missing.jsonl"))]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl does not exist" in err and "Traceback" not in err
    assert main(["generate", str(tmp_path / "no-run"), "--prompt", "hi"]) == 2
    assert "adapter or run folder not found" in capsys.readouterr().err


def test_generate_without_base_or_adapter_says_what_to_pass(capsys):
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "--base" in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(tiny_run, capsys):
    recipe = tiny_run.parent / "recipe.yaml"
    assert main(["train", str(recipe)]) == 2
    assert "already holds a run" in capsys.readouterr().err


# ---------------------------------------------------------------- train, generate, chat, eval


def test_train_leaves_the_run_folder(tiny_run, capsys):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "README.md", "samples.md", "adapter"):
        assert (tiny_run / name).exists(), name
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["steps"] == 2


def test_generate_from_a_run_folder_and_from_an_adapter_folder(tiny_run, tiny_llama_dir, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "What is the code word?", "--max-new-tokens", "5"]) == 0
    first = capsys.readouterr().out
    # The adapter folder alone: the base comes from its manifest; --base names it explicitly.
    assert main(["generate", "--adapter", str(tiny_run / "adapter"), "--base", str(tiny_llama_dir),
                 "--prompt", "What is the code word?", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == first  # greedy: the same reply
    assert main(["generate", "--base", str(tiny_llama_dir), "--prompt", "Hello", "--max-new-tokens", "3",
                 "--no-chat-template", "--temperature", "0.8", "--seed", "1"]) == 0


def test_eval_on_a_file_writes_loss_and_perplexity(tiny_run, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "held.jsonl", ROWS[:6])
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_run), "--data", str(data), "--json", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["examples"] == 6 and result["supervised_tokens"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-4)


def test_eval_of_a_run_reproduces_its_final_eval_loss(tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_run), "--json", str(out)]) == 0  # the run's own held-out split
    result = json.loads(out.read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert result["examples"] == summary["data"]["eval_examples"]
    # Training evaluates under bf16 autocast; this computes LoRA in fp32: close, not bit-equal.
    assert result["loss"] == pytest.approx(summary["final_eval_loss"], abs=0.05)


def test_chat_reads_piped_stdin_keeps_history_and_resets(tiny_run, monkeypatch, capsys):
    from qlora_kit.generation import ChatSession

    history_sizes = []
    send = ChatSession.send

    def recording_send(self, text, stream=None):
        history_sizes.append(len(self.messages))
        return send(self, text, stream)

    monkeypatch.setattr(ChatSession, "send", recording_send)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAgain\n\n/reset\nWhat is the code word?\n/exit\nnever\n"))
    assert main(["chat", str(tiny_run), "--max-new-tokens", "3"]) == 0
    assert history_sizes == [0, 2, 0]  # the second turn sees the first; /reset empties; /exit stops
    assert "history cleared" in capsys.readouterr().err


# ---------------------------------------------------------------- config reference


def test_config_prints_every_documented_knob(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in ("model.base", "quant.quant_type", "lora.rank", "data.packing", "train.learning_rate"):
        assert f"\n{key} (" in "\n" + out
    assert "lora.rank (int >= 1, default 16): adapter rank" in out
    assert "data:" in out and "data: the training data" in out  # every section documents itself
    assert main(["train", "--help-config"]) == 0
    assert capsys.readouterr().out == out
    assert main(["config", "train"]) == 0
    only_train = capsys.readouterr().out
    assert "train.max_steps" in only_train and "lora.rank" not in only_train
    assert main(["config", "nope"]) == 2


def test_config_documents_each_command_from_its_declaration(capsys):
    assert main(["config", "merge"]) == 0
    out = capsys.readouterr().out
    assert "min_agreement (float >= 0 and <= 1, default 0.98)" in out and "adapter (str, required)" in out


# ---------------------------------------------------------------- options derived from declarations


def test_command_options_are_checked_together_and_name_the_flag(capsys):
    status = main(["merge", "a", "b", "--mode", "x", "--verify", "-1", "--min-agreement", "2", "--dtype", "bf16"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("error:") == 1 and "4 problems" in err
    for line in ("--mode: expected one of nf4, original; got 'x'", "--verify: must be >= 0, got -1",
                 "--min-agreement: must be >= 0 and <= 1", "--dtype: expected one of bfloat16, float16, float32"):
        assert line in err
    assert "qlora-kit merge --help" in err


def test_text_options_keep_what_was_typed(tiny_llama_dir, capsys):
    from qlora_kit.cli import build_parser, options_from_args
    from qlora_kit.settings import GenerateOptions

    args = build_parser().parse_args(["generate", "--base", str(tiny_llama_dir), "--prompt", "yes",
                                      "--max-new-tokens", "7", "--no-chat-template"])
    opts = options_from_args(GenerateOptions, args)
    assert opts.prompt == "yes" and opts.max_new_tokens == 7 and opts.no_chat_template is True
    assert opts.temperature == 0.0  # the declaration's default


def test_train_flag_habit_gets_the_override_spelling(tmp_path, tiny_llama_dir, capsys):
    recipe = _recipe(tmp_path, tiny_llama_dir, tmp_path / "data.jsonl")
    assert main(["train", str(recipe), "--max-steps", "5"]) == 2
    assert "train.max_steps=5" in capsys.readouterr().err


def test_version_and_help_do_not_import_the_heavy_libraries():
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("qlora-kit ")
    probe = subprocess.run([sys.executable, "-c", "import sys, qlora_kit.cli; "
                            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "[]"


def test_eval_max_samples_takes_only_held_out_rows(tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_run), "--max-samples", "2", "--json", str(out)]) == 0
    capped = json.loads(out.read_text())
    assert main(["eval", str(tiny_run), "--json", str(out)]) == 0
    whole = json.loads(out.read_text())
    assert capped["examples"] == 2 and whole["examples"] == 4  # 16 rows, eval_fraction 0.25
    assert capped["data"] == "held-out split of the run"


def test_export_gguf_merges_a_run_then_writes_a_verified_gguf(tiny_run, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "model.gguf"
    assert main(["export-gguf", str(tiny_run), str(out), "--verify", "1"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the temporary merge is gone
    assert main(["export-gguf", str(tiny_run), str(tmp_path / "lora.gguf"), "--adapter-only", "--type", "f16"]) == 0
    assert any(t.name.endswith(".lora_a") for t in gguf.GGUFReader(tmp_path / "lora.gguf").tensors)
    assert main(["export-gguf", str(tiny_run), str(out)]) == 2  # exists: refused without --overwrite


def test_plan_prints_a_simulated_breakdown_and_refuses_bad_input(tmp_path, tiny_llama_dir, capsys):
    recipe = _recipe(tmp_path, tiny_llama_dir, tmp_path / "data.jsonl")
    # overrides on both sides of the options, as for train
    assert main(["plan", str(recipe), "train.batch_size=2", "--no-search", "--gpu-memory", "8GiB",
                 "--json", str(tmp_path / "plan.json"), "data.max_seq_len=48"]) == 0
    out = capsys.readouterr().out
    assert "simulated" in out and "batch 2 x 48 tokens" in out and "fits" in out
    assert main(["plan", str(recipe), "--no-search", "train.batch_size=3"]) == 0  # only after the options
    assert "batch 3 x 64 tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "plan.json").read_text())
    assert main(["plan", str(recipe), "--gpu-memory", "lots"]) == 2
    assert "lots" in capsys.readouterr().err


def test_a_run_predicted_not_to_fit_stops_before_loading(tmp_path, tiny_llama_dir, monkeypatch):
    from qlora_kit import memory_plan
    from qlora_kit.errors import QLoRAKitError
    from qlora_kit.settings import load_recipe
    from qlora_kit.training import check_memory_plan

    monkeypatch.setattr(memory_plan, "preflight", lambda run: memory_plan.plan(run, 2**20, search=False))
    run = load_recipe(_recipe(tmp_path, tiny_llama_dir, tmp_path / "data.jsonl"))
    with pytest.raises(QLoRAKitError, match="ignore_memory_plan=true"):
        check_memory_plan(run)
    run.train.ignore_memory_plan = True
    check_memory_plan(run)  # told to go ahead

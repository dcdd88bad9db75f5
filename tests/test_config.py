"""Tests for the generic typed-config machinery, on dataclasses defined here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from qlora_kit.config import (
    bounded,
    describe,
    field_docs,
    from_dict,
    load_config,
    make,
    parse_overrides,
    save_config,
    to_dict,
)
from qlora_kit.errors import QLoRAKitError


@dataclass
class ModelCfg:
    """Which base model to load."""

    path: Optional[str] = None  # HF id or local folder
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # compute dtype


@dataclass
class LoraCfg:
    rank: int = 16  # higher = more capacity and memory
    alpha: float = 32.0  # scaling numerator
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"]
    )  # module name suffixes to adapt

    def problems(self) -> list[str]:
        return ["rank must be positive"] if self.rank <= 0 else []


@dataclass
class TrainCfg:
    max_steps: int = 100  # optimizer steps
    lr: float = 2e-4  # peak learning rate
    bf16: bool = True
    eval_steps: list[int] = field(default_factory=list)
    seed: int | None = None  # None = random


@dataclass
class RunCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    name: str = "run"  # run folder name

    def problems(self) -> list[str]:
        if self.train.max_steps < self.lora.rank:
            return ["train.max_steps must be at least lora.rank (silly rule for testing)"]
        return []


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(QLoRAKitError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ from_dict


def test_nested_build_and_defaults():
    cfg = from_dict(RunCfg, {"lora": {"rank": 8, "alpha": 16}, "train": {"eval_steps": [10, 20]}})
    assert cfg.lora.rank == 8
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)  # int accepted for float
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.eval_steps == [10, 20]
    assert cfg.model == ModelCfg()
    assert cfg.name == "run"


def test_unknown_key_suggests_and_lists_valid_keys():
    msg = error_of(from_dict, RunCfg, {"lora": {"rnak": 8}})
    assert "lora.rnak: unknown key; did you mean 'rank'?" in msg
    assert "rank, alpha, dropout, target_modules" in msg


def test_unknown_section_suggests():
    msg = error_of(from_dict, RunCfg, {"trian": {}})
    assert "trian: unknown key; did you mean 'train'?" in msg


def test_type_errors_name_expected_type():
    msg = error_of(from_dict, RunCfg, {"train": {"max_steps": "abc", "eval_steps": [1, "x"]}})
    assert "train.max_steps: expected int, got 'abc'" in msg
    assert "train.eval_steps[1]: expected int, got 'x'" in msg


def test_bool_is_not_an_int_or_float():
    msg = error_of(from_dict, RunCfg, {"train": {"max_steps": True, "lr": False}})
    assert "train.max_steps: expected int, got true (bool)" in msg
    assert "train.lr: expected float, got false (bool)" in msg


def test_float_accepts_exponent_string_from_yaml_1_1():
    cfg = from_dict(RunCfg, {"train": {"lr": "1e-4"}})
    assert cfg.train.lr == pytest.approx(1e-4)
    assert "train.lr: expected float" in error_of(from_dict, RunCfg, {"train": {"lr": "fast"}})


def test_literal_error_lists_choices():
    msg = error_of(from_dict, RunCfg, {"model": {"dtype": "int8"}})
    assert "model.dtype: expected one of bf16, fp16, fp32; got 'int8'" in msg


def test_optional_fields_accept_null_and_value():
    cfg = from_dict(RunCfg, {"model": {"path": None}, "train": {"seed": 3}})
    assert cfg.model.path is None and cfg.train.seed == 3
    assert "train.seed: expected int or null" in error_of(from_dict, RunCfg, {"train": {"seed": "x"}})
    assert "name: expected str, got null" in error_of(from_dict, RunCfg, {"name": None})


def test_section_given_a_non_mapping():
    msg = error_of(from_dict, RunCfg, {"lora": 8})
    assert "lora: expected a section (mapping of keys to values), got 8 (int)" in msg


def test_all_problems_reported_in_one_error_with_source_and_hint():
    data = {
        "lora": {"rnak": 8, "target_modules": "q_proj"},
        "train": {"max_steps": "abc"},
        "model": {"dtype": "int8"},
        "extra": 1,
    }
    msg = error_of(from_dict, RunCfg, data, source="run.yaml")
    assert msg.startswith("Invalid configuration (5 problems):")
    for expected in [
        "run.yaml: lora.rnak: unknown key",
        "run.yaml: lora.target_modules: expected list[str], got 'q_proj'",
        "run.yaml: train.max_steps: expected int, got 'abc'",
        "run.yaml: model.dtype: expected one of",
        "run.yaml: extra: unknown key",
    ]:
        assert expected in msg
    assert msg.splitlines()[-1].startswith("Fix these")


def test_problems_hook_prefixed_with_section():
    msg = error_of(from_dict, RunCfg, {"lora": {"rank": 0}})
    assert "lora: rank must be positive" in msg
    # The root's cross-section hook has no prefix.
    msg = error_of(from_dict, RunCfg, {"lora": {"rank": 64}, "train": {"max_steps": 10}})
    assert "  train.max_steps must be at least lora.rank" in msg


def test_problems_hook_reported_alongside_type_errors_of_other_sections():
    msg = error_of(from_dict, RunCfg, {"lora": {"rank": -1}, "model": {"dtype": "x"}})
    assert "lora: rank must be positive" in msg
    assert "model.dtype: expected one of" in msg


def test_problems_hook_skipped_for_section_with_type_errors():
    # rank fell back to its default, so a "rank must be positive" check would mislead.
    msg = error_of(from_dict, RunCfg, {"lora": {"rank": "zero"}})
    assert "rank must be positive" not in msg
    assert "Invalid configuration (1 problem):" in msg


def test_top_level_not_a_mapping():
    assert "expected a mapping" in error_of(from_dict, RunCfg, ["a"])


def test_path_prefix():
    msg = error_of(from_dict, LoraCfg, {"rank": "x"}, path_prefix="lora")
    assert "lora.rank: expected int" in msg


# ------------------------------------------------------------------ to_dict / save


def test_to_dict_round_trip():
    cfg = from_dict(RunCfg, {"lora": {"rank": 4, "target_modules": ["o_proj"]}, "train": {"seed": 1}})
    plain = to_dict(cfg)
    assert list(plain) == ["model", "lora", "train", "name"]
    assert plain["lora"] == {"rank": 4, "alpha": 32.0, "dropout": 0.05, "target_modules": ["o_proj"]}
    assert from_dict(RunCfg, plain) == cfg
    # to_dict copies: mutating the dict does not touch the config.
    plain["lora"]["target_modules"].append("x")
    assert cfg.lora.target_modules == ["o_proj"]


def test_save_config_atomic_and_loadable(tmp_path):
    cfg = from_dict(RunCfg, {"train": {"lr": 1e-5, "max_steps": 50}, "lora": {"rank": 8}})
    out = tmp_path / "runs" / "a" / "config.yaml"
    save_config(cfg, out)
    save_config(cfg, out)  # overwriting an existing file works too
    assert os.listdir(out.parent) == ["config.yaml"]  # no temp file left behind
    text = out.read_text()
    assert text.index("model:") < text.index("lora:") < text.index("train:")  # field order kept
    assert load_config(RunCfg, out) == cfg


def test_save_config_failure_leaves_old_file_intact(tmp_path):
    out = tmp_path / "config.yaml"
    save_config(RunCfg(), out)
    before = out.read_text()
    with pytest.raises(yaml.YAMLError):
        save_config({"bad": object()}, out)
    assert out.read_text() == before
    assert os.listdir(tmp_path) == ["config.yaml"]


# ------------------------------------------------------------------ overrides


def test_parse_overrides():
    tree = parse_overrides(
        [
            "train.max_steps=20",
            "lora.rank=8",
            "data.packing=true",
            "lora.target_modules=[q_proj,v_proj]",
            "model.path=null",
            "train.lr=1e-4",
            "name=a=b",
        ]
    )
    assert tree == {
        "train": {"max_steps": 20, "lr": 1e-4},
        "lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"packing": True},
        "model": {"path": None},
        "name": "a=b",
    }
    assert isinstance(tree["train"]["lr"], float)


def test_parse_overrides_malformed_items_all_listed():
    msg = error_of(parse_overrides, ["lora.rank", "=3", "train.max_steps=5", "a..b=1"])
    for bad in ["'lora.rank'", "'=3'", "'a..b=1'"]:
        assert f"override {bad}: expected the form section.key=value" in msg
    assert "train.max_steps=5" not in msg


# ------------------------------------------------------------------ load_config


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_config_yaml_with_overrides_on_top(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 4\n  alpha: 8\ntrain:\n  lr: 1e-4\n  max_steps: 10\n")
    cfg = load_config(RunCfg, path, ["lora.rank=2", "train.bf16=false"])
    assert cfg.lora.rank == 2 and cfg.lora.alpha == 8.0  # merged, not replaced
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.max_steps == 10
    assert cfg.train.bf16 is False


def test_load_config_without_file_uses_defaults_and_overrides():
    cfg = load_config(RunCfg, None, ["name=x"])
    assert cfg == RunCfg(name="x")


def test_load_config_empty_file_means_defaults(tmp_path):
    assert load_config(RunCfg, write(tmp_path, "")) == RunCfg()


def test_load_config_problems_from_file_and_overrides_together(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: abc\n")
    msg = error_of(load_config, RunCfg, path, ["lora.rnak=3"])
    assert "run.yaml: train.max_steps: expected int, got 'abc'" in msg
    assert "override: lora.rnak: unknown key; did you mean 'rank'?" in msg


def test_load_config_missing_file(tmp_path):
    msg = error_of(load_config, RunCfg, tmp_path / "nope.yaml")
    assert "config file not found:" in msg and "nope.yaml" in msg


def test_load_config_invalid_yaml_reports_line(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 4\n  alpha: [1, 2\ntrain: {}\n")
    msg = error_of(load_config, RunCfg, path)
    assert "invalid YAML in" in msg and "run.yaml" in msg
    assert "line 4" in msg


def test_load_config_top_level_not_mapping(tmp_path):
    msg = error_of(load_config, RunCfg, write(tmp_path, "- a\n- b\n"))
    assert "top level must be a mapping" in msg


def test_load_config_bad_yaml_and_bad_override_reported_together(tmp_path):
    msg = error_of(load_config, RunCfg, write(tmp_path, "a: [\n"), ["nokey"])
    assert "invalid YAML" in msg and "override 'nokey'" in msg


# ------------------------------------------------------------------ describe


def test_describe_lists_fields_with_types_defaults_and_comments():
    text = describe(RunCfg)
    lines = text.splitlines()
    assert "model: Which base model to load." in lines
    assert "model.path (str or null, default null): HF id or local folder" in lines
    assert "model.dtype (one of bf16, fp16, fp32, default bf16): compute dtype" in lines
    assert "lora.rank (int, default 16): higher = more capacity and memory" in lines
    assert "lora.dropout (float, default 0.05): Dropout on the LoRA input." in lines
    assert (
        "lora.target_modules (list[str], default [q_proj, v_proj]): module name suffixes to adapt"
        in lines
    )
    assert "train.bf16 (bool, default true)" in lines  # no comment: no trailing colon
    assert "train.seed (int or null, default null): None = random" in lines
    assert "name (str, default run): run folder name" in lines


def test_field_docs_inherited_and_graceful_without_source():
    @dataclass
    class Child(LoraCfg):
        extra: int = 1  # child doc

    docs = field_docs(Child)
    assert docs["rank"] == "higher = more capacity and memory" and docs["extra"] == "child doc"

    # A class with no retrievable source: describe still works, just without docs.
    ns: dict = {}
    exec("from dataclasses import dataclass\n@dataclass\nclass NoSrc:\n    x: int = 1  # hidden\n", ns)
    assert field_docs(ns["NoSrc"]) == {}
    assert describe(ns["NoSrc"]) == "x (int, default 1)"


def test_yaml_no_reads_as_the_no_choice():
    from dataclasses import dataclass
    from typing import Literal

    from qlora_kit.config import from_dict, parse_overrides

    @dataclass
    class Precision:
        mixed_precision: Literal["auto", "bf16", "no"] = "auto"

    assert from_dict(Precision, parse_overrides(["mixed_precision=no"])).mixed_precision == "no"


# ---------------------------------------------------------------- declared ranges


@dataclass
class Ranged:
    rate: float = bounded(1e-3, gt=0)  # a learning rate
    count: Optional[int] = bounded(None, ge=1)  # how many


def test_declared_ranges_are_checked_with_every_other_problem():
    with pytest.raises(QLoRAKitError) as err:
        from_dict(Ranged, {"rate": -1.0, "count": 0})
    text = str(err.value)
    assert "rate: must be > 0, got -1.0" in text and "count: must be >= 1, got 0" in text
    assert from_dict(Ranged, {"count": None}).count is None  # null stays allowed


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_floats_must_be_finite(value):
    with pytest.raises(QLoRAKitError, match="must be a finite number"):
        load_config(Ranged, None, [f"rate={value}"])


def test_ranges_show_in_the_reference_and_make_checks_library_calls():
    assert "rate (float > 0, default 0.001): a learning rate" in describe(Ranged)
    assert make(Ranged, rate=0.5).rate == 0.5
    with pytest.raises(QLoRAKitError, match="must be > 0"):
        make(Ranged, rate=0.0)


def test_run_config_ranges_cover_the_reported_holes():
    from qlora_kit.settings import RunConfig

    bad = ["lora.alpha=0", "train.max_grad_norm=-1", "train.eval_batches=0", "train.learning_rate=.nan",
           "train.weight_decay=-0.1", "train.sample_max_new_tokens=-1", "data.eval_fraction=1.5",
           "train.batch_size=two"]
    with pytest.raises(QLoRAKitError) as err:
        load_config(RunConfig, None, bad + ["data.path=x.jsonl"])
    text = str(err.value)
    # A range error is reported beside a type error; each is blamed on the command line, not a file.
    assert "8 problems" in text and text.count("override:") == 8
    for item in ("lora.alpha=-16", "train.learning_rate=.inf", "train.eval_batches=-1"):
        with pytest.raises(QLoRAKitError, match=item.split("=")[0]):
            load_config(RunConfig, None, [item, "data.path=x.jsonl"])

"""Property-based fuzzing: any config or data row gives a valid result or one clear error, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_kit.config import from_dict, load_config, to_dict
from qlora_kit.data import check_rows
from qlora_kit.errors import QLoRAKitError
from qlora_kit.settings import DataConfig, RunConfig

SECTIONS = {f.name: [g.name for g in dataclasses.fields(f.default_factory())] for f in dataclasses.fields(RunConfig)}
KEYS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["nf4", "fp4", "bfloat16", "cosine", "auto", "all-linear", "chat", "text", "yes", "no"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))
keys = st.one_of(st.sampled_from(KEYS), st.from_regex(r"[a-z]{1,6}\.[a-z_]{1,10}", fullmatch=True))


def _assert_outcome(build):
    """A valid config passes its own checks again; an error lists exactly the problems it counts, one a line."""
    try:
        run = build()
    except QLoRAKitError as err:
        text = str(err)
        match = re.match(r"Invalid configuration \((\d+) problems?\):\n", text)
        assert match, text
        listed = [line for line in text.splitlines()[1:] if line.startswith("  ")]
        assert len(listed) == int(match.group(1)), text
        return
    # Accepted: every declared range and type holds, so a second pass finds nothing.
    assert isinstance(run, RunConfig)
    assert from_dict(RunConfig, to_dict(run)) == run
    for section in SECTIONS:
        for value in dataclasses.asdict(getattr(run, section)).values():
            assert not (isinstance(value, float) and not math.isfinite(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=8))
def test_any_config_dict_is_valid_or_one_clear_error(tree):
    nested: dict = {}
    for key, value in tree.items():
        section, leaf = key.split(".", 1)
        nested.setdefault(section, {})[leaf] = value
    nested.setdefault("data", {}).setdefault("path", "rows.jsonl")
    _assert_outcome(lambda: from_dict(RunConfig, nested))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, st.text(max_size=12)), max_size=6))
def test_any_overrides_are_valid_or_one_clear_error(items):
    overrides = [f"{key}={raw}" for key, raw in items] + ["data.path=rows.jsonl"]
    _assert_outcome(lambda: load_config(RunConfig, None, overrides))


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
rows = st.one_of(
    st.fixed_dictionaries({"instruction": json_values, "output": json_values}, optional={"input": json_values}),
    st.fixed_dictionaries({"messages": json_values}),
    st.fixed_dictionaries({"text": json_values}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
lines = st.one_of(rows.map(json.dumps), st.text(max_size=30).filter(lambda t: "\n" not in t and "\r" not in t))


@pytest.mark.parametrize("fmt", ["instruction", "chat", "text"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines, min_size=0, max_size=6))
def test_any_data_file_is_checked_or_one_clear_error(tmp_path, fmt, file_lines):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(file_lines) + "\n", encoding="utf-8")
    try:
        count = check_rows(DataConfig(path=str(path), format=fmt))
    except QLoRAKitError as err:
        assert str(err).strip()  # a message, naming the file
        assert str(path) in str(err)
        return
    assert count == sum(1 for line in file_lines if line.strip())

"""Smoke test: the benchmark harness (benchmarks/run.py) runs end to end on the tiny model.

In-process (no subprocess per system) and 1 + 1 steps on 2 x 64 tokens, so it stays fast;
the numbers mean nothing, the plumbing is what is checked: the three systems train on the
same batches from the same initial adapter, repeat in rotated order, merge, and the files
and ratio lines come out.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("zaragoza_construction_faq")


def test_benchmark_harness_runs_end_to_end(tmp_path, capsys, smollm2_dir):
    from benchmarks import run

    results = tmp_path / "results"
    code = run.main(["--device", "cpu", "--models", "tiny-llama", "--batch-size", "2", "--seq-len", "64",
                     "--warmup", "1", "--steps", "1", "--repeats", "2", "--labels", "instruction",
                     "--in-process", "--results-dir", str(results),
                     "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0, out

    files = sorted(p.name for p in results.iterdir())
    assert any(f.endswith("-cpu-tiny-llama.json") for f in files) and any(f.endswith("-cpu.md") for f in files)
    data = json.loads(next(results.glob("*-cpu-tiny-llama.json")).read_text())
    assert data["command"].startswith("python benchmarks/run.py")
    assert {"torch", "transformers", "peft", "bitsandbytes", "qlora_kit"} <= set(data["versions"])
    assert data["machine"]["cpu_count"] >= 1
    runs = data["train"]["instruction"]
    for system in ("qlora_kit", "reference", "reference_nocast"):
        assert len(runs[system]) == 2
        assert all(r["input_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in runs[system])
    for system in ("reference", "reference_nocast"):
        assert runs[system][0]["info"]["initial_lora_copied_from_qlora_kit"] == 28  # 2 layers x 7 linears x A/B
    assert runs["reference"][0]["info"]["norm_dtype"] == "torch.float32"  # PEFT's documented fp32 cast
    assert runs["reference_nocast"][0]["info"]["norm_dtype"] == "torch.bfloat16"
    agreement = data["summary"]["loss_agreement"]["instruction"]
    assert len(agreement["qlora_kit"]) == 2
    assert agreement["max_rel_diff_vs_reference_nocast"] < 1e-2, agreement  # the same function from the same start
    assert all(r["seconds"] > 0 for s in ("qlora_kit", "reference") for r in data["merge"][s])
    assert [r["what"].split("(")[1][:15] for r in data["merge_original"]["qlora_kit"]] == ["mode='original'"] * 2
    assert any(r["metric"].startswith("merge + write, qlora_kit mode=original") for r in data["summary"]["rows"])
    row = next(r for r in data["summary"]["rows"] if r["metric"].endswith("input tokens/s"))
    assert row["stats"]["qlora_kit"]["n"] == 2 and set(row["ratios"]) == {"reference", "reference_nocast"}

    lines = [line for line in out.strip().splitlines() if line.strip()]
    tail = [line for line in lines if line.startswith(("RATIO", "LOSS"))]
    assert tail and lines[-len(tail):] == tail  # the ratio lines come last
    assert any("supervised tokens/s" in line and "qlora_kit/reference_nocast" in line for line in tail)


def test_ratios_are_given_only_where_spreads_do_not_overlap():
    from benchmarks.run import compare, rotated, spread

    assert compare(spread([10, 11, 12]), spread([5, 6, 7])) == round(11 / 6, 3)
    assert compare(spread([10, 11, 12]), spread([11.5, 13, 14])) == "within noise"
    assert [rotated(("a", "b", "c"), k) for k in range(3)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]

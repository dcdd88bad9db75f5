"""Smoke test: the benchmark harness (benchmarks/run.py) runs end to end on the tiny model.

In-process (no subprocess per system) and 1 + 1 steps on 2 x 64 tokens, so it stays fast;
the numbers mean nothing, the plumbing is what is checked: both systems train on the same
batches from the same initial adapter, merge, and the files and ratio lines come out.
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
                     "--warmup", "1", "--steps", "1", "--in-process", "--results-dir", str(results),
                     "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0, out

    files = sorted(p.name for p in results.iterdir())
    assert any(f.endswith("-cpu-tiny-llama.json") for f in files) and any(f.endswith("-cpu.md") for f in files)
    data = json.loads(next(results.glob("*-cpu-tiny-llama.json")).read_text())
    assert data["command"].startswith("python benchmarks/run.py")
    assert {"torch", "transformers", "peft", "bitsandbytes", "qlora_kit"} <= set(data["versions"])
    assert data["machine"]["cpu_count"] >= 1
    for labels in ("instruction", "all"):
        runs = data["train"][labels]
        for system in ("qlora_kit", "reference"):
            assert runs[system]["input_tokens_per_s"] > 0 and runs[system]["peak_rss_mb"] > 0
        assert runs["reference"]["info"]["initial_lora_copied_from_qlora_kit"] == 28  # 2 layers x 7 linears x A/B
        agreement = data["summary"]["loss_agreement"][labels]
        assert len(agreement["qlora_kit"]) == 2
        assert agreement["max_rel_diff"] < 1e-2, agreement  # the same function from the same start
    assert data["merge"]["qlora_kit"]["seconds"] > 0 and data["merge"]["reference"]["seconds"] > 0

    lines = [line for line in out.strip().splitlines() if line.strip()]
    tail = [line for line in lines if line.startswith(("RATIO", "LOSS"))]
    assert tail and lines[-len(tail):] == tail  # the ratio lines come last
    assert any("supervised tokens/s" in line for line in tail)

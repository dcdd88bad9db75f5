"""The run folder: metrics, loss curve, generation samples and a summary a reader can open.

    <output_dir>/
      qlora_kit_run.json  marks the folder as a qlora_kit run (written first): train writes only into
                          new or empty folders and its own runs, and resumes only its own runs
      config.yaml         the resolved configuration (defaults and overrides applied)
      metrics.jsonl       one JSON object per logged step: step, loss, lr, eval_loss when evaluated
      loss_curve.png      train and eval loss against step
      samples.md          greedy generations on held-out prompts, before and after training
      adapter/            the final adapter, PEFT format (+ qlora_kit.json)
      checkpoints/        step-N folders for resume
      summary.json        final numbers: eval loss, tokens/s, peak memory, data statistics
      train.log           the log of the run
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from . import __version__, atomic
from .errors import QLoRAKitError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_MARKER = "qlora_kit_run.json"
# Run folders written before the marker existed: a resolved config next to metrics.
_LEGACY_RUN_FILES = ("config.yaml", METRICS_FILE)


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` is a qlora_kit training run folder.

    Its marker; or, for runs from before the marker, config.yaml + metrics.jsonl; or
    qlora_kit checkpoints (e.g. one copied into a new folder to resume from).
    """
    return ((folder / RUN_MARKER).is_file() or all((folder / name).is_file() for name in _LEGACY_RUN_FILES)
            or any(folder.glob("checkpoints/step-*/adapter/qlora_kit.json")))


def write_run_marker(folder: Path) -> None:
    """Mark `folder` as a qlora_kit run (kept if already there: it records when the run began)."""
    if not (folder / RUN_MARKER).is_file():
        from datetime import datetime, timezone

        atomic.write_json(folder / RUN_MARKER, {
            "kind": "qlora_kit training run", "qlora_kit": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })


class MetricsLog:
    """Appends one JSON line per logged step; a resumed run drops lines past its checkpoint.

    A kill during an append can leave a partial last line: reading drops it (with a
    warning), and resuming rewrites the file without it. Any other unreadable line
    was not left by a kill, and is an error naming the line.
    """

    def __init__(self, folder: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = folder / METRICS_FILE
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [json.dumps(record) for record in self.records() if record["step"] <= resume_step]
            atomic.write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            atomic.write_text(self.path, "")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, dropping a torn last line (what a kill during an append leaves)."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as exc:
            if i == len(numbered) - 1:
                log.warning("%s: dropping its last line, left incomplete by a run stopped while writing it (%s)",
                            path, exc)
                break
            raise QLoRAKitError(
                f"{path}, line {number}: not a metrics record ({exc}); the file was edited or damaged. "
                "Fix or delete that line, then run again"
            ) from exc
        records.append(record)
    return records


def plot_loss_curve(records: list[dict], path: Path) -> None:
    """Train loss (per step) and eval loss (per evaluation) on one chart."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()  # rendered in memory, then written whole
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(path, png.getvalue())


def write_samples(path: Path, prompts: list[str], before: list[str], after: list[str], references: list[str]) -> None:
    lines = ["# Generations on held-out prompts", "",
             "Greedy decoding with the base model (before) and base + adapter (after).", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"## Prompt {i + 1}", "", "```", prompt.strip(), "```", "",
                  "**Before training:**", "", _quote(before[i] if i < len(before) else ""), "",
                  "**After training:**", "", _quote(after[i] if i < len(after) else ""), ""]
        if i < len(references) and references[i]:
            lines += ["**Reference:**", "", _quote(references[i]), ""]
    atomic.write_text(path, "\n".join(lines))


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def add_file_log(folder: Path) -> logging.Handler:
    """Mirror qlora_kit's log into `train.log` in the run folder."""
    handler = logging.FileHandler(folder / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("qlora_kit")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # the run's record is wanted even when the console is quieter
    logger.addHandler(handler)
    return handler


# What a run folder may hold; its README lists those that are there.
RUN_FILES = {
    "config.yaml": "the resolved config",
    "metrics.jsonl": "one line per logged step",
    "loss_curve.png": "train and eval loss",
    "samples.md": "generations before and after training",
    "adapter/": "the final adapter, PEFT format",
    "checkpoints/": "for resume",
    "summary.json": "the final numbers",
    "train.log": "the log",
}


def write_run_readme(folder: Path, run, summary: dict) -> None:
    """A short README.md so the folder explains itself to whoever opens it later."""
    lines = [
        f"# Run: {folder.name}",
        "",
        f"Base `{run.model.base}` in 4-bit {run.quant.quant_type}"
        f"{' + double quant' if run.quant.double_quant else ''}, LoRA rank {run.lora.rank} alpha {run.lora.alpha} "
        f"on {', '.join(run.lora.target_modules)}; data `{run.data.path}` ({run.data.format}).",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {summary['steps']} |",
        f"| supervised tokens | {summary['supervised_tokens']:,} |",
        f"| eval loss (start -> end) | {summary['first_eval_loss']} -> {summary['final_eval_loss']} |",
        *([f"| eval accuracy (start -> end) | {summary['first_eval_accuracy']} -> {summary['final_eval_accuracy']} |"]
          if "final_eval_accuracy" in summary else []),
        f"| tokens/s | {summary['tokens_per_s']} |",
        f"| peak memory (MB) | {summary['peak_memory_mb']} |",
        "",
        "Files: " + ", ".join(f"`{name}` ({what})" for name, what in RUN_FILES.items()
                              if (folder / name.rstrip("/")).exists() or name == "summary.json") + ".",
        "",
        "Next:",
        "",
        "```bash",
        f"qlora-kit generate {folder} --prompt \"...\"      # try the adapter",
        f"qlora-kit merge {folder} {folder}-merged      # export a standard HF checkpoint",
        "```",
        "",
    ]
    atomic.write_text(folder / "README.md", "\n".join(lines))

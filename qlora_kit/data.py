"""The data pipeline: load rows, render and tokenize them with loss masks, validate, split, pack, batch.

Rows come from a local jsonl/json/csv/parquet file or a Hub dataset, in one of three
formats (Alpaca instruction, chat messages, plain text). Every row becomes a plain
dict of lists, `{"input_ids": [...], "labels": [...]}` (plus `position_ids` for
packed rows), so a training loop can checkpoint and resume without pickling anything.
Labels are -100 where no loss is taken; the first token of every sample is never a
target, because nothing precedes it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import QLoRAKitError
from .settings import DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SUPPORTED_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Suffixes that mean "this was meant to be a file", so a missing one is reported as a
# missing file rather than looked up on the Hub.
_FILE_LIKE_SUFFIXES = set(SUPPORTED_EXTENSIONS) | {".txt", ".tsv", ".gz", ".zip", ".xlsx", ".xls", ".arrow"}
MAX_LISTED_PROBLEMS = 10
NUM_EVAL_PROMPTS = 4

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Named fallbacks for tokenizers that ship without a chat template (base models).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_ROLES = {"system", "user", "assistant"}


@dataclass
class PreparedData:
    """Tokenized training and held-out examples, with the statistics and prompts a run reports."""

    train: list[dict[str, list[int]]]  # examples (or packed rows) for training
    eval: list[dict[str, list[int]]]  # held-out examples, never packed
    stats: dict[str, Any]
    pad_id: int
    eval_prompts: list[str] = field(default_factory=list)  # rendered prompts (no response) for before/after samples
    eval_prompt_ids: list[list[int]] = field(default_factory=list)  # the same prompts, tokenized exactly as in training
    eval_references: list[str] = field(default_factory=list)  # the reference response for each prompt


# ---------------------------------------------------------------- loading


PACKAGE_SCHEME = "pkg://"


def resolve_package_path(path: str) -> str:
    """`pkg://package/sub/file.jsonl` -> that file inside the installed package.

    Lets a recipe name data that ships as a Python package (like the quickstart's
    FAQ) without hard-coding where site-packages lives on a given machine.
    """
    if not path.startswith(PACKAGE_SCHEME):
        return path
    package, _, inner = path[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise QLoRAKitError(
            f"data path {path} names package '{package}', which is not installed; "
            f"pip install {package.replace('_', '-')}"
        )
    return str(Path(spec.submodule_search_locations[0]) / inner)


def load_rows(path: str, split: str = "train", csv_options: dict | None = None) -> list[dict]:
    """Rows of a local file (or `pkg://` file) or a Hub dataset, as plain dicts in file order.

    `csv_options` go to the CSV reader (`csv_reader_options` of a `DataConfig`).
    """
    import datasets

    path = resolve_package_path(path)
    if _is_local(path):
        file = Path(path).expanduser()
        if not file.is_file():
            raise QLoRAKitError(
                f"data file {path} does not exist; fix the path (or, for a Hub dataset, give its name as owner/name)"
            )
        builder = SUPPORTED_EXTENSIONS.get(file.suffix.lower())
        if builder is None:
            supported = ", ".join(sorted(SUPPORTED_EXTENSIONS))
            raise QLoRAKitError(f"data file {path} has unsupported extension '{file.suffix}'; use one of {supported}")
        if file.suffix.lower() == ".jsonl":
            return read_jsonl(file)
        try:
            options = (csv_options or {}) if builder == "csv" else {}
            ds = datasets.load_dataset(builder, data_files=str(file), split="train", **options)
        except Exception as e:  # a parse error in the user's file
            raise QLoRAKitError(f"could not read {path} as {builder}: {e or type(e).__name__}") from e
    else:
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:
            raise QLoRAKitError(
                f"could not load Hub dataset '{path}' (split '{split}'): {e}. "
                "Check the name, split and network access, or point data.path at a local file"
            ) from e
    return ds.to_list()


def read_jsonl(file: Path) -> list[dict]:
    """One JSON object per line, read here so every bad line is reported with its line number."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = file.read_bytes()[: e.start].count(b"\n") + 1
        raise QLoRAKitError(f"{file}:{line}: not valid UTF-8 ({e.reason}); save the file as UTF-8") from e
    rows, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"  line {number}: not valid JSON ({e})")
            continue
        if not isinstance(row, dict):
            problems.append(f"  line {number}: a JSON {type(row).__name__}, not an object")
            continue
        rows.append(row)
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS] + ([f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"]
                                                   if len(problems) > MAX_LISTED_PROBLEMS else [])
        raise QLoRAKitError(f"{file}: {len(problems)} line(s) are not JSON objects (one per line expected):\n"
                            + "\n".join(listed) + "\nFix or remove these lines and run again.")
    if not rows:
        raise QLoRAKitError(f"{file} holds no rows; a .jsonl file has one JSON object per line")
    return rows


def csv_reader_options(cfg: DataConfig) -> dict:
    """The CSV reader's options a data config asks for: separator and, for a file without a header, column names."""
    options = {"sep": cfg.csv_delimiter}
    if cfg.csv_columns:
        options["column_names"] = list(cfg.csv_columns)
    return options


def _is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or path.startswith(("/", "./", "../", "~")) or p.suffix.lower() in _FILE_LIKE_SUFFIXES


# ---------------------------------------------------------------- row -> messages / segments


class RowProblem(Exception):
    """What is wrong with one row; collected and reported together, never escapes this module."""


def _text_field(row: dict, name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RowProblem(f"missing '{name}'")
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"'{name}' is {type(value).__name__}, not a string")
    if required and not value.strip():
        raise RowProblem(f"empty '{name}'")
    return value


def _chat_messages(row: dict) -> list[dict[str, str]]:
    """The row's conversation as [{role, content}], accepting `messages` or ShareGPT `conversations`."""
    if row.get("messages") is not None:
        raw, role_key, content_key, roles = row["messages"], "role", "content", {r: r for r in CHAT_ROLES}
    elif row.get("conversations") is not None:
        raw, role_key, content_key, roles = row["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise RowProblem("missing 'messages' (or ShareGPT 'conversations')")
    if not isinstance(raw, list) or not raw:
        raise RowProblem("'messages' must be a non-empty list of {role, content}")
    messages = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            raise RowProblem(f"message {i} is {type(m).__name__}, not an object")
        role = roles.get(m.get(role_key))
        if role is None:
            raise RowProblem(f"message {i} has role {m.get(role_key)!r}; use one of {sorted(roles)}")
        content = m.get(content_key)
        if not isinstance(content, str):
            raise RowProblem(f"message {i} '{content_key}' is {type(content).__name__}, not a string")
        if role == "assistant" and not content.strip():
            raise RowProblem(f"message {i} is an empty assistant turn")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem("no assistant turn to learn from")
    return messages


def _instruction_messages(row: dict) -> list[dict[str, str]]:
    instruction = _text_field(row, "instruction")
    extra = _text_field(row, "input", required=False)
    output = _text_field(row, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


# ---------------------------------------------------------------- rendering with supervised spans


class Renderer:
    """Turns a row into (text, supervised character spans, prompt text for generation).

    Spans are marked on the fully rendered text and mapped to tokens through the
    tokenizer's offsets, so the tokens are exactly those of the whole text (no
    piecewise tokenization drift at the prompt/response boundary).
    """

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token
        self.template = self._resolve_template()
        style = cfg.prompt_style
        if style == "auto":
            style = "chat_template" if self.template else "alpaca"
        self.style = style
        # Chat templates write their own BOS; plain prompts get whatever the tokenizer adds.
        self.add_special_tokens = cfg.format == "text" or (cfg.format == "instruction" and style == "alpaca")
        needs_template = cfg.format == "chat" or (cfg.format == "instruction" and style == "chat_template")
        if needs_template and not self.template:
            raise QLoRAKitError(
                f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template and data.chat_template "
                f"is not set; set data.chat_template to one of {sorted(CHAT_TEMPLATES)} or a Jinja template"
                + (", or data.prompt_style: alpaca" if cfg.format == "instruction" else "")
            )

    def _resolve_template(self) -> str | None:
        name = self.cfg.chat_template
        if name is None:
            return getattr(self.tokenizer, "chat_template", None) or None
        if name in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[name]
        if "{%" in name or "{{" in name:
            return name
        raise QLoRAKitError(
            f"data.chat_template '{name}' is neither a built-in ({', '.join(sorted(CHAT_TEMPLATES))}) nor a Jinja template"
        )

    def render(self, row: dict) -> tuple[str, list[tuple[int, int]], str, str]:
        """(full text, supervised spans, prompt text, reference response) for one row."""
        fmt = self.cfg.format
        if fmt == "text":
            text = _text_field(row, "text")
            cut = _prompt_cut(text)
            return text, [(0, len(text))], text[:cut], text[cut:]
        if fmt == "instruction" and self.style == "alpaca":
            return self._render_alpaca(row)
        messages = _instruction_messages(row) if fmt == "instruction" else _chat_messages(row)
        return self._render_chat(messages)

    def _render_alpaca(self, row: dict):
        instruction = _text_field(row, "instruction")
        extra = _text_field(row, "input", required=False)
        output = _text_field(row, "output")
        if extra.strip():
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
        else:
            prompt = ALPACA_PROMPT.format(instruction=instruction)
        return prompt + output, [(len(prompt), len(prompt) + len(output))], prompt, output

    def _chat(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.template
        )

    def _render_chat(self, messages: list[dict[str, str]]):
        full = self._chat(messages, False)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            # Jump past this turn's header: rendering the history with a generation prompt
            # ends exactly where the assistant's text begins (when the template is prefix-stable),
            # so an identical earlier user message can't be mistaken for this reply.
            head = self._chat(messages[:i], True)
            if full.startswith(head):
                cursor = max(cursor, len(head))
            start = full.find(m["content"], cursor)
            if start < 0:
                raise QLoRAKitError(
                    "the chat template changes assistant messages when rendering them, so their tokens can't be "
                    "located for the loss mask; use a different data.chat_template"
                )
            end = start + len(m["content"])
            spans.append((start, self._end_of_turn(full, messages[: i + 1], end)))
            cursor = spans[-1][1]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = self._chat(messages[:last], True)
        return full, spans, prompt, messages[last]["content"]

    def _end_of_turn(self, full: str, upto: list[dict], content_end: int) -> int:
        """Where supervision of a reply stops: through the template's end-of-turn marker,
        so the model learns to stop, but not the whitespace after it."""
        turn = self._chat(upto, False)
        tail = full[content_end : len(turn)] if full.startswith(turn) else ""
        if self.eos and self.eos in tail:
            return content_end + tail.index(self.eos) + len(self.eos)
        return content_end + len(tail.rstrip())


def _prompt_cut(text: str) -> int:
    """For plain text, the 'prompt' of a generation sample is its first part, cut at a space."""
    cut = min(len(text) // 2, 200)
    space = text.rfind(" ", 0, cut)
    return space if space > 0 else cut


# ---------------------------------------------------------------- tokenizing


def tokenize(renderer: Renderer, text: str, spans: list[tuple[int, int]], train_on_prompt: bool) -> dict[str, list[int]]:
    """input_ids and labels for one rendered text; EOS appended (supervised) unless already there."""
    tok = renderer.tokenizer
    enc = tok(text, add_special_tokens=renderer.add_special_tokens, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if train_on_prompt:
        supervised = [True] * len(ids)
    else:
        supervised = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    eos_id = tok.eos_token_id
    last = max((i for i, sup in enumerate(supervised) if sup), default=-1)
    if eos_id is not None and not (last >= 0 and ids[last] == eos_id):
        ids.append(eos_id)
        supervised.append(True)
    labels = [t if sup else IGNORE_INDEX for t, sup in zip(ids, supervised)]
    labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def supervised_count(example: dict[str, list[int]]) -> int:
    """How many of an example's labels are targets."""
    return sum(1 for t in example["labels"] if t != IGNORE_INDEX)


# ---------------------------------------------------------------- one pass: render, tokenize, validate


@dataclass
class _Encoded:
    examples: list[dict[str, list[int]]]
    prompts: list[str]
    references: list[str]
    truncated: int


def encode_rows(rows: list[dict], renderer: Renderer, source: str) -> _Encoded:
    """Every row tokenized and truncated; ALL bad rows are reported in one QLoRAKitError."""
    cfg = renderer.cfg
    out = _Encoded([], [], [], 0)
    problems: list[tuple[int, str]] = []
    for number, row in enumerate(rows, 1):
        try:
            text, spans, prompt, reference = renderer.render(row)
        except RowProblem as e:
            problems.append((number, str(e)))
            continue
        example = tokenize(renderer, text, spans, cfg.train_on_prompt)
        if len(example["input_ids"]) > cfg.max_seq_len:
            out.truncated += 1
            example = {k: v[: cfg.max_seq_len] for k, v in example.items()}
        if supervised_count(example) == 0:
            problems.append((number, f"no supervised token left within max_seq_len={cfg.max_seq_len} (prompt too long)"))
            continue
        out.examples.append(example)
        out.prompts.append(prompt)
        out.references.append(reference)
    if problems:
        raise QLoRAKitError(_describe_problems(source, cfg.format, problems, rows))
    if out.truncated:
        log.warning("%s: %d of %d examples were longer than max_seq_len=%d and were cut", source, out.truncated, len(rows), cfg.max_seq_len)
    return out


def _describe_problems(source: str, fmt: str, problems: list[tuple[int, str]], rows: list[dict]) -> str:
    lines = [f"{source}: {len(problems)} bad row(s) for format '{fmt}' (rows numbered from 1):"]
    lines += [f"  row {n}: {what}" for n, what in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    fits = _format_that_fits(rows)
    if len(problems) == len(rows) and fits and fits != fmt:
        lines.append(f"The rows look like the '{fits}' format: set data.format={fits}.")
    else:
        lines.append("Fix or remove these rows (or change data.format / data.max_seq_len) and run again.")
    return "\n".join(lines)


def _format_that_fits(rows: list[dict]) -> str | None:
    """The format the first row's keys suggest, for a hint when every row fails the configured one."""
    keys = set(rows[0]) if rows else set()
    if keys & {"messages", "conversations"}:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "instruction"
    return "text" if "text" in keys else None


# ---------------------------------------------------------------- split and pack


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: a seeded shuffle, the first round(n * fraction) held out (at least 1 if > 0)."""
    if eval_fraction <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def pack(examples: list[dict[str, list[int]]], max_seq_len: int, seed: int) -> list[dict[str, list[int]]]:
    """Concatenate examples (in a seeded order) into rows of at most max_seq_len tokens.

    Each row carries position_ids restarting at 0 per sample; `collate` turns those
    into a block-diagonal causal mask so packed samples never attend to each other.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[dict[str, list[int]]] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for i in order:
        ex = examples[i]
        n = len(ex["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_seq_len:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += ex["labels"]  # already -100 at each sample's first token
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows


# ---------------------------------------------------------------- entry point


def check_rows(cfg: DataConfig) -> int:
    """Read the data and check every row's fields for its format, without a tokenizer; return the row count.

    Run before the base model loads (for large models, before a long download), so
    a missing file or a malformed row is reported in seconds. Rendering and
    token-length checks need the tokenizer and happen in `prepare_data`.
    """
    problems = cfg.problems()
    if problems:
        raise QLoRAKitError("bad data config:\n  " + "\n  ".join(problems))
    check = {"text": lambda row: _text_field(row, "text"), "instruction": _instruction_messages,
             "chat": _chat_messages}[cfg.format]
    count = 0
    for path, split in ((cfg.path, cfg.split), (cfg.eval_file, "train")):
        if path is None:
            continue
        rows = load_rows(path, split)
        rows = rows[: cfg.max_samples] if path == cfg.path and cfg.max_samples is not None else rows
        bad = []
        for number, row in enumerate(rows, 1):
            try:
                check(row)
            except RowProblem as e:
                bad.append((number, str(e)))
        if bad:
            raise QLoRAKitError(_describe_problems(path, cfg.format, bad, rows))
        count += len(rows)
    return count


def prepare_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Load, validate, tokenize, split and (optionally) pack the data described by cfg."""
    problems = cfg.problems()
    if problems:
        raise QLoRAKitError("bad data config:\n  " + "\n  ".join(problems))
    renderer = Renderer(cfg, tokenizer)
    rows = load_rows(cfg.path, cfg.split, csv_reader_options(cfg))
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    if not rows:
        raise QLoRAKitError(f"{cfg.path} has no rows")
    encoded = encode_rows(rows, renderer, cfg.path)
    truncated = encoded.truncated

    if cfg.eval_file:
        train_idx, eval_idx = list(range(len(encoded.examples))), []
        held = encode_rows(load_rows(cfg.eval_file, csv_options=csv_reader_options(cfg)), renderer, cfg.eval_file)
        truncated += held.truncated
    else:
        train_idx, eval_idx = split_indices(len(encoded.examples), cfg.eval_fraction, seed)
        held = _Encoded([encoded.examples[i] for i in eval_idx], [encoded.prompts[i] for i in eval_idx],
                        [encoded.references[i] for i in eval_idx], 0)
    train = [encoded.examples[i] for i in train_idx]
    # With no held-out set, before/after samples come from training rows: still useful to eyeball.
    sample_from = held if held.examples else _Encoded(train, [encoded.prompts[i] for i in train_idx],
                                                      [encoded.references[i] for i in train_idx], 0)

    stats = {
        "rows": len(rows),
        "train_examples": len(train),
        "eval_examples": len(held.examples),
        "truncated": truncated,
        "tokens": sum(len(e["input_ids"]) for e in train),
        "supervised_tokens": sum(supervised_count(e) for e in train),
        "packed_rows": 0,
    }
    if cfg.packing:
        train = pack(train, cfg.max_seq_len, seed)
        stats["packed_rows"] = len(train)
        stats["packing_efficiency"] = stats["tokens"] / (len(train) * cfg.max_seq_len)

    prompts = sample_from.prompts[:NUM_EVAL_PROMPTS]
    return PreparedData(
        train=train,
        eval=held.examples,
        stats=stats,
        pad_id=pad_id(tokenizer),
        eval_prompts=prompts,
        eval_prompt_ids=[list(tokenizer(p, add_special_tokens=renderer.add_special_tokens)["input_ids"]) for p in prompts],
        eval_references=sample_from.references[:NUM_EVAL_PROMPTS],
    )


def pad_id(tokenizer) -> int:
    """The pad token, else EOS: padded positions are masked out of attention and loss anyway."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise QLoRAKitError("the tokenizer has neither a pad nor an EOS token; it cannot be used for training")
    return pid


# ---------------------------------------------------------------- batching


def collate(examples: list[dict[str, list[int]]], pad_id: int, mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors ready for `model(**batch)`.

    Unpacked: input_ids, labels (-100 on padding), 2D attention_mask.
    Packed (any example has position_ids): input_ids, labels, position_ids and a 4D
    additive attention_mask (batch, 1, T, T) in mask_dtype, block-diagonal causal:
    0 where attention is allowed, the dtype's minimum elsewhere. Pass the model's
    compute dtype as mask_dtype (eager attention adds the mask to the scores).
    """
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    if not any("position_ids" in e for e in examples):
        attention_mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    position_ids = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        position_ids[i, : len(e["input_ids"])] = torch.tensor(e.get("position_ids", range(len(e["input_ids"]))))
    allowed = block_causal_mask(position_ids, lengths)
    attention_mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(~allowed, torch.finfo(mask_dtype).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def block_causal_mask(position_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Bool (batch, 1, T, T): query i may see key j iff j <= i and both belong to the same packed sample.

    A sample starts wherever position_ids resets to 0. Padding positions see only
    themselves, so no softmax row is empty (which would give NaNs).
    """
    batch, T = position_ids.shape
    idx = torch.arange(T)
    real = idx[None, :] < lengths[:, None]
    starts = (position_ids == 0) & real
    sample = starts.cumsum(-1)
    sample = torch.where(real, sample, -1 - idx[None, :])  # every pad its own sample
    same = sample[:, :, None] == sample[:, None, :]
    causal = idx[None, :, None] >= idx[None, None, :]
    return (same & causal).unsqueeze(1)


def count_supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens the loss will see: HF causal LMs shift labels left by one internally."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def batch_indices(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches as example indices: a shuffle seeded by seed + epoch, last batch may be short."""
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def batches(examples: list, batch_size: int, seed: int, epoch: int, start: int = 0) -> Iterator[list]:
    """Yield the epoch's batches of examples from batch index `start` on (to resume mid-epoch)."""
    for idx in batch_indices(len(examples), batch_size, seed, epoch)[start:]:
        yield [examples[i] for i in idx]

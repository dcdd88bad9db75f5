"""Inference with a base and its adapters: loading them, formatting prompts, generating, chatting.

    loaded = load_model(adapter="runs/quickstart")          # base, quantization and prompt style from the run
    print(loaded.generate("What is a bygglov?"))
    chat = ChatSession(loaded)
    chat.send("Hello"); chat.send("And in Swedish?"); chat.reset()

    loaded = load_model(adapter={"faq": "runs/faq", "chat": "runs/chat"})   # two adapters, one base
    loaded.use("chat")                                       # switch; 'base' for the base alone
    loaded.generate_many(["a", "b", "c"], ["faq", "chat", "base"])   # one batch, an adapter per row

A run folder (or an adapter folder inside one) brings its `config.yaml`, so the base,
its quantization and the way prompts were rendered in training (chat template or
Alpaca prompt) are the ones the adapter was trained with. A bare adapter folder
brings its manifest (`qlora_kit.json`): base and quantization, and the tokenizer's
chat template is used. With no adapter, the base is loaded as it is. Each adapter
keeps its own prompt format.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .adapter_io import AdapterRecord, load_adapter
from .classification import checkpoint_task
from .data import ALPACA_PROMPT, Renderer, pad_id, read_jsonl
from .errors import QLoRAKitError
from .loading import BaseInfo, load_base
from .lora import DEFAULT_ADAPTER, adapters_per_row, set_active_adapter, set_adapters_enabled
from .settings import DataConfig, GenerationOptions, ModelConfig, QuantConfig, RunConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- prompts


@dataclass
class PromptFormat:
    """How a conversation becomes the text a model continues.

    style 'chat': a chat template with the generation prompt; 'alpaca': the Alpaca
    instruction prompt (single turn); 'plain': the user's text as it is (single turn).
    """

    style: str
    template: Optional[str] = None

    @property
    def add_special_tokens(self) -> bool:
        return self.style != "chat"  # chat templates write their own BOS, as in training

    def render(self, tokenizer, messages: list[dict[str, str]]) -> str:
        if self.style == "chat":
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 chat_template=self.template)
        if len([m for m in messages if m["role"] != "system"]) > 1:
            raise QLoRAKitError(
                f"prompts in the '{self.style}' style are single-turn; multi-turn chat needs a chat template "
                "(this tokenizer has none, or the run trained without one)"
            )
        user = next(m["content"] for m in messages if m["role"] == "user")
        return ALPACA_PROMPT.format(instruction=user) if self.style == "alpaca" else user


def prompt_format(tokenizer, data: DataConfig | None = None, use_template: bool = True) -> PromptFormat:
    """The format training used (from the run's data section), else the tokenizer's chat template, else plain."""
    if not use_template:
        return PromptFormat("plain")
    if data is not None:
        if data.format == "text":
            return PromptFormat("plain")
        renderer = Renderer(data, tokenizer)  # resolves template and style exactly as training did
        if data.format == "instruction" and renderer.style == "alpaca":
            return PromptFormat("alpaca")
        return PromptFormat("chat", renderer.template)
    template = getattr(tokenizer, "chat_template", None)
    return PromptFormat("chat", template) if template else PromptFormat("plain")


# ---------------------------------------------------------------- the loaded model

BASE = "base"  # the name that picks no adapter: the base alone


@dataclass
class LoadedAdapter:
    """One adapter on the loaded base: its folder, its run's settings (if any) and its prompt format."""

    name: str
    folder: Path
    run: Optional[RunConfig]
    format: PromptFormat


@dataclass
class LoadedModel:
    """A 4-bit base with the adapters loaded on it, its tokenizer, and the prompt format of each.

    `use(name)` picks the adapter that answers (the first loaded, by default);
    `generate_many` answers several prompts in one batch, each with its own adapter.
    """

    model: torch.nn.Module
    tokenizer: object
    base_format: PromptFormat
    base: BaseInfo
    adapters: dict[str, LoadedAdapter] = field(default_factory=dict)
    settings: GenerationOptions = field(default_factory=GenerationOptions)
    active: Optional[str] = None

    def __post_init__(self):
        if self.active is None and self.adapters:
            self.active = next(iter(self.adapters))

    @property
    def format(self) -> PromptFormat:
        return self.adapters[self.active].format if self.active else self.base_format

    @property
    def adapter_dir(self) -> Optional[Path]:
        return self.adapters[self.active].folder if self.active else None

    @property
    def run(self) -> Optional[RunConfig]:
        return self.adapters[self.active].run if self.active else None

    def use(self, name: str | None) -> None:
        """Answer with adapter `name` from now on; None or 'base': the base alone. The base is not reloaded."""
        if name in (None, BASE):
            if self.adapters:
                set_adapters_enabled(self.model, False)
            self.active = None
            return
        self.check_names([name])
        set_active_adapter(self.model, name)
        set_adapters_enabled(self.model, True)
        self.active = name

    def check_names(self, names) -> None:
        """Refuse adapter names that are not loaded, listing the loaded ones."""
        unknown = sorted({n for n in names if n not in (None, BASE) and n not in self.adapters})
        if unknown:
            loaded = ", ".join(self.adapters) or "none"
            raise QLoRAKitError(f"no adapter named {', '.join(repr(n) for n in unknown)} is loaded; "
                                f"loaded: {loaded} (or '{BASE}' for the base alone)")

    def generate(self, prompt: str, *, system: str | None = None, stream: Callable[[str], None] | None = None) -> str:
        """The model's reply to a single user prompt."""
        return self.reply(_messages(prompt, system), stream=stream)

    def reply(self, messages: list[dict[str, str]], *, stream: Callable[[str], None] | None = None) -> str:
        """The next assistant message after `messages`; `stream` receives text as it is generated."""
        text = self.format.render(self.tokenizer, messages)
        return generate_text(self.model, self.tokenizer, text, self.settings,
                             add_special_tokens=self.format.add_special_tokens, stream=stream)

    def generate_many(self, prompts: list[str], adapters: list[str | None], *,
                      systems: list[str | None] | None = None) -> list[str]:
        """Replies to `prompts` in one batch, row i answered by adapter `adapters[i]` (None/'base': the base).

        Each prompt is rendered in its adapter's prompt format and the rows are
        left-padded; the adapters are routed per row (`lora.adapters_per_row`), so
        every reply is the one that adapter gives the prompt alone (greedy).
        """
        self.check_names(adapters)
        systems = systems or [None] * len(prompts)
        formats = [self.adapters[a].format if a not in (None, BASE) else self.base_format for a in adapters]
        encoded = [self.tokenizer(fmt.render(self.tokenizer, _messages(p, s)), add_special_tokens=fmt.add_special_tokens)
                   ["input_ids"] for fmt, p, s in zip(formats, prompts, systems)]
        routes = [None if a in (None, BASE) else a for a in adapters]
        if self.adapters:
            set_adapters_enabled(self.model, True)
            context = adapters_per_row(self.model, routes)
        else:
            context = nullcontext()
        try:
            with _eval_mode(self.model), context:
                return generate_batch(self.model, self.tokenizer, encoded, self.settings)
        finally:
            self.use(self.active)  # per-row routing is over: back to the active adapter (or the base)


@dataclass
class PromptRow:
    """One row of a prompts file: the prompt, the adapter that answers it (None: the base), a system message."""

    prompt: str
    adapter: Optional[str] = None
    system: Optional[str] = None


def read_prompts(file: str | Path) -> list[PromptRow]:
    """`{"prompt": ..., "adapter": ..., "system": ...}` per line (adapter and system optional); every bad row reported."""
    rows, problems = read_jsonl(Path(file)), []
    for number, row in enumerate(rows, 1):
        unknown = sorted(set(row) - {"prompt", "adapter", "system"})
        if unknown:
            problems.append(f"  row {number}: unknown key(s) {', '.join(unknown)} (keys: prompt, adapter, system)")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            problems.append(f"  row {number}: 'prompt' must be a non-empty string")
        for key in ("adapter", "system"):
            if row.get(key) is not None and not isinstance(row[key], str):
                problems.append(f"  row {number}: '{key}' must be a string or null")
    if problems:
        raise QLoRAKitError(f"{file}: {len(problems)} problem(s):\n" + "\n".join(problems[:20]))
    return [PromptRow(r["prompt"], r.get("adapter"), r.get("system")) for r in rows]


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def load_model(
    base: str | None = None,
    adapter: str | Path | dict[str, str | Path] | None = None,
    *,
    device: str | None = None,
    force: bool = False,
    use_template: bool = True,
    settings: GenerationOptions | None = None,
) -> LoadedModel:
    """Load a base in 4-bit, plus adapters (adapter or run folders) when given.

    `adapter` is one folder, or {name: folder} for several named adapters on the
    one base (the first is active; all must be trained on that base). `base` may
    be omitted with an adapter: the one the first adapter was trained on is used,
    quantized as its training quantized it. `force` loads adapters onto a base
    whose fingerprint differs from the one they were trained on.
    """
    named = adapter if isinstance(adapter, dict) else ({} if adapter is None else {DEFAULT_ADAPTER: adapter})
    if BASE in named:
        raise QLoRAKitError(f"'{BASE}' names the base alone; give the adapter another name")
    records = {name: AdapterRecord.read(folder) for name, folder in named.items()}
    first = next(iter(records.values()), None)
    if first is not None:
        model_cfg, quant = first.base_model(base), first.quant_config()
    elif base:
        # A merged classifier loads as one: its config names a ...ForSequenceClassification.
        model_cfg, quant = ModelConfig(base=base, task=checkpoint_task(base)), QuantConfig()
    else:
        raise QLoRAKitError("name a base model with --base (a local folder, Hub id, .gguf file or "
                            "'smollm2-135m-instruct'), or give an adapter / run folder")
    if device:
        model_cfg = replace(model_cfg, device=device)
    log.info("loading base %s%s", model_cfg.base, (" with adapter(s) " if records else "")
             + ", ".join(f"{name}={r.folder}" for name, r in records.items()))
    model, tokenizer, info = load_base(model_cfg, quant)
    loaded = {}
    for name, record in records.items():
        load_adapter(model, record.folder, base=info, strict_base=not force, adapter_name=name)
        fmt = prompt_format(tokenizer, record.run.data if record.run is not None else None, use_template)
        loaded[name] = LoadedAdapter(name, record.folder, record.run, fmt)
    if loaded:
        set_active_adapter(model, next(iter(loaded)))
    _use_generation_config(model, info)
    return LoadedModel(model, tokenizer, prompt_format(tokenizer, None, use_template), info, loaded,
                       settings or GenerationOptions())


def _use_generation_config(model, base: BaseInfo) -> None:
    """The checkpoint's generation_config.json (stop tokens of chat models live there), if it has one."""
    from transformers import GenerationConfig

    folder = Path(base.folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)


# ---------------------------------------------------------------- generating


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the generation config's EOS ids and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _generate_options(model, tokenizer, settings: GenerationOptions) -> dict:
    sample = settings.temperature > 0
    if sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    return dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        # Explicit values, so a checkpoint's sampling defaults never turn greedy decoding into sampling.
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=None,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=pad_id(tokenizer),
    )


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_text(model, tokenizer, text: str, settings: GenerationOptions, *, add_special_tokens: bool = True,
                  stream: Callable[[str], None] | None = None) -> str:
    """Continue `text` (already formatted) and return only the new text, special tokens removed."""
    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"].to(device)
    options = _generate_options(model, tokenizer, settings)
    if stream is not None:
        options["streamer"] = _CallbackStreamer(tokenizer, stream)
    with _eval_mode(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **options)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], settings: GenerationOptions) -> list[str]:
    """Continue several tokenized prompts in one batch (left-padded); the new text of each."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    pad = pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with _eval_mode(model):
        out = model.generate(input_ids=ids, attention_mask=mask, use_cache=True,
                             **_generate_options(model, tokenizer, settings))
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def _CallbackStreamer(tokenizer, callback: Callable[[str], None]):
    """A transformers TextStreamer that hands finished words to `callback` instead of printing them."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                callback(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# ---------------------------------------------------------------- chatting


class ChatSession:
    """A conversation with a loaded model: the history grows with each exchange until `reset`."""

    def __init__(self, loaded: LoadedModel, system: str | None = None):
        if loaded.format.style != "chat":
            raise QLoRAKitError(
                "chat needs a chat template, and this model has none (or its run trained with the "
                f"'{loaded.format.style}' prompt style); use `qlora-kit generate` for single prompts"
            )
        self.loaded = loaded
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        """Add the user's message, generate the reply, and keep both in the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            answer = self.loaded.reply(self.messages, stream=stream)
        except BaseException:
            self.messages.pop()  # an interrupted turn leaves the history as it was
            raise
        self.messages.append({"role": "assistant", "content": answer.strip()})
        return answer

"""Inference with a base and an optional adapter: loading the pair, formatting prompts, generating, chatting.

    loaded = load_model(adapter="runs/quickstart")          # base, quantization and prompt style from the run
    print(loaded.generate("What is a bygglov?"))
    chat = ChatSession(loaded)
    chat.send("Hello"); chat.send("And in Swedish?"); chat.reset()

A run folder (or an adapter folder inside one) brings its `config.yaml`, so the base,
its quantization and the way prompts were rendered in training (chat template or
Alpaca prompt) are the ones the adapter was trained with. A bare adapter folder
brings its manifest (`qlora_kit.json`): base and quantization, and the tokenizer's
chat template is used. With no adapter, the base is loaded as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .adapter_io import AdapterRecord, load_adapter
from .classification import checkpoint_task
from .data import ALPACA_PROMPT, Renderer
from .errors import QLoRAKitError
from .loading import BaseInfo, load_base
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


@dataclass
class LoadedModel:
    """A 4-bit base with its adapter (if any), its tokenizer, and the prompt format to use."""

    model: torch.nn.Module
    tokenizer: object
    format: PromptFormat
    base: BaseInfo
    adapter_dir: Optional[Path] = None
    run: Optional[RunConfig] = None
    settings: GenerationOptions = field(default_factory=GenerationOptions)

    def generate(self, prompt: str, *, system: str | None = None, stream: Callable[[str], None] | None = None) -> str:
        """The model's reply to a single user prompt."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.reply(messages, stream=stream)

    def reply(self, messages: list[dict[str, str]], *, stream: Callable[[str], None] | None = None) -> str:
        """The next assistant message after `messages`; `stream` receives text as it is generated."""
        text = self.format.render(self.tokenizer, messages)
        return generate_text(self.model, self.tokenizer, text, self.settings,
                             add_special_tokens=self.format.add_special_tokens, stream=stream)


def load_model(
    base: str | None = None,
    adapter: str | Path | None = None,
    *,
    device: str | None = None,
    force: bool = False,
    use_template: bool = True,
    settings: GenerationOptions | None = None,
) -> LoadedModel:
    """Load a base in 4-bit, plus an adapter (folder or run folder) when given.

    `base` may be omitted with an adapter: the one it was trained on is used. The
    base is quantized as the adapter's training quantized it. `force` loads an
    adapter onto a base whose fingerprint differs from the one it was trained on.
    """
    record = AdapterRecord.read(adapter) if adapter is not None else None
    if record is not None:
        model_cfg, quant = record.base_model(base), record.quant_config()
    elif base:
        # A merged classifier loads as one: its config names a ...ForSequenceClassification.
        model_cfg, quant = ModelConfig(base=base, task=checkpoint_task(base)), QuantConfig()
    else:
        raise QLoRAKitError("name a base model with --base (a local folder, Hub id, .gguf file or "
                            "'smollm2-135m-instruct'), or give an adapter / run folder")
    if device:
        model_cfg = replace(model_cfg, device=device)
    log.info("loading base %s%s", model_cfg.base, f" with adapter {record.folder}" if record else "")
    model, tokenizer, info = load_base(model_cfg, quant)
    if record is not None:
        load_adapter(model, record.folder, base=info, strict_base=not force)
    _use_generation_config(model, info)
    run = record.run if record is not None else None
    fmt = prompt_format(tokenizer, run.data if run is not None else None, use_template)
    return LoadedModel(model, tokenizer, fmt, info, record.folder if record else None, run,
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


@torch.no_grad()
def generate_text(model, tokenizer, text: str, settings: GenerationOptions, *, add_special_tokens: bool = True,
                  stream: Callable[[str], None] | None = None) -> str:
    """Continue `text` (already formatted) and return only the new text, special tokens removed."""
    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"].to(device)
    sample = settings.temperature > 0
    if sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    options = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        # Explicit values, so a checkpoint's sampling defaults never turn greedy decoding into sampling.
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=None,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if stream is not None:
        options["streamer"] = _CallbackStreamer(tokenizer, stream)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **options)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


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

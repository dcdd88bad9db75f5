"""The `qlora-kit` command line: a thin layer that turns arguments into settings and calls the library.

    qlora-kit train CONFIG [section.key=value ...] [--resume]     fine-tune an adapter
    qlora-kit generate [RUN|ADAPTER] [--base X] --prompt "..."    one reply, streamed
    qlora-kit chat [RUN|ADAPTER] [--base X]                       interactive, reads stdin
    qlora-kit eval [RUN|ADAPTER] [--base X] [--data FILE]         loss and perplexity
    qlora-kit merge RUN OUT / qlora-kit dequantize SRC OUT        exports
    qlora-kit config [SECTION|COMMAND]                            every setting, documented

Every command but `train` is declared as a dataclass in `qlora_kit.settings`; its
flags, `--help` text, defaults and checks are derived from that declaration, so
each option is written once. `train` reads a recipe (a `RunConfig` YAML) plus
`section.key=value` overrides. `accelerate launch -m qlora_kit.cli train ...` runs
the same entry point on several processes. Heavy libraries are imported only
inside the commands, so `--help` and `--version` answer at once.

`_run` is the one error boundary. Failures a user can fix print one `error: ...`
line, without a traceback, and exit with status 2: `QLoRAKitError`, and the short
list in `expected_error` (file errors, undecodable or invalid JSON text, a model
needing its own code, a failing chat template, GPU out of memory). Anything else is
a bug: a short message naming the log file that holds the traceback (the run's
train.log for `train`), the traceback on the terminal only with -v, status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

from . import __version__
from .config import describe, field_docs, from_dict
from .errors import QLoRAKitError
from .settings import (ChatOptions, DequantizeOptions, EvalOptions, ExportGGUFOptions, GenerateOptions,
                       MergeOptions, PlanOptions, RunConfig, load_recipe)

log = logging.getLogger("qlora_kit.cli")

EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    """Train as a recipe and its overrides describe; print the summary."""
    from .training import train

    if args.help_config:
        print(describe(RunConfig))
        return 0
    if args.config is None:
        raise QLoRAKitError("train needs a recipe: qlora-kit train CONFIG.yaml [section.key=value ...]")
    overrides = (list(args.overrides) + (["train.resume=true"] if args.resume else [])
                 + (["train.overwrite=true"] if args.overwrite else []))
    run = load_recipe(args.config, overrides)
    args.log_file = Path(run.train.output_dir) / "train.log"  # where an unexpected error's traceback goes
    summary = train(run)
    if summary:  # under several processes only the main one returns the summary
        print(json.dumps({k: summary[k] for k in ("steps", "first_eval_loss", "final_eval_loss", "final_eval_ppl",
                                                  "train_time_s") if k in summary}))
        print(f"run folder: {run.train.output_dir}")
    return 0


def cmd_generate(opts: GenerateOptions) -> int:
    """One reply streamed to stdout as it is generated; or, with --prompts, one JSON line per row."""
    if (opts.prompt is None) == (opts.prompts is None):
        raise QLoRAKitError("give --prompt TEXT, or --prompts FILE.jsonl for several prompts (one of the two)")
    if opts.prompts is not None and opts.use is not None:
        raise QLoRAKitError("--use picks the adapter for --prompt; in a --prompts file each row names its "
                            "own (\"adapter\": NAME, or null for the base)")
    if opts.prompts is not None:
        return _generate_rows(opts)
    loaded = _load(opts, use_template=not opts.no_chat_template)
    if opts.use is not None:
        loaded.use(opts.use)
    loaded.generate(opts.prompt, system=opts.system, stream=lambda piece: print(piece, end="", flush=True))
    print(flush=True)
    return 0


def _generate_rows(opts: GenerateOptions) -> int:
    """Answer a prompts file a batch at a time, each row by its own adapter."""
    from .generation import read_prompts

    rows = read_prompts(opts.prompts)  # checked before the model loads
    loaded = _load(opts, use_template=not opts.no_chat_template)
    loaded.check_names([row.adapter for row in rows])
    for start in range(0, len(rows), opts.batch_size):
        batch = rows[start:start + opts.batch_size]
        replies = loaded.generate_many([r.prompt for r in batch], [r.adapter for r in batch],
                                       systems=[r.system for r in batch])
        for row, reply in zip(batch, replies):
            print(json.dumps({"prompt": row.prompt, "adapter": row.adapter, "reply": reply}, ensure_ascii=False),
                  flush=True)
    return 0


def cmd_chat(opts: ChatOptions) -> int:
    """A conversation over stdin: line editing on a terminal, piped lines otherwise."""
    from .generation import ChatSession

    session = ChatSession(_load(opts), system=opts.system)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
        print("chat: /reset clears the history, /use NAME answers with another adapter ('base': none), "
              "/exit (or Ctrl-D) quits; Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:  # end of piped input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.split()[0] == "/use":
            _switch_adapter(session.loaded, text.split()[1:])
            continue
        try:
            session.send(text, stream=lambda piece: print(piece, end="", flush=True))
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(stopped; the turn was dropped from the history)", file=sys.stderr)
            continue
        print(flush=True)
    return 0


def _switch_adapter(loaded, words: list[str]) -> None:
    """`/use NAME` in a chat: the next replies come from that adapter (the history is kept)."""
    names = ", ".join(list(loaded.adapters) + ["base"])
    if len(words) != 1:
        print(f"(usage: /use NAME; loaded: {names}; now: {loaded.active or 'base'})", file=sys.stderr)
        return
    before = loaded.active
    try:
        loaded.use(words[0])
    except QLoRAKitError as e:
        print(f"({e})", file=sys.stderr)
        return
    style = loaded.format.style
    if style != "chat":  # e.g. a run trained on Alpaca prompts: single-turn only
        loaded.use(before)
        print(f"({words[0]} is prompted in the '{style}' style, not through a chat template; "
              f"ask it with `qlora-kit generate --use {words[0]}`)", file=sys.stderr)
        return
    print(f"(answering with {loaded.active or 'the base alone'})", file=sys.stderr)


def cmd_eval(opts: EvalOptions) -> int:
    """Loss and perplexity on a file, or on a run's held-out split (loss and accuracy for a classifier)."""
    from .evaluation import evaluate_dataset
    from .settings import DataConfig

    loaded = _load(opts, several=False)
    run = loaded.run
    if opts.data is None and run is None:
        raise QLoRAKitError("eval needs --data FILE (or a run folder, whose held-out split is then evaluated)")
    # A run's data section says how rows were rendered in training; flags override it.
    data = run.data if run is not None else DataConfig()
    if opts.data is not None:
        data = dataclasses.replace(data, path=opts.data, split=opts.split or data.split, max_samples=None)
    changes = {"format": opts.format, "max_seq_len": opts.max_seq_len, "split": opts.split}
    data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
    held_out_seed = run.train.seed if opts.data is None else None
    result = evaluate_dataset(loaded.model, loaded.tokenizer, data, batch_size=opts.batch_size,
                              held_out_seed=held_out_seed, max_examples=opts.max_samples)
    what = "held-out split of the run" if held_out_seed is not None else data.path
    result = {"data": what, "base": loaded.base.source,
              "adapter": str(loaded.adapter_dir) if loaded.adapter_dir else None, **result}
    if "accuracy" in result:  # a sequence classifier
        print(f"loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  "
              f"({result['correct']} of {result['examples']} examples right)")
    else:
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"({result['examples']} examples, {result['supervised_tokens']} supervised tokens)")
    if opts.json:
        from .atomic import write_json

        write_json(Path(opts.json), result)
        log.info("wrote %s", opts.json)
    return 0


def cmd_merge(opts: MergeOptions) -> int:
    """Merge an adapter into its base and print what was written and how it verified."""
    from .export import merge
    from .verify import summary

    fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name not in ("adapter", "out_dir")}
    result = merge(opts.adapter, opts.out_dir, **fields)
    print(f"merged {result.merged_modules} adapter modules into {result.out_dir} "
          f"(mode {opts.mode}, {opts.dtype}, {_size(result.bytes)} in {len(result.files)} file(s), "
          f"{result.seconds:.1f}s)")
    print("verification: " + (summary(result.verification) if result.verification else "skipped (--verify 0)"))
    return 0


def cmd_dequantize(opts: DequantizeOptions) -> int:
    """Dequantize a 4-bit checkpoint into a plain one."""
    from .export import dequantize

    result = dequantize(opts.src, opts.out_dir, dtype=opts.dtype, overwrite=opts.overwrite,
                        max_shard_size=opts.max_shard_size)
    print(f"dequantized {opts.src} into {result.out_dir} ({opts.dtype}, {result.tensors} tensors, "
          f"{_size(result.bytes)}, {result.seconds:.1f}s)")
    return 0


def cmd_export_gguf(opts: ExportGGUFOptions) -> int:
    """A GGUF model (merging a run or adapter first) or a GGUF LoRA adapter."""
    import tempfile

    from .adapter_io import find_adapter
    from .gguf_export import export_gguf, export_gguf_lora

    out = Path(opts.out_file)
    if opts.adapter_only:
        report = export_gguf_lora(opts.source, out, base=opts.base, type=opts.type, overwrite=opts.overwrite)
        print(f"wrote {out}: LoRA adapter for llama.cpp's --lora ({opts.type})")
        return 0
    if opts.type == "f32":
        raise QLoRAKitError("--type f32 is for adapters (--adapter-only); models are written as f16 or q8_0")
    if _is_adapter(opts.source, find_adapter):
        from .export import merge

        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as tmp:
            merged = merge(opts.source, Path(tmp) / "merged", verify=opts.verify)
            log.info("merged %d adapter modules; exporting GGUF", merged.merged_modules)
            report = export_gguf(Path(tmp) / "merged", out, type=opts.type, overwrite=opts.overwrite,
                                 verify=opts.verify > 0, verify_batches=max(opts.verify, 1))
    else:
        report = export_gguf(opts.source, out, type=opts.type, overwrite=opts.overwrite, verify=opts.verify > 0,
                             verify_batches=max(opts.verify, 1))
    verification = report.get("verification") or {}
    metrics = verification.get("metrics") or {}
    checked = (f"top-1 agreement {metrics['top1_agreement']:.2%}, KL {metrics['mean_kl']:.2e}"
               if metrics else "not verified (--verify 0)")
    print(f"wrote {out} ({opts.type}); {checked}")
    return 0


def _is_adapter(path: str, find_adapter) -> bool:
    try:
        find_adapter(path)
        return True
    except QLoRAKitError:
        return False


def cmd_plan(opts: PlanOptions) -> int:
    """Predict a run's peak GPU memory (simulated, no GPU needed) and what fits."""
    from . import memory_plan
    from .atomic import write_json

    run = load_recipe(opts.recipe, opts.overrides)
    result = memory_plan.plan(run, opts.gpu_memory, batch_size=opts.batch_size, seq_len=opts.seq_len,
                              search=not opts.no_search)
    print(result.render())
    if opts.json:
        write_json(Path(opts.json), result.as_dict())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the reference of every setting, one section, or one command's options."""
    name = args.section
    if name is None:
        print(describe(RunConfig))
        return 0
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    if name in sections:
        print(describe(type(getattr(RunConfig(), name)), prefix=name))
        return 0
    if name in COMMANDS and COMMANDS[name][0] is not None:
        print(describe(COMMANDS[name][0]))
        return 0
    options = [n for n, (cls, _, _) in COMMANDS.items() if cls is not None]
    raise QLoRAKitError(f"no config section or command '{name}'; sections are {', '.join(sections)}; "
                        f"commands are {', '.join(options)}")


def _load(opts, use_template: bool = True, several: bool = True):
    from .generation import load_model

    given = ([opts.run] if opts.run else []) + list(opts.adapter)
    if len(given) > 1 and not several:
        raise QLoRAKitError(f"this command takes one adapter ({len(given)} given); run it once per adapter")
    adapters = _named_adapters(given)
    generation = getattr(opts, "max_new_tokens", None) is not None
    return load_model(opts.base, adapters or None, device=opts.device, force=opts.force,
                      use_template=use_template, settings=opts if generation else None)


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _named_adapters(values: list[str]) -> dict[str, str] | str:
    """The adapters given on the command line: `PATH` or `NAME=PATH` each.

    One unnamed adapter is returned as its path (it gets the default name); several
    unnamed ones are named after their folders (a run's, for `RUN/adapter`).
    """
    if len(values) == 1 and not _split_name(values[0])[0]:
        return values[0]
    named: dict[str, str] = {}
    for value in values:
        name, path = _split_name(value)
        folder = Path(path)
        name = name or (folder.resolve().parent.name if folder.name == "adapter" else folder.resolve().name)
        if name in named:
            raise QLoRAKitError(f"two adapters are named '{name}'; name them: --adapter NAME=PATH")
        named[name] = path
    return named


def _split_name(value: str) -> tuple[str | None, str]:
    """'name=path' -> (name, path) unless `value` is itself an existing path; 'path' -> (None, path)."""
    name, sep, path = value.partition("=")
    if sep and _ADAPTER_NAME.fullmatch(name) and not Path(value).exists():
        return name, path
    return None, value


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


# name -> (options declaration, handler, help); train and config parse their own arguments.
COMMANDS = {
    "train": (None, cmd_train, "fine-tune an adapter as a recipe describes"),
    "generate": (GenerateOptions, cmd_generate, None),
    "chat": (ChatOptions, cmd_chat, None),
    "eval": (EvalOptions, cmd_eval, None),
    "merge": (MergeOptions, cmd_merge, None),
    "dequantize": (DequantizeOptions, cmd_dequantize, None),
    "export-gguf": (ExportGGUFOptions, cmd_export_gguf, None),
    "plan": (PlanOptions, cmd_plan, None),
    "config": (None, cmd_config, "print every setting with its type, range, default and meaning"),
}


# ---------------------------------------------------------------- arguments from declarations


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of `cls`: positionals where declared, else `--field-name`.

    Values stay strings here; `options_from_args` converts and checks them with
    the same code as config files, so errors read the same everywhere.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        doc = docs.get(f.name, "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.metadata.get("positional"):
            many = typing.get_origin(hints[f.name]) is list
            parser.add_argument(f.name, metavar=f.metadata.get("metavar") or f.name.upper(),
                                nargs="*" if many else (None if required else "?"), default=argparse.SUPPRESS, help=doc)
            continue
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=doc)
            continue
        if typing.get_origin(hints[f.name]) is list:  # a repeatable flag: --adapter a=x --adapter b=y
            parser.add_argument(flag, dest=f.name, metavar="VALUE", action="append", default=argparse.SUPPRESS,
                                help=doc)
            continue
        shown = "" if required or f.default is None else f" (default {f.default})"
        parser.add_argument(flag, dest=f.name, metavar=_metavar(hints[f.name]), required=required,
                            default=argparse.SUPPRESS, help=doc + shown)


def _metavar(tp) -> str:
    inner = _without_none(tp)
    if typing.get_origin(inner) is typing.Literal:
        return "{" + ",".join(str(c) for c in typing.get_args(inner)) + "}"
    return {int: "N", float: "X"}.get(inner, "VALUE")


def options_from_args(cls: type, args: argparse.Namespace):
    """Build and check `cls` from parsed arguments; every problem is reported at once."""
    import yaml

    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in vars(args):
            continue
        raw = getattr(args, f.name)
        # Text options keep the user's text as typed ('yes' stays 'yes'); numbers are read as YAML scalars.
        if isinstance(raw, str) and not _is_text(hints[f.name]):
            try:
                raw = yaml.safe_load(raw)
            except yaml.YAMLError:
                pass  # left as text: the type check below reports it
        values[f.name] = raw
    flag = {f.name: (f.metadata.get("metavar") or f.name.upper()) if f.metadata.get("positional")
            else "--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)}
    return from_dict(cls, values, name=lambda path: flag.get(path, path),
                     hint=f"See `qlora-kit {args.command} --help` for every option.")


def _is_text(tp) -> bool:
    inner = _without_none(tp)
    return inner is str or (typing.get_origin(inner) is typing.Literal and
                            all(isinstance(c, str) for c in typing.get_args(inner)))


def _without_none(tp):
    """`Optional[X]` -> X; any other type as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return options[0] if len(options) == 1 else tp
    return tp


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subcommand per entry of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="qlora-kit",
        description="Fine-tune large language models on one GPU with QLoRA: 4-bit NF4 base, LoRA adapters.",
    )
    parser.add_argument("--version", action="version", version=f"qlora-kit {__version__}")
    _add_verbose(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, handler, help) in COMMANDS.items():
        # A declaration's docstring: "`qlora-kit NAME`: summary." then details.
        doc = inspect.cleandoc(cls.__doc__).split(": ", 1)[-1] if cls is not None else help
        summary = doc.splitlines()[0].rstrip(".")
        sub = commands.add_parser(name, help=summary, description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_verbose(sub, argparse.SUPPRESS)
        sub.set_defaults(handler=handler, options=cls)
        if cls is not None:
            add_options(sub, cls)
        elif name == "train":
            _add_train_arguments(sub)
        else:
            sub.add_argument("section", nargs="?", help="only this section (model, quant, lora, data, train) "
                                                        "or command (generate, chat, eval, merge, dequantize)")
    return parser


def _add_train_arguments(sub: argparse.ArgumentParser) -> None:
    sub.description = ("Train an adapter. CONFIG is a recipe YAML (see recipes/); section.key=value items "
                       "override it, e.g. train.max_steps=20 lora.rank=8. `qlora-kit config` lists every key.")
    sub.add_argument("config", nargs="?", metavar="CONFIG", help="recipe YAML")
    sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the recipe")
    sub.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in train.output_dir (same as train.resume=true)")
    sub.add_argument("--overwrite", action="store_true",
                     help="delete what train.output_dir holds and start a new run there (same as "
                          "train.overwrite=true); without it, a folder that is not empty and not a run is refused")
    sub.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def _add_verbose(parser: argparse.ArgumentParser, default) -> None:
    # On the main parser and every subcommand, so `-v` works before or after the command.
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")


def _train_flag_hint(items: list[str]) -> str | None:
    """`--max-steps 5`, the habit from other trainers, spelled as the override it means."""
    keys = {f"{section.name}.{f.name}": f.name for section in dataclasses.fields(RunConfig)
            for f in dataclasses.fields(section.default_factory())}
    for i, item in enumerate(items):
        name = item.lstrip("-").split("=", 1)[0].replace("-", "_")
        found = [key for key, leaf in keys.items() if leaf == name or key == name]
        if item.startswith("--") and len(found) == 1:
            value = item.split("=", 1)[1] if "=" in item else (items[i + 1] if i + 1 < len(items) else "VALUE")
            return f"{item} is not a train option; settings are overrides: qlora-kit train CONFIG {found[0]}={value}"
    return None


# ---------------------------------------------------------------- logging


def setup_logging(verbose: bool) -> logging.Handler:
    """Concise INFO (or DEBUG) lines from qlora_kit on stderr; third-party libraries only on warnings.

    Returns the handler it put on the root logger, so an in-process caller can remove it.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("qlora_kit").setLevel(logging.DEBUG if verbose else logging.INFO)
    # bitsandbytes warns on every CPU run about optional kernels; that is not the user's concern.
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    return handler


def _quiet_libraries() -> None:
    """transformers' and datasets' own logs and progress bars off (after parsing: they are slow to import)."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status (0 ok, 1 bug, 2 user error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before the parser imports the library: some libraries log on import.
    handler = setup_logging(verbose=any(a in ("-v", "--verbose") for a in argv))
    try:
        return _run(argv)
    finally:
        logging.getLogger().removeHandler(handler)


def _takes_overrides(args) -> bool:
    """Whether the command reads `section.key=value` overrides of a recipe (train, plan)."""
    if args.options is not None:
        return "overrides" in {f.name for f in dataclasses.fields(args.options)}
    return hasattr(args, "overrides")


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra:
            # Overrides may follow options (`train cfg.yaml --resume lora.rank=8`, `plan r.yaml --gpu-memory
            # 24GiB train.batch_size=1`); argparse leaves those here.
            if _takes_overrides(args) and all("=" in item and not item.startswith("-") for item in extra):
                args.overrides = list(getattr(args, "overrides", None) or []) + extra
            elif args.command == "train" and (hint := _train_flag_hint(extra)):
                raise QLoRAKitError(hint)
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        _quiet_libraries()
        target = options_from_args(args.options, args) if args.options is not None else args
        return args.handler(target)
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train" and args.config:
            kept = [o for o in args.overrides if not o.startswith(("train.resume=", "train.overwrite="))]
            again = " ".join([args.config, *kept, "--resume"])
            hint = f"; continue from the last checkpoint with: qlora-kit train {again}"
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # sorted by expected_error: the user's to fix (2), or a bug (1)
        message = expected_error(exc)
        if message is None:
            return _report_bug(exc, args, argv)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


def expected_error(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can fix; None for anything else (a bug).

    The list is short on purpose: each entry is a failure whose cause lies outside
    qlora_kit's code (a file, the data, the model, the machine). Library modules are
    looked up only if already imported: their exceptions cannot come from elsewhere.
    """
    torch, jinja2 = sys.modules.get("torch"), sys.modules.get("jinja2")
    if isinstance(exc, QLoRAKitError):
        return str(exc)
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return (f"out of GPU memory ({_first_line(exc)}). Lower train.batch_size or data.max_seq_len, keep "
                "train.gradient_checkpointing=true, use a smaller base, or free the GPU from other processes")
    if jinja2 is not None and isinstance(exc, jinja2.TemplateError):
        return (f"the chat template failed: {type(exc).__name__}: {exc}. Fix data.chat_template (or the "
                "tokenizer's chat_template), or use a built-in one such as data.chat_template=chatml")
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not valid UTF-8 text ({exc}); save it as UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return f"a file is not valid JSON ({exc}); fix or replace it"
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return (f"{_first_line(exc)} qlora_kit runs a checkpoint's own code only when model.trust_remote_code=true "
                "(set it in the recipe, only for a source you trust)")
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}. Check the path, its permissions and the free disk space"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _report_bug(exc: Exception, args: argparse.Namespace, argv: list[str]) -> int:
    """An unexpected exception: its traceback to a log file (the run's train.log for train), a short message."""
    import time
    import traceback

    text = "".join(traceback.format_exception(exc))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log_file = getattr(args, "log_file", None)
    try:
        from .run_folder import is_run_folder

        if log_file is not None and log_file.is_file() and is_run_folder(log_file.parent):
            with open(log_file, "a", encoding="utf-8") as f:  # the run's own log, after its last line
                f.write(f"{stamp} ERROR qlora_kit.cli: unexpected error\n{text}")
        else:
            from . import atomic
            from .packaged import cache_dir

            log_file = cache_dir() / "logs" / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(log_file, f"{stamp} qlora-kit {' '.join(argv)}\n{text}")
        where = f"the traceback is in {log_file}"
    except Exception as log_error:  # noqa: BLE001  (reporting must not hide the original error)
        where = f"the traceback could not be written to a log file ({log_error})"
    verbose = bool(getattr(args, "verbose", False))
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: unexpected {type(exc).__name__}: {_first_line(exc)}\n"
          f"This is a bug in qlora_kit or a library it uses, not a problem in your input; {where}. "
          "Please report it with that file" + ("." if verbose else " (run again with -v to see it here)."),
          file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())

"""The `qlora-kit` command line: a thin layer that parses arguments and calls the library.

    qlora-kit train CONFIG [section.key=value ...] [--resume]     fine-tune an adapter
    qlora-kit generate [RUN|ADAPTER] [--base X] --prompt "..."    one reply
    qlora-kit chat [RUN|ADAPTER] [--base X]                       interactive, reads stdin
    qlora-kit eval [RUN|ADAPTER] [--base X] --data FILE           loss and perplexity
    qlora-kit config [SECTION]                                    every config key, documented
    qlora-kit merge RUN OUT / qlora-kit dequantize SRC OUT        exports (see export_cli)

`accelerate launch -m qlora_kit.cli train CONFIG ...` runs the same entry point on
several processes. Errors a user can fix (`QLoRAKitError`) print as `error: ...`
and exit with status 2, without a traceback; bugs still raise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

from .errors import QLoRAKitError

log = logging.getLogger("qlora_kit.cli")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .training import train

    if args.help_config:
        return _print_config(None)
    if args.config is None:
        raise QLoRAKitError("train needs a recipe: qlora-kit train CONFIG.yaml [section.key=value ...]")
    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    run = load_recipe(args.config, overrides)
    summary = train(run)
    print(json.dumps({k: summary[k] for k in ("steps", "first_eval_loss", "final_eval_loss", "final_eval_ppl",
                                              "train_time_s") if k in summary}))
    print(f"run folder: {run.train.output_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    print(loaded.generate(args.prompt, system=args.system).strip())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generation import ChatSession

    session = ChatSession(_load(args), system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
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
        session.send(text, stream=lambda piece: print(piece, end="", flush=True))
        print(flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import DataConfig
    from .evaluation import evaluate_dataset

    loaded = _load(args)
    run = loaded.run
    if args.data is None and run is None:
        raise QLoRAKitError("eval needs --data FILE (or a run folder, whose held-out split is then evaluated)")
    # A run's data section says how rows were rendered in training; flags override it.
    data = run.data if run is not None else DataConfig()
    if args.data is not None:
        data = dataclasses.replace(data, path=args.data, split=args.split or data.split, max_samples=None)
    changes = {"format": args.format, "max_seq_len": args.max_seq_len, "max_samples": args.max_samples,
               "split": args.split}
    data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
    held_out_seed = run.train.seed if args.data is None else None
    result = evaluate_dataset(loaded.model, loaded.tokenizer, data, batch_size=args.batch_size,
                              held_out_seed=held_out_seed)
    what = "held-out split of the run" if held_out_seed is not None else data.path
    result = {"data": what, "base": loaded.model.qlora_kit_base.source,
              "adapter": str(loaded.adapter_dir) if loaded.adapter_dir else None, **result}
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
          f"({result['examples']} examples, {result['supervised_tokens']} supervised tokens)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    return _print_config(args.section)


def _print_config(section: str | None) -> int:
    from .config import describe
    from .recipe import RunConfig

    if section is None:
        print(describe(RunConfig))
        return 0
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    if section not in sections:
        raise QLoRAKitError(f"no config section '{section}'; sections are: {', '.join(sections)}")
    print(describe(type(getattr(RunConfig(), section)), prefix=section))
    return 0


def _load(args: argparse.Namespace):
    from .generation import GenerationSettings, load_model

    adapter = args.adapter or args.run
    if args.adapter and args.run:
        raise QLoRAKitError("give the adapter either as the positional argument or with --adapter, not both")
    settings = GenerationSettings(
        max_new_tokens=getattr(args, "max_new_tokens", 256),
        temperature=getattr(args, "temperature", 0.0),
        top_p=getattr(args, "top_p", 1.0),
        seed=getattr(args, "seed", None),
    )
    return load_model(args.base, adapter, device=args.device, force=args.force,
                      use_template=not getattr(args, "no_chat_template", False), settings=settings)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .export_cli import DEQUANTIZE_HELP, build_dequantize_parser, build_merge_parser, main_dequantize, main_merge
    from .export import MERGE_HELP

    parser = argparse.ArgumentParser(
        prog="qlora-kit",
        description="Fine-tune large language models on one GPU with QLoRA: 4-bit NF4 base, LoRA adapters.",
    )
    _add_verbose(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler, help: str, description: str | None = None):
        sub = commands.add_parser(name, help=help, description=description or help,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_verbose(sub, argparse.SUPPRESS)
        sub.set_defaults(handler=handler)
        return sub

    train = command("train", cmd_train, "fine-tune an adapter as a recipe describes",
                    "Train an adapter. CONFIG is a recipe YAML (see recipes/); section.key=value items "
                    "override it, e.g. train.max_steps=20 lora.rank=8.")
    train.add_argument("config", nargs="?", metavar="CONFIG", help="recipe YAML")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the recipe")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in train.output_dir (same as train.resume=true)")
    train.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")

    for name, handler, help in (
        ("generate", cmd_generate, "generate a reply to one prompt with a base and optional adapter"),
        ("chat", cmd_chat, "chat with a base and optional adapter (reads lines from stdin; /reset, /exit)"),
        ("eval", cmd_eval, "loss and perplexity of a base or base + adapter on a dataset"),
    ):
        sub = command(name, handler, help)
        _add_model_arguments(sub)
        if name == "generate":
            sub.add_argument("--prompt", required=True, help="the user's message")
        if name in ("generate", "chat"):
            _add_generation_arguments(sub, chat=name == "chat")
        if name == "eval":
            _add_eval_arguments(sub)

    config = command("config", cmd_config, "print every config key with its type, default and meaning")
    config.add_argument("section", nargs="?", help="only this section: model, quant, lora, data or train")

    merge = command("merge", main_merge, "merge an adapter into its base: a plain Hugging Face checkpoint",
                    MERGE_HELP)
    build_merge_parser(merge)
    dequantize = command("dequantize", main_dequantize,
                         "turn a bitsandbytes 4-bit checkpoint into a plain 16/32-bit one", DEQUANTIZE_HELP)
    build_dequantize_parser(dequantize)
    return parser


def _add_verbose(parser: argparse.ArgumentParser, default) -> None:
    # On the main parser and every subcommand, so `-v` works before or after the command.
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")


def _add_model_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("run", nargs="?", metavar="RUN|ADAPTER",
                     help="a training run folder or an adapter folder (same as --adapter)")
    sub.add_argument("--adapter", help="adapter folder, or a run folder holding adapter/")
    sub.add_argument("--base", help="base model: local folder, Hub id, .gguf file or 'smollm2-135m-instruct' "
                                    "(default with an adapter: the base it was trained on)")
    sub.add_argument("--device", help="'cuda', 'cuda:1', 'cpu' (default: CUDA when present)")
    sub.add_argument("--force", action="store_true",
                     help="load the adapter even if the base differs from the one it was trained on")


def _add_generation_arguments(sub: argparse.ArgumentParser, chat: bool) -> None:
    sub.add_argument("--system", help="system message")
    sub.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    sub.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    sub.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when sampling (default 1.0)")
    sub.add_argument("--seed", type=int, help="seed for sampling")
    if not chat:
        sub.add_argument("--no-chat-template", action="store_true",
                         help="send the prompt as plain text instead of through the chat template / prompt style")


def _add_eval_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--data", help="a .jsonl/.json/.csv/.parquet file, pkg:// path or Hub dataset "
                                    "(default with a run folder: the run's held-out split)")
    sub.add_argument("--format", choices=["instruction", "chat", "text"],
                     help="row format (default: the run's, else instruction)")
    sub.add_argument("--split", help="split of a Hub dataset (default train)")
    sub.add_argument("--max-seq-len", type=int, help="tokens per example; longer ones are cut (default: the run's)")
    sub.add_argument("--max-samples", type=int, help="evaluate only the first N rows")
    sub.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    sub.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT")


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
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    return handler


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before the parser imports the library: some libraries log on import.
    handler = setup_logging(verbose=any(a in ("-v", "--verbose") for a in argv))
    try:
        return _run(argv)
    finally:
        logging.getLogger().removeHandler(handler)


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Overrides may follow options (`train cfg.yaml --resume lora.rank=8`); argparse leaves those here.
        if args.command == "train" and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except QLoRAKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train" and args.config:
            again = " ".join([args.config, *args.overrides, "--resume"])
            hint = f"; continue from the last checkpoint with: qlora-kit train {again}"
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""The ``cvtlab`` command: one entry point for models, layer tables, data, training,
evaluation, prediction and export.

User mistakes (a bad name, file, flag or value) end with one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import CvtLabError, RunInterrupted


def _cmd_models(args: argparse.Namespace) -> None:
    import torch

    from .models.registry import DESCRIPTIONS, MODEL_CONFIGS, create_model
    from .summary import summarize

    rows = []
    for name, cfg in MODEL_CONFIGS.items():
        with torch.device("meta"):
            model = create_model(name)
        s = summarize(model)
        rows.append(
            {
                "name": name,
                "params_m": round(s["total_params"] / 1e6, 2),
                "gmacs": round(s["total_macs"] / 1e9, 3),
                "img_size": cfg.img_size,
                "num_classes": cfg.num_classes,
                "description": DESCRIPTIONS.get(name, ""),
            }
        )
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<10} {'params':>8} {'GMACs':>8} {'size':>5} {'classes':>7}  description")
    for r in rows:
        print(
            f"{r['name']:<10} {r['params_m']:>7.2f}M {r['gmacs']:>8.3f} {r['img_size']:>5} "
            f"{r['num_classes']:>7}  {r['description']}"
        )


def _is_weights(path: Path) -> bool:
    """A path ``from_pretrained`` reads: a folder, or a weights file (not a recipe's YAML)."""
    return path.is_dir() or (path.is_file() and path.suffix.lower() not in (".yaml", ".yml"))


def _cmd_summary(args: argparse.Namespace) -> None:
    import torch

    from .models.registry import create_model, list_models
    from .summary import format_summary, summarize

    name, overrides, img_size = args.model, {}, args.img_size
    if name not in list_models() and _is_weights(Path(name)):
        # A trained model (a run folder, a checkpoint, an export, official weights): its own
        # architecture and classes.
        from .models.pretrained import from_pretrained

        heads = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = from_pretrained(name, **heads).eval()
        print(format_summary(summarize(model, img_size), args.format))
        return
    if name not in list_models():
        from .train.config import make_config, recipe_path

        try:
            recipe_path(name)
        except CvtLabError:
            pass  # not a recipe either: create_model below names the unknown model
        else:
            # A recipe's model is its registered model with the recipe's overrides applied.
            cfg = make_config(name)
            name, overrides = cfg.model, dict(cfg.model_overrides)
            img_size = img_size or cfg.img_size
    with torch.device("meta"):
        model = create_model(name, num_classes=args.num_classes, img_size=img_size, **overrides)
    print(format_summary(summarize(model, img_size), args.format))


def _cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare_runs, format_comparison

    result = compare_runs(args.runs)
    if args.plot:
        from .report import compare_curves, warn_missing_glyphs

        compare_curves(result["runs"], args.plot)
        warn_missing_glyphs(args.plot)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(format_comparison(result))
        if args.plot:
            print(f"plot: {args.plot}")


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def _classes(text: str) -> int:
    if text.strip() == "0":
        return 0
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number, 0 for no head, not {text!r}"
        ) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"cvtlab: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cvtlab", description="Convolutional vision Transformers: models, data, training."
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    p = sub.add_parser("models", help="list the registered models with parameters and GMACs")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("summary", help="layer-by-layer output shapes, parameters and MACs")
    p.add_argument(
        "model",
        help="a registered model, a recipe (its model and overrides), or a trained model: a run "
        "folder, a .ckpt, a .safetensors export, an official .pth or a Hugging Face folder",
    )
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument(
        "--num-classes", type=_classes, default=None, help="0: no head (the pooled features)"
    )
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    p.set_defaults(func=_cmd_summary)

    from .data.commands import register as register_data
    from .train.commands import register as register_train

    register_data(sub)
    register_train(sub)

    p = sub.add_parser(
        "compare", help="run folders side by side: figures, differing settings, curves"
    )
    p.add_argument("runs", nargs="+", help="run folders (finished or still running)")
    p.add_argument("--plot", help="write validation top-1 by time and by step to this PNG")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except CvtLabError as e:
        if not isinstance(e, RunInterrupted):
            print(f"cvtlab: error: {e}", file=sys.stderr)
        elif not e.quiet:
            print(f"cvtlab: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cvtlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped early (`cvtlab summary cvt_w24 | head`): the rest has nowhere to
        # go. Point stdout at /dev/null so that the interpreter's final flush stays quiet too.
        _discard_stdout()
        return 141  # 128 + SIGPIPE, the status a shell gives a command its pipe cut off
    except OSError as e:
        # A file system's refusal (permissions, a full disk, a read-only data folder): its
        # message names the path, and a traceback would add nothing the user can act on.
        print(f"cvtlab: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


def _discard_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in a test)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``ttaperso demo | strategies | models``.

Exit codes: 0 success, 1 a ttaperso error (one line on stderr), 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import TTAPersoError

__all__ = ["main", "build_parser"]

log = logging.getLogger("ttaperso")


def _strategy_summaries() -> dict[str, tuple[str, dict[str, Any]]]:
    """Strategy name -> (one-line description, default config as a dict)."""
    from .strategies import get_config_class, list_strategies

    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in list_strategies():
        config_cls = get_config_class(name)
        module = sys.modules.get(config_cls.__module__)
        doc = (getattr(module, "__doc__", None) or config_cls.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else ""
        prefix = f"``{name}``:"
        if summary.startswith(prefix):  # module docstrings open with "``name``: ..."
            summary = summary[len(prefix) :].strip()
        out[name] = (summary, config_cls().to_dict())
    return out


def _epilog() -> str:
    from .models import describe_models
    from .strategies import list_strategies

    lines = ["strategies: " + ", ".join(list_strategies()), "models:"]
    lines += [f"  {name}: {text}" for name, text in describe_models().items()]
    lines.append("Run `ttaperso strategies` for each strategy's default options.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its epilog lists the registered strategies and models)."""
    parser = argparse.ArgumentParser(
        prog="ttaperso",
        description="Per-subject test-time personalization of frozen facial-expression models.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ttaperso {__version__}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run every strategy on toy subjects (CPU, nothing downloaded)",
        description="Train (or load from the cache) a small CNN on toy faces, then personalize "
        "it to held-out subjects with every registered strategy; print a table and write a "
        "PNG plot and a JSON file.",
    )
    demo.add_argument(
        "--out",
        default="ttaperso-demo/",
        metavar="DIR",
        help="output folder (default: %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run")

    sub.add_parser("strategies", help="list the registered strategies and their default options")
    sub.add_parser("models", help="list the pretrained models `load_model` knows")
    return parser


def _setup_logging(level: int) -> None:
    """Send ttaperso's log records to stderr (replacing a handler of an earlier call)."""
    for handler in list(log.handlers):
        if getattr(handler, "_ttaperso_cli", False):
            log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[ttaperso] %(message)s"))
    handler._ttaperso_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)


def _cmd_strategies() -> None:
    for name, (summary, defaults) in _strategy_summaries().items():
        print(f"{name}: {summary}" if summary else name)
        for key, value in defaults.items():
            print(f"    {key} = {json.dumps(value)}")


def _cmd_models() -> None:
    from .models import describe_models

    models = describe_models()
    width = max((len(n) for n in models), default=0)
    for name, text in models.items():
        print(f"{name:<{width}}  {text}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 ttaperso error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("ttaperso: error: a command is required (demo, strategies, models)", file=sys.stderr)
        return 2
    _setup_logging(
        logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    )
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, seed=args.seed, quick=args.quick)
        elif args.command == "strategies":
            _cmd_strategies()
        elif args.command == "models":
            _cmd_models()
    except TTAPersoError as exc:
        print(f"ttaperso: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ttaperso: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

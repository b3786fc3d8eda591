"""Command line: ``ttaperso run | demo | strategies | models | study | bench | audit verify``.

Also ``python -m ttaperso``. Exit codes: 0 success, 1 a ttaperso error (one line on
stderr, in the command line's terms), 2 a usage error, 130 interrupted.

**Adding a subcommand from another module** is one line: append ``"module:function"`` to
:data:`COMMANDS`. ``function(subparsers)`` adds its parser and sets
``parser.set_defaults(handler=fn)``; ``fn(args, argv)`` runs the command and returns an
exit code (None means 0). Optionally ``set_defaults(cli_options={"python_name":
"--option"})`` makes error messages that name a Python argument name the option instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .errors import TTAPersoError

__all__ = ["main", "build_parser"]

log = logging.getLogger("ttaperso")

#: Subcommands defined in other modules, one "module:function" each (see the docstring).
COMMANDS: list[str] = [
    "ttaperso.video.command:add_run_parser",
]


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


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_commands(sub: Any) -> None:
    """The subcommands listed in :data:`COMMANDS`."""
    import importlib

    for spec in COMMANDS:
        module, _, function = spec.partition(":")
        getattr(importlib.import_module(module), function)(sub)


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
    _add_commands(sub)

    demo = sub.add_parser(
        "demo",
        help="run every strategy on SynthFace subjects (CPU, nothing downloaded)",
        description="Train (or load from the cache) a small CNN on SynthFace source subjects, "
        "then personalize it to held-out target subjects with shifted sessions, with every "
        "registered strategy; print a per-subject table and write a PNG plot and a JSON file.",
    )
    demo.add_argument(
        "--out",
        default="ttaperso-demo/",
        metavar="DIR",
        help="output folder (default: %(default)s)",
    )
    demo.add_argument(
        "--seed", type=_seed, default=0, help="random seed, an integer >= 0 (default: %(default)s)"
    )
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run")
    demo.set_defaults(cli_options={"seed": "--seed", "out_dir": "--out"})

    sub.add_parser("strategies", help="list the registered strategies and their default options")
    sub.add_parser("models", help="list the pretrained models `load_model` knows")

    audit = sub.add_parser("audit", help="check the hash-chained audit logs of subjects")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = audit_sub.add_parser(
        "verify",
        help="verify every subject log in a folder (exit 1 if anything fails)",
        description="Recompute every record's hash and chain link and check that each log "
        "ends with a complete line and records every write of its subject; with --states, "
        "also check that every current state file is the last save its subject's log "
        "records. Exit 0 only when everything checks out.",
    )
    verify.add_argument("folder", help="folder of *.audit.jsonl files")
    verify.add_argument("--states", metavar="DIR", help="state folder to cross-check")
    verify.add_argument(
        "--allow-empty",
        action="store_true",
        help="exit 0 when there is nothing to verify (default: exit 1)",
    )
    _add_study_parser(sub)
    from .bench.cli import add_bench_parser

    add_bench_parser(sub)
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _add_study_parser(sub: Any) -> None:
    """``ttaperso study CONFIG [KEY=VALUE ...]`` (see ttaperso.study.config for the schema)."""
    from .study.sources import dataset_kinds, model_kinds

    study = sub.add_parser(
        "study",
        help="run a cross-dataset personalization study from a TOML config (resumable)",
        description="Run models x strategies (grids selected on the dev set) x datasets x "
        "stream protocols x seeds from a TOML config, then write report.md, PNG plots and "
        "results.json. Finished cells are cached: rerunning an interrupted study computes "
        "only the missing ones.",
        epilog=_epilog()
        + "\ndataset kinds: "
        + ", ".join(dataset_kinds())
        + "\nmodel kinds: "
        + ", ".join(model_kinds())
        + "\nexample: ttaperso study experiments/studies/jaffe.toml seeds=[0,1] "
        "grid.tent.lr=[1e-4]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    study.add_argument("config", help="study TOML file")
    study.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (TOML values)"
    )
    study.add_argument(
        "--out", metavar="DIR", help="output folder (default: study_<name> in the current folder)"
    )
    study.add_argument("--cache", metavar="DIR", help="cell cache folder (default: <out>/cells)")
    study.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the cells as Ray tasks (a cluster's address, or none: a local cluster on loopback)",
    )
    study.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on when stderr is a terminal)",
    )


def _cmd_study(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    import shlex

    from .study import load_study_config, run_study, write_report

    config = load_study_config(args.config, args.overrides)
    out = args.out or f"study_{config.name}"
    executor = None
    if args.ray is not None:
        from .study.ray_cells import ray_executor

        executor = ray_executor(None if args.ray == "local" else args.ray)
    run = run_study(config, out, progress=args.progress, cache=args.cache, executor=executor)
    words = list(sys.argv[1:] if argv is None else argv)
    command = "ttaperso " + " ".join(shlex.quote(w) for w in words)
    report = write_report(run, command=command)
    log.info("report: %s", report)


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


def _cmd_audit_verify(folder: str, states: str | None, allow_empty: bool) -> int:
    """Print one line per subject log (and state); return 0 when everything checks out."""
    from .audit import verify, verify_states

    reports = verify(folder)
    checks = verify_states(folder, states, reports) if states else []
    failed = 0
    for report in reports:
        print(
            f"{'ok' if report.ok else 'FAILED':6}  log {report.path.name} "
            f"({report.subject!r}): {report.records} records, last hash {report.last_hash[:16]}"
        )
        for problem in report.errors:
            print(f"    {problem}")
        failed += not report.ok
    for check in checks:
        version = "" if check.version is None else f", version {check.version}"
        print(
            f"{'ok' if check.ok else 'FAILED':6}  state {check.file} ({check.subject!r}{version})"
        )
        for problem in check.errors:
            print(f"    {problem}")
        failed += not check.ok
    summary = f"{len(reports)} log(s)"
    if states:
        summary += f", {len(checks)} state(s) in {states}"
    print(f"{summary}, {failed} failed")
    if not reports and not checks:
        if allow_empty:
            return 0
        print(
            f"ttaperso: error: nothing to verify: {folder!r} holds no *.audit.jsonl logs"
            + (f" and {states!r} no states" if states else "")
            + " (pass --allow-empty to accept that)",
            file=sys.stderr,
        )
        return 1
    return 1 if failed else 0


def _in_cli_terms(message: str, options: dict[str, str]) -> str:
    """``message`` with the Python argument names of ``options`` replaced by their options."""
    for name, option in options.items():
        message = message.replace(f"argument `{name}`", option).replace(f"`{name}`", option)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 ttaperso error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        names = ", ".join(sorted(sub for sub in _subcommand_names(parser)))
        print(f"ttaperso: error: a command is required ({names})", file=sys.stderr)
        return 2
    _setup_logging(
        logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    )
    try:
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args, argv) or 0)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, seed=args.seed, quick=args.quick)
        elif args.command == "strategies":
            _cmd_strategies()
        elif args.command == "models":
            _cmd_models()
        elif args.command == "audit":
            return _cmd_audit_verify(args.folder, args.states, args.allow_empty)
        elif args.command == "study":
            _cmd_study(args, argv)
        elif args.command == "bench":
            from .bench.cli import run_bench_command

            run_bench_command(args, argv)
        elif args.command == "serve":
            from .serve.cli import run_serve_command

            return run_serve_command(args)
    except TTAPersoError as exc:
        message = _in_cli_terms(str(exc), getattr(args, "cli_options", {}))
        print(f"ttaperso: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ttaperso: interrupted", file=sys.stderr)
        return 130
    return 0


def _subcommand_names(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:  # argparse keeps its subparsers here, no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

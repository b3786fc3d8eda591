"""Speed and memory of ``ttaperso run`` on 640x480, 25 frames/s SynthFace videos (issue 18).

Writes one-face videos of the requested lengths (SynthFace faces composited into 640x480
frames, ``ttaperso.video.synthetic``), then runs the real command line on each in a
separate process (``python -m ttaperso run VIDEO --subject s``, the default strategy and
detector, annotated MP4 and every other output included) and reports per video:

* wall time / video duration (goal <= 1.5) and the process's CPU time (user + system,
  from ``resource.getrusage(RUSAGE_CHILDREN)``: what an idle machine would need; the
  machine is shared, so the load average before and after is printed too);
* peak resident memory of the process (its ``VmHWM``; goal <= 1 GB whatever the length);
* frames whose face was found, frames that adapted the state;
* for a two-face video: the identity consistency (fraction of each person's frames
  reported under their own subject id; goal >= 0.95).

    python experiments/run_speed.py                      # 60 s and 10 min, + two faces
    python experiments/run_speed.py --durations 60 --no-two-faces

Results go to ``experiments/results/run_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_one(video: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """``python -m ttaperso run`` in a child process; its wall, CPU and peak memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = _load()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ttaperso", "-q", "run", str(video), "--out", str(out), *extra],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"ttaperso run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        # the process's own high-water mark (VmHWM, see ttaperso.video.command): the
        # children's ru_maxrss would also count this parent's pages, which a forked
        # child holds until it starts the new program
        "peak_rss_mb": summary["peak_rss_mb"],
        "frames": summary["frames"],
        "faces_found": sum(r["face_found"] == "true" for r in rows),
        "updated": sum(r["updated"] == "true" for r in rows),
        "loop_wall_s": summary["wall_s"],
        "loop_cpu_s": summary["cpu_s"],
        "load_before": load_before,
        "load_after": _load(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durations", default="60,600", help="video lengths in seconds")
    parser.add_argument("--two-faces", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--two-faces-seconds", type=float, default=60.0)
    parser.add_argument("--work", help="folder for the videos (default: a temporary one)")
    parser.add_argument(
        "--reuse", action="store_true", help="keep one-face videos already in --work"
    )
    parser.add_argument(
        "--out", default=str(REPO / "experiments" / "results"), help="results folder"
    )
    args = parser.parse_args(argv)

    from ttaperso.video.synthetic import identity_consistency, write_synthface_video

    work = Path(args.work or tempfile.mkdtemp(prefix="run_speed-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "runs": []}
    runs: list[dict[str, Any]] = []
    for seconds in [float(s) for s in args.durations.split(",") if s]:
        path = work / f"one-{int(seconds)}s.mp4"
        if not (args.reuse and path.is_file()):
            write_synthface_video(path, seconds=seconds)
        r = run_one(path, work / f"out-{int(seconds)}s", ["--subject", "s"])
        r.pop("rows")
        r.update(kind="one face", seconds=seconds, wall_over_duration=r["wall_s"] / seconds,
                 cpu_over_duration=r["cpu_s"] / seconds)  # fmt: skip
        print(json.dumps(r), flush=True)
        runs.append(r)
    if args.two_faces:
        seconds = args.two_faces_seconds
        video = write_synthface_video(work / "two.mp4", seconds=seconds, faces=2, seed=3)
        r = run_one(video.path, work / "out-two", [])
        rows = r.pop("rows")
        faces = [
            (int(x["frame"]), x["subject"], (int(x["x"]), int(x["y"]), int(x["w"]), int(x["h"])))
            for x in rows  # type: ignore[attr-defined]
            if x["subject"]
        ]
        r.update(kind="two faces", seconds=seconds, wall_over_duration=r["wall_s"] / seconds,
                 cpu_over_duration=r["cpu_s"] / seconds,
                 identity=identity_consistency(video, faces))  # fmt: skip
        print(json.dumps(r), flush=True)
        runs.append(r)
    results["runs"] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# ttaperso run: speed and memory (640x480, 25 frames/s SynthFace videos)",
        "",
        "Command: `python experiments/run_speed.py` (default strategy and Haar detector,",
        "every output written). Wall and CPU are of the whole `python -m ttaperso run` process",
        "(imports and model loading included); the machine is shared (load averages shown).",
        "",
        "| video | frames | wall / duration | CPU / duration | peak RSS (MB) | faces found | "
        "adapted | load before -> after | identity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ident = r.get("identity")
        ident_text = (
            f"min {ident['min']:.3f}, distinct {ident['distinct']}"  # type: ignore[index]
            if ident
            else ""
        )
        lines.append(
            f"| {r['kind']}, {r['seconds']:.0f} s | {r['frames']} | {r['wall_over_duration']:.2f} | "
            f"{r['cpu_over_duration']:.2f} | {r['peak_rss_mb']:.0f} | {r['faces_found']} | "
            f"{r['updated']} | {r['load_before']} -> {r['load_after']} | {ident_text} |"
        )
    (out / "run_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

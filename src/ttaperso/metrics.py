"""Evaluation metrics for personalization studies (torchmetrics-based).

One definition of each figure, used by the study runner, the reports and the tests:

- **accuracy**: share of labelled frames whose predicted class is the target.
- **UAR** (unweighted average recall, the usual FER figure): the mean per-class recall over
  the classes **present in the targets**, i.e. scikit-learn's ``balanced_accuracy_score``.
  FACTS.md section 5: torchmetrics' ``MulticlassRecall(average="macro")`` instead averages
  over the classes present in the targets *or* the predictions, so a class that a subject
  never shows but the model predicts counts as a recall of 0. A single subject's stream
  rarely covers every class (a Yale subject has 3-4 of the 7), so that convention would
  punish the same mistake twice (once in the true class's recall, once as an extra zero)
  and make per-subject UARs incomparable across subjects; the targets-only convention
  is also the one the repository's earlier JAFFE results use. We compute per-class
  recall with torchmetrics (``average="none"``) and average it over the present classes.
- **macro-F1**: torchmetrics' ``MulticlassF1Score(average="macro")``: the mean F1 over the
  classes present in the targets or the predictions (a predicted-but-absent class has F1 0;
  for F1 that is the intended penalty on false positives).
- **video accuracy**: per (subject, sequence) the video prediction is the argmax of the sum
  of its frames' logits (TTA-CaP's convention) and its label the most frequent frame label;
  the share of videos predicted right.
- **change against the frozen model**: per subject ``adapted - frozen`` accuracy; summarised
  as the mean gain, the worst case, and the share of subjects harmed by more than 2 points.

Frames labelled ``-1`` (unlabelled) are ignored by every figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .errors import InputError

# torchmetrics is imported inside the functions: importing it pulls in torchvision and
# torch._dynamo (seconds), which every `ttaperso` command would pay otherwise.

__all__ = [
    "HARM_THRESHOLD",
    "ClassificationScores",
    "ChangeSummary",
    "accuracy",
    "uar",
    "macro_f1",
    "confusion_matrix",
    "scores",
    "video_predictions",
    "change_against_frozen",
]

#: a subject counts as harmed when adaptation lowers its accuracy by more than this (2 points)
HARM_THRESHOLD = 0.02


def _labelled(preds: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Validated 1-D int64 ``(preds, targets)`` restricted to labelled frames."""
    for name, value in (("preds", preds), ("targets", targets)):
        if not isinstance(value, Tensor) or value.dim() != 1 or value.dtype.is_floating_point:
            got = (
                f"{value.dtype} {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise InputError(f"Expected argument `{name}` to be a 1-D integer tensor but got {got}")
    if preds.shape != targets.shape:
        raise InputError(
            f"Expected `preds` and `targets` of the same length but got {preds.shape[0]} and "
            f"{targets.shape[0]}"
        )
    if num_classes < 2:
        raise InputError(f"Expected argument `num_classes` >= 2 but got {num_classes}")
    keep = targets >= 0
    preds, targets = preds[keep].long(), targets[keep].long()
    for name, value in (("preds", preds), ("targets", targets)):
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= num_classes):
            raise InputError(
                f"Expected `{name}` in [0, {num_classes}) (or -1 for unlabelled targets) but "
                f"got values {sorted(set(value.tolist()))[:10]}"
            )
    return preds, targets


def accuracy(preds: Tensor, targets: Tensor, num_classes: int) -> float:
    """Share of labelled frames predicted right (NaN when no frame is labelled)."""
    preds, targets = _labelled(preds, targets, num_classes)
    if targets.numel() == 0:
        return float("nan")
    return float((preds == targets).float().mean())


def uar(preds: Tensor, targets: Tensor, num_classes: int) -> float:
    """Unweighted average recall over the classes present in ``targets`` (see module doc)."""
    preds, targets = _labelled(preds, targets, num_classes)
    if targets.numel() == 0:
        return float("nan")
    from torchmetrics.functional.classification import multiclass_recall

    recall = multiclass_recall(preds, targets, num_classes, average="none", zero_division=0)
    present = torch.bincount(targets, minlength=num_classes) > 0
    return float(recall[present].mean())


def macro_f1(preds: Tensor, targets: Tensor, num_classes: int) -> float:
    """torchmetrics' macro F1 (classes present in targets or predictions)."""
    preds, targets = _labelled(preds, targets, num_classes)
    if targets.numel() == 0:
        return float("nan")
    from torchmetrics.functional.classification import multiclass_f1_score

    return float(multiclass_f1_score(preds, targets, num_classes, average="macro"))


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` int64 counts, rows = targets, columns = predictions."""
    preds, targets = _labelled(preds, targets, num_classes)
    if targets.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.long)
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(preds, targets, num_classes).long()


@dataclass(frozen=True)
class ClassificationScores:
    """Accuracy, UAR and macro-F1 of one set of frames, with its number of labelled frames."""

    n: int
    accuracy: float
    uar: float
    macro_f1: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (for JSON)."""
        return asdict(self)


def scores(preds: Tensor, targets: Tensor, num_classes: int) -> ClassificationScores:
    """All frame-level figures of one set of frames."""
    n = int((targets >= 0).sum()) if isinstance(targets, Tensor) else 0
    return ClassificationScores(
        n=n,
        accuracy=accuracy(preds, targets, num_classes),
        uar=uar(preds, targets, num_classes),
        macro_f1=macro_f1(preds, targets, num_classes),
    )


def video_predictions(
    logits: Tensor, targets: Tensor, sequences: Sequence[str]
) -> tuple[Tensor, Tensor, list[str]]:
    """Per sequence: (argmax of summed frame logits, majority label, sequence ids).

    Frames with an empty sequence id belong to no video and are skipped; a video whose
    frames are all unlabelled gets target -1 (ignored by the metrics). Ties in the label
    vote go to the smallest class index.
    """
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0] or len(sequences) != len(targets):
        raise InputError(
            f"Expected logits (T, C), targets (T,) and T sequence ids but got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)} and {len(sequences)}"
        )
    ids = [s for s in dict.fromkeys(sequences) if s]
    preds, labels = [], []
    for seq in ids:
        index = torch.tensor([i for i, s in enumerate(sequences) if s == seq])
        preds.append(int(logits[index].sum(dim=0).argmax()))
        frame_labels = targets[index]
        frame_labels = frame_labels[frame_labels >= 0]
        labels.append(
            int(torch.bincount(frame_labels, minlength=logits.shape[1]).argmax())
            if frame_labels.numel()
            else -1
        )
    return torch.tensor(preds, dtype=torch.long), torch.tensor(labels, dtype=torch.long), ids


@dataclass(frozen=True)
class ChangeSummary:
    """Per-subject change of a figure (adapted - frozen), summarised."""

    mean_gain: float
    worst: float
    worst_subject: str
    best: float
    share_harmed: float
    harmed: tuple[str, ...]
    per_subject: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        """Plain dict (for JSON)."""
        out = asdict(self)
        out["harmed"] = list(self.harmed)
        return out


def change_against_frozen(
    adapted: Mapping[str, float],
    frozen: Mapping[str, float],
    threshold: float = HARM_THRESHOLD,
) -> ChangeSummary:
    """Summarise per-subject ``adapted - frozen`` (fractions, e.g. accuracies in [0, 1]).

    A subject is harmed when its change is below ``-threshold`` (default 2 points).
    Subjects with a NaN figure (no labelled frame) are left out.
    """
    if set(adapted) != set(frozen):
        raise InputError(
            f"Expected the same subjects for adapted and frozen figures but got "
            f"{sorted(set(adapted) ^ set(frozen))[:10]} in only one of them"
        )
    deltas = {
        s: adapted[s] - frozen[s]
        for s in adapted
        if adapted[s] == adapted[s] and frozen[s] == frozen[s]  # drop NaN
    }
    if not deltas:
        raise InputError("No subject has a figure to compare against the frozen model")
    worst_subject = min(deltas, key=lambda s: deltas[s])
    harmed = tuple(s for s, d in deltas.items() if d < -threshold)
    return ChangeSummary(
        mean_gain=sum(deltas.values()) / len(deltas),
        worst=deltas[worst_subject],
        worst_subject=worst_subject,
        best=max(deltas.values()),
        share_harmed=len(harmed) / len(deltas),
        harmed=harmed,
        per_subject=deltas,
    )

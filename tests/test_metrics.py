"""ttaperso.metrics: the one definition of accuracy, UAR, macro-F1, video accuracy, change."""

from __future__ import annotations

import math

import pytest
import torch

from ttaperso import metrics
from ttaperso.errors import InputError


def test_uar_averages_recall_over_classes_present_in_targets() -> None:
    # targets cover classes 0 and 1 only; class 2 is predicted but absent from targets.
    targets = torch.tensor([0, 0, 0, 0, 1, 1])
    preds = torch.tensor([0, 0, 2, 2, 1, 0])
    # recall(0) = 2/4, recall(1) = 1/2 -> UAR 0.5 (sklearn balanced accuracy)
    assert metrics.uar(preds, targets, 3) == pytest.approx(0.5)
    # torchmetrics' macro recall would also count class 2 (recall 0): 1/3. We do not.
    from torchmetrics.functional.classification import multiclass_recall

    assert float(multiclass_recall(preds, targets, 3, average="macro")) == pytest.approx(1 / 3)


def test_accuracy_f1_and_unlabelled_frames() -> None:
    targets = torch.tensor([0, 1, 1, -1, 2])
    preds = torch.tensor([0, 1, 0, 2, 2])
    assert metrics.accuracy(preds, targets, 3) == pytest.approx(3 / 4)
    # F1 per class: c0 p=1/2 r=1 -> 2/3; c1 p=1 r=1/2 -> 2/3; c2 p=1 r=1 -> 1
    assert metrics.macro_f1(preds, targets, 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    s = metrics.scores(preds, targets, 3)
    assert s.n == 4 and s.accuracy == pytest.approx(0.75)
    cm = metrics.confusion_matrix(preds, targets, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert math.isnan(metrics.accuracy(preds[:1], torch.tensor([-1]), 3))


@pytest.mark.parametrize(
    ("preds", "targets", "match"),
    [
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "1-D integer"),
        (torch.tensor([0, 1]), torch.tensor([0]), "same length"),
        (torch.tensor([0, 5]), torch.tensor([0, 1]), r"in \[0, 3\)"),
    ],
)
def test_bad_input_is_refused(preds, targets, match) -> None:
    with pytest.raises(InputError, match=match):
        metrics.accuracy(preds, targets, 3)


def test_video_prediction_sums_logits_and_votes_labels() -> None:
    logits = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 1, -1])
    preds, labels, ids = metrics.video_predictions(logits, targets, ["a", "a", "a", "b", ""])
    assert ids == ["a", "b"]
    assert preds.tolist() == [0, 1]  # a: sum (5, 2) -> 0 although 2 of 3 frames say 1
    assert labels.tolist() == [0, 1]  # majority label of a is 0


def test_change_against_frozen() -> None:
    frozen = {"a": 0.5, "b": 0.8, "c": 0.4, "d": float("nan")}
    adapted = {"a": 0.6, "b": 0.7, "c": 0.39, "d": 0.5}
    change = metrics.change_against_frozen(adapted, frozen)
    assert change.worst_subject == "b" and change.worst == pytest.approx(-0.1)
    assert change.harmed == ("b",)  # c lost 1 point: not harmed (threshold 2 points)
    assert change.share_harmed == pytest.approx(1 / 3)
    assert change.mean_gain == pytest.approx((0.1 - 0.1 - 0.01) / 3)
    with pytest.raises(InputError, match="same subjects"):
        metrics.change_against_frozen({"a": 0.1}, {"b": 0.1})

"""The Lightning callback with a real Trainer (CPU, tiny model, a few batches)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import HEAD, INPUT_SHAPE, LABELS, adapt_overrides, build_model, target_frames
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import ttaperso

pl = pytest.importorskip("pytorch_lightning")

from ttaperso.errors import ConfigError  # noqa: E402
from ttaperso.lightning import PersonalizeCallback  # noqa: E402

SUBJECTS = ("alice", "bob", "carol")
FRAMES_PER_SUBJECT = 12


class FrameSet(Dataset):
    """Interleaved frames of three subjects: (x, subject, y) dict items."""

    def __init__(self) -> None:
        self.frames = {s: target_frames(FRAMES_PER_SUBJECT, seed=i) for i, s in enumerate(SUBJECTS)}
        # interleave so one batch mixes subjects
        self.items = [(s, i) for i in range(FRAMES_PER_SUBJECT) for s in SUBJECTS]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        subject, i = self.items[index]
        return {"x": self.frames[subject][i], "subject": subject, "y": i % len(LABELS)}


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_model(seed=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["x"])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return {"logits": self(batch["x"])}


def _trainer(callback: PersonalizeCallback, **kwargs: object) -> pl.Trainer:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
        **kwargs,
    )


def _callback(strategy: str) -> PersonalizeCallback:
    return PersonalizeCallback(
        strategy,
        network="net",
        labels=LABELS,
        input_shape=INPUT_SHAPE,
        head=HEAD,
        **adapt_overrides(strategy),
    )


def _reference(strategy: str, dataset: FrameSet, batch_size: int) -> dict[str, Tensor]:
    """Personalizer.predict on the same per-subject streams, chunked as the loader does."""
    p = ttaperso.Personalizer(
        build_model(seed=0),
        strategy,
        labels=LABELS,
        input_shape=INPUT_SHAPE,
        head=HEAD,
        **adapt_overrides(strategy),
    )
    out: dict[str, list[Tensor]] = {s: [] for s in SUBJECTS}
    for start in range(0, len(dataset), batch_size):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        for s in SUBJECTS:
            frames = [b["x"] for b in batch if b["subject"] == s]
            if frames:
                out[s].append(p.predict(torch.stack(frames), subject=s).logits)
    return {s: torch.cat(v) for s, v in out.items()}


@pytest.mark.parametrize("strategy", ["norm", "tent"])
def test_predict_matches_personalizer_per_subject(strategy: str) -> None:
    dataset = FrameSet()
    callback = _callback(strategy)
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(callback, inference_mode=False)
    outputs = trainer.predict(module, DataLoader(dataset, batch_size=6))
    assert callback.personalizer is not None
    assert set(callback.personalizer.subjects) == set(SUBJECTS)  # one state per subject
    reference = _reference(strategy, dataset, batch_size=6)
    got = {s: torch.cat([p.logits for p in callback.predictions[s]]) for s in SUBJECTS}
    # The callback serves a batch's subjects with predict_many: bit-identical for tent (one
    # forward per subject), equal up to float rounding for norm (one batched forward with
    # per-subject statistics).
    tol = {"rtol": 0.0, "atol": 0.0} if strategy == "tent" else {"rtol": 1e-5, "atol": 1e-6}
    for s in SUBJECTS:
        torch.testing.assert_close(got[s], reference[s], **tol)
        assert torch.equal(got[s].argmax(1), reference[s].argmax(1))
    # the returned predictions are the personalized ones, in batch order
    flat = torch.cat(outputs)
    order = {s: 0 for s in SUBJECTS}
    for row, (subject, _) in zip(flat, dataset.items, strict=True):
        torch.testing.assert_close(row, reference[subject][order[subject]], **tol)
        order[subject] += 1
    # ...and differ from the frozen model's (the state adapted)
    frozen = module(torch.stack([dataset[i]["x"] for i in range(len(dataset))]))
    assert not torch.allclose(flat, frozen)
    # the LightningModule's own weights are untouched
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_test_stage_replaces_dict_logits() -> None:
    callback = _callback("norm")
    trainer = _trainer(callback)  # norm is gradient-free: inference mode is fine
    trainer.test(TinyModule(), DataLoader(FrameSet(), batch_size=9))
    assert set(callback.personalizer.subjects) == set(SUBJECTS)
    assert callback.subject_predictions("bob").shape == (FRAMES_PER_SUBJECT,)


def test_gradient_strategy_under_inference_mode_is_refused() -> None:
    callback = _callback("tent")
    trainer = _trainer(callback)  # default: inference_mode=True
    with pytest.raises(ConfigError, match="inference_mode=False"):
        trainer.predict(TinyModule(), DataLoader(FrameSet(), batch_size=6))


def test_missing_subject_key_is_a_clear_error() -> None:
    callback = PersonalizeCallback(
        "norm", subject_key="person", network="net", labels=LABELS, input_shape=INPUT_SHAPE
    )
    trainer = _trainer(callback)
    with pytest.raises(ttaperso.InputError, match="'person'"):
        trainer.predict(TinyModule(), DataLoader(FrameSet(), batch_size=6))


def test_bad_network_attribute() -> None:
    callback = PersonalizeCallback(
        "norm", network="missing", labels=LABELS, input_shape=INPUT_SHAPE
    )
    with pytest.raises(ConfigError, match="'missing'"):
        _trainer(callback).predict(TinyModule(), DataLoader(FrameSet(), batch_size=6))


def test_whole_module_as_network() -> None:
    """No ``network=``: the LightningModule itself is personalized (``norm``, adapting)."""
    dataset = FrameSet()
    callback = PersonalizeCallback(
        "norm", labels=LABELS, input_shape=INPUT_SHAPE, **adapt_overrides("norm")
    )
    _trainer(callback).predict(TinyModule(), DataLoader(dataset, batch_size=6))
    reference = _reference("norm", dataset, batch_size=6)
    got = {s: torch.cat([p.logits for p in callback.predictions[s]]) for s in SUBJECTS}
    for s in SUBJECTS:
        torch.testing.assert_close(got[s], reference[s], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        frozen = TinyModule()(dataset.frames["alice"])
    assert not torch.allclose(got["alice"], frozen, atol=1e-3)  # adapted, not the frozen model

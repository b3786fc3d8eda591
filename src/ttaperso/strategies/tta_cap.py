"""``tta_cap``: gradient-free cache personalization with a tri-gate (TTA-CaP).

TTA-CaP (arXiv 2603.21309) as FACTS.md section 3 describes it, per subject stream:

* **personalised source cache**: class prototypes of the source sample. When the sample has
  subject ids, the ``source_subjects`` source subjects whose feature statistics are closest
  to the target subject's first ``calibration_frames`` frames (squared Frechet distance of
  diagonal Gaussians over the normalised features) give the subject's prototypes; until
  then, and without subject ids, the prototypes of the whole sample are used. Prototypes
  are normalised means of normalised features per class (labels from the sample, or the
  frozen model's predictions when the sample has none; a class absent from the sample falls
  back to its normalised linear-head row). Computed once per subject, kept in its state.
* **positive cache** (normalised entropy ``< positive_entropy``, indexed by the predicted
  class, ``positive_capacity`` entries per class) and **negative cache** (``positive_entropy
  <= H < negative_entropy``, indexed by the least likely class, ``negative_capacity`` per
  class), each keeping the lowest-entropy entries. Entropy is divided by ln C.
* **tri-gate** deciding which frames may enter the caches: the runtime's
  :class:`~ttaperso.gates.TemporalGate` (majority of the last 3 predictions),
  :class:`~ttaperso.gates.EntropyGate` (H < 0.8 ln C: the caches' entropy bands) and
  :class:`~ttaperso.gates.PrototypeGate` (nearest personalised prototype = prediction, cosine
  margin > 0.05). They are the config's ``gates``: drop any of them to turn it off. The
  strategy counts, per gate, the frames it admitted and rejected
  (:func:`gate_admission_counts`).
* **fusion**: ``g = normalise(f + a_s src + a_p pos - a_n neg)`` where ``f`` is the frame's
  normalised feature and ``src``/``pos``/``neg`` are the affinity-weighted means of each
  cache's entries (weights ``exp(-sharpness (1 - cos))``); logits against the class
  embeddings, i.e. the rows of the model's linear head (for a CLIP adapter, its text
  embeddings times the logit scale).
* **retrieval before update**: a call's frames are predicted with the caches as they were
  before the call, then the admitted ones are inserted, so a frame never retrieves itself.
* **video-level prediction**: :func:`video_prediction` sums a segment's frame logits.

Design decisions (ours, documented in docs/tta_cap.md):

* Logits keep the head's scale and bias: the fused direction ``g`` is rescaled to the
  feature's own norm and the head is applied as ``logits = frozen + (|f| g - f) @ W.T`` (the
  head is linear), so with every cache empty (or turned off) ``tta_cap`` returns exactly the
  frozen model's logits; for a CLIP head (unit features, no bias) this is TTA-CaP's cosine
  logits. The frozen forward (with features) is the only model pass.
* Gates and cache entropies use the returned (fused) prediction, consistently.
* ``uses_source = "optional"``: without a sample, the source prototypes are the normalised
  linear-head rows (no personalisation of the source cache).
* Per (subject, video) episodes: call with subject keys such as ``f"{subject}/{video}"``
  (each key its own state) and ``p.reset(key)`` when the video ends, or ``episodic=True``
  to reset after every call.

Fixed or made explicit with respect to the released code (which does not run, FACTS.md):
entropy normalised by ln C (TDA's code divides natural-log entropy by log2 C); empty cache
slots are a boolean mask, never NaN/Inf sentinels, so states stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import StrategyConfig
from ..errors import InputError, ModelInterfaceError, StateFileError
from ..functional import normalized_entropy
from ..gates import PROTOTYPE_SCORES, EntropyGate, Gate, PrototypeGate, TemporalGate
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .base import Strategy
from .cache_math import (
    cache_insert,
    class_prototypes,
    diagonal_moments,
    frechet_diagonal,
    fuse,
    retrieve,
    unit,
    video_prediction,
)
from .registry import register_strategy

__all__ = ["TtaCapConfig", "TtaCapStrategy", "video_prediction"]

_SOURCE_CHUNK = 256


@dataclass(frozen=True)
class TtaCapConfig(StrategyConfig):
    """Options of TTA-CaP.

    Args:
        gates: the tri-gate (temporal window 3, entropy < 0.8 ln C, prototype margin 0.05).
        positive_capacity: positive-cache entries per class (paper: 5).
        negative_capacity: negative-cache entries per class (paper: 4).
        positive_entropy: frames with normalised entropy below it go to the positive cache.
        negative_entropy: frames in ``[positive_entropy, negative_entropy)`` go to the
            negative cache, under their least likely class.
        source_weight, positive_weight, negative_weight: weights of the retrieved source,
            positive and negative entries in the fusion (0 turns a cache off; a turned-off
            target cache is not filled either).
        sharpness: beta of the affinity ``exp(-beta (1 - cos))`` used by retrieval.
        calibration_frames: the subject's first frames whose feature statistics pick its
            closest source subjects (needs a source sample with subject ids).
        source_subjects: how many closest source subjects build the personalised prototypes.
    """

    strategy_name = "tta_cap"
    gates: tuple[Gate, ...] = field(
        default=(
            TemporalGate(window=3, min_agreement=0.6),
            EntropyGate(max_entropy=0.8),
            PrototypeGate(margin=0.05),
        )
    )
    positive_capacity: int = 5
    negative_capacity: int = 4
    positive_entropy: float = 0.5
    negative_entropy: float = 0.8
    source_weight: float = 1.0
    positive_weight: float = 1.0
    negative_weight: float = 1.0
    sharpness: float = 5.0
    calibration_frames: int = 8
    source_subjects: int = 3

    def validate(self) -> None:
        super().validate()
        self._check("positive_capacity", self.positive_capacity >= 0, "an int >= 0")
        self._check("negative_capacity", self.negative_capacity >= 0, "an int >= 0")
        self._check(
            "positive_entropy", 0.0 <= self.positive_entropy <= 1.0, "a fraction of ln C in [0, 1]"
        )
        self._check(
            "negative_entropy",
            self.positive_entropy <= self.negative_entropy <= 1.0,
            "a fraction of ln C in [positive_entropy, 1]",
        )
        for name in ("source_weight", "positive_weight", "negative_weight", "sharpness"):
            self._check(name, getattr(self, name) >= 0.0, "a number >= 0")
        self._check("calibration_frames", self.calibration_frames >= 1, "an int >= 1")
        self._check("source_subjects", self.source_subjects >= 1, "an int >= 1")


@register_strategy
class TtaCapStrategy(Strategy):
    """Per subject: personalised source prototypes, positive/negative caches, gate counts."""

    config_class = TtaCapConfig
    config: TtaCapConfig
    shares_model_forward = True  # caches live in memory; the model part is the frozen forward
    uses_features = True
    uses_source = "optional"
    provides = frozenset({PROTOTYPE_SCORES})  # for the PrototypeGate of its tri-gate

    def __init__(
        self, config: TtaCapConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
        try:
            weight, _bias = runtime.module.linear_head()
        except ModelInterfaceError as exc:
            raise ModelInterfaceError(
                f"Strategy 'tta_cap' fuses features against the class embeddings of a linear "
                f"head: {exc}"
            ) from exc
        #: class embeddings (C, D): the linear head's rows (the head's own scale)
        self.head_weight = weight.detach().to(device=runtime.device, dtype=runtime.dtype).clone()
        self.dim = int(self.head_weight.shape[1])
        #: prototypes for when the source sample says nothing about a class
        self.fallback_prototypes = unit(self.head_weight)
        self._prepare_source(runtime, source)
        super().__init__(config, runtime, source)

    # ---------------------------------------------------------------- source
    @torch.no_grad()
    def _source_features(self, runtime: ModelRuntime, source: SourceData) -> tuple[Tensor, Tensor]:
        """Normalised features and labels (given, or the frozen model's) of the sample."""
        feats, preds = [], []
        for chunk in source.frames.split(_SOURCE_CHUNK):
            out = runtime.forward({}, chunk, return_features=True)
            if out.features is None or out.features.shape[1:] != (self.dim,):
                got = None if out.features is None else tuple(out.features.shape)
                raise ModelInterfaceError(
                    f"Strategy 'tta_cap' expected features of shape (N, {self.dim}) matching "
                    f"the linear head but got {got}"
                )
            if not bool(torch.isfinite(out.features).all()):
                raise InputError("The source sample produced non-finite features")
            feats.append(unit(out.features.to(runtime.dtype)))
            preds.append(out.logits.argmax(dim=1))
        labels = source.labels if source.labels is not None else torch.cat(preds)
        return torch.cat(feats), labels.to(runtime.device)

    def _prepare_source(self, runtime: ModelRuntime, source: SourceData | None) -> None:
        """Whole-sample prototypes and, with subject ids, per-source-subject statistics."""
        num_classes = runtime.num_classes
        self.source_ids: tuple[str, ...] = ()
        if source is None:
            self.sample_prototypes = self.fallback_prototypes.clone()
            return
        features, labels = self._source_features(runtime, source)
        protos, counts = class_prototypes(features, labels, num_classes)
        self.sample_prototypes = torch.where(
            (counts > 0).unsqueeze(1), protos, self.fallback_prototypes
        )
        if source.subjects is None:
            return
        self.source_ids = tuple(sorted(set(source.subjects)))
        index = {s: i for i, s in enumerate(self.source_ids)}
        owner = torch.tensor([index[s] for s in source.subjects], device=features.device)
        n_src = len(self.source_ids)
        dtype, device = features.dtype, features.device
        self.source_mean = torch.zeros(n_src, self.dim, dtype=dtype, device=device)
        self.source_var = torch.zeros(n_src, self.dim, dtype=dtype, device=device)
        self.source_class_sums = torch.zeros(
            n_src, num_classes, self.dim, dtype=dtype, device=device
        )
        self.source_class_counts = torch.zeros(
            n_src, num_classes, dtype=torch.int64, device=features.device
        )
        for i in range(n_src):
            mine = features[owner == i]
            self.source_mean[i] = mine.mean(dim=0)
            self.source_var[i] = mine.var(dim=0, unbiased=False)
            own_labels = labels[owner == i]
            self.source_class_sums[i].index_add_(0, own_labels, mine)
            self.source_class_counts[i] = torch.bincount(own_labels, minlength=num_classes)

    @property
    def personalises_source(self) -> bool:
        """Whether the source sample has subject ids (per-subject source prototypes)."""
        return bool(self.source_ids)

    def _personal_prototypes(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Prototypes from the source subjects closest to ``(mean, var)`` and their indices."""
        distance = frechet_diagonal(
            mean.unsqueeze(0), var.unsqueeze(0), self.source_mean, self.source_var
        )
        k = min(self.config.source_subjects, len(self.source_ids))
        chosen = torch.sort(distance, stable=True).indices[:k]
        sums = self.source_class_sums[chosen].sum(dim=0)
        counts = self.source_class_counts[chosen].sum(dim=0)
        protos = torch.where((counts > 0).unsqueeze(1), unit(sums), self.sample_prototypes)
        return protos, chosen

    # ----------------------------------------------------------------- state
    def init_state(self) -> SubjectState:
        c, d = self.num_classes, self.dim
        dtype = self.head_weight.dtype
        n_gates = len(self.config.gates)
        memory: dict[str, Tensor] = {
            "cap.src_protos": self.sample_prototypes.clone(),
            "cap.source_choice": torch.full(
                (min(self.config.source_subjects, max(1, len(self.source_ids))),),
                -1,
                dtype=torch.int64,
            ),
            "cap.calib_sum": torch.zeros(d, dtype=dtype),
            "cap.calib_sq": torch.zeros(d, dtype=dtype),
            "cap.calib_count": torch.tensor(0, dtype=torch.int64),
            "cap.gate_admitted": torch.zeros(n_gates, dtype=torch.int64),
            "cap.gate_rejected": torch.zeros(n_gates, dtype=torch.int64),
            "cap.frames": torch.tensor(0, dtype=torch.int64),
            "cap.admitted": torch.tensor(0, dtype=torch.int64),
        }
        for name, capacity in (
            ("pos", self.config.positive_capacity),
            ("neg", self.config.negative_capacity),
        ):
            memory[f"cap.{name}_keys"] = torch.zeros(c, capacity, d, dtype=dtype)
            memory[f"cap.{name}_entropy"] = torch.zeros(c, capacity, dtype=dtype)
            memory[f"cap.{name}_valid"] = torch.zeros(c, capacity, dtype=torch.bool)
        return SubjectState(memory=memory)

    def check_state(self, state: SubjectState, source: str) -> None:
        super().check_state(state, source)
        memory = state.memory
        choice = memory["cap.source_choice"]
        if bool(((choice < -1) | (choice >= max(1, len(self.source_ids)))).any()):
            raise StateFileError(
                f"{source}: memory/cap.source_choice names source subjects {choice.tolist()} "
                f"outside the {len(self.source_ids)} of this Personalizer's source sample"
            )
        for key in ("cap.calib_count", "cap.gate_admitted", "cap.gate_rejected", "cap.frames"):
            if bool((memory[key] < 0).any()):
                raise StateFileError(f"{source}: memory/{key} holds negative counts")

    # ------------------------------------------------------------- predict
    def head(self, state: SubjectState, frames: Tensor, out: ForwardOutput) -> ForwardOutput:
        """Retrieval from the subject's caches and fusion with the frame's features."""
        features = out.features
        if features is None or features.shape != (frames.shape[0], self.dim):
            got = None if features is None else tuple(features.shape)
            raise ModelInterfaceError(
                f"Strategy 'tta_cap' expected features of shape (N, {self.dim}) but got {got}"
            )
        if not bool(torch.isfinite(features).all()):
            # Checked here because, with empty caches, the logits alone may look fine.
            raise InputError(
                "The model produced non-finite features for these frames (extreme input "
                "values?); the subject's state was not changed"
            )
        memory, cfg = state.memory, self.config
        query = unit(features)
        protos = memory["cap.src_protos"]
        scores = query @ protos.T
        zero = torch.zeros_like(query)
        src = pos = neg = zero
        active = False
        if cfg.source_weight > 0:
            src = retrieve(
                query, protos, torch.ones(protos.shape[0], dtype=torch.bool), cfg.sharpness
            )
            active = True
        for name, weight in (("pos", cfg.positive_weight), ("neg", cfg.negative_weight)):
            valid = memory[f"cap.{name}_valid"].reshape(-1)
            if weight > 0 and bool(valid.any()):
                keys = memory[f"cap.{name}_keys"].reshape(-1, self.dim)
                retrieved = retrieve(query, keys, valid, cfg.sharpness)
                if name == "pos":
                    pos = retrieved
                else:
                    neg = retrieved
                active = True
        logits = out.logits
        if active:
            fused = fuse(
                query, src, pos, neg, (cfg.source_weight, cfg.positive_weight, cfg.negative_weight)
            )
            moved = fused * features.norm(dim=1, keepdim=True) - features
            logits = logits + moved @ self.head_weight.T
        return ForwardOutput(
            logits=logits, features=features, extras={**out.extras, PROTOTYPE_SCORES: scores}
        )

    def on_gate_decisions(
        self, state: SubjectState, decisions: list[Tensor], admitted: Tensor
    ) -> None:
        """Count each gate's admissions per subject (the tri-gate's diagnostics)."""
        memory = state.memory
        n = int(admitted.numel())
        for i, mask in enumerate(decisions):
            passed = int(mask.sum())
            memory["cap.gate_admitted"][i] += passed
            memory["cap.gate_rejected"][i] += n - passed
        memory["cap.frames"] += n
        memory["cap.admitted"] += int(admitted.sum())

    def gate_counts(self, state: SubjectState) -> dict[str, dict[str, int]]:
        """Per-gate admitted/rejected frame counts of one subject.

        Keys are the gate kinds (``"temporal"``, ``"entropy"``, ``"prototype"``; ``kind#i``
        when a kind repeats) plus ``"all"`` (frames that passed every gate, out of all seen).
        """
        kinds = [g.kind for g in self.config.gates]
        admitted = state.memory["cap.gate_admitted"].tolist()
        rejected = state.memory["cap.gate_rejected"].tolist()
        out: dict[str, dict[str, int]] = {}
        for i, kind in enumerate(kinds):
            key = kind if kinds.count(kind) == 1 else f"{kind}#{i}"
            out[key] = {"admitted": int(admitted[i]), "rejected": int(rejected[i])}
        frames, passed = int(state.memory["cap.frames"]), int(state.memory["cap.admitted"])
        out["all"] = {"admitted": passed, "rejected": frames - passed}
        return out

    def describe(self, state: SubjectState) -> dict[str, Any]:
        """Adds ``gates`` (:meth:`gate_counts`) and ``source_subjects`` (those chosen)."""
        return {
            **super().describe(state),
            "gates": self.gate_counts(state),
            "source_subjects": self.chosen_source_subjects(state),
        }

    # --------------------------------------------------------------- update
    @torch.no_grad()
    def adapt(
        self, state: SubjectState, frames: Tensor, out: ForwardOutput, admitted: Tensor
    ) -> Tensor:
        if out.features is None:  # pragma: no cover - forward always returns features
            raise ModelInterfaceError("tta_cap: features missing")
        query = unit(out.features.detach())
        self._calibrate(state, query)
        cfg, memory = self.config, state.memory
        probs = out.logits.detach().softmax(dim=1)
        entropy = normalized_entropy(out.logits.detach().float()).to(query.dtype)
        admitted = admitted.to(query.device)
        positive = admitted & (entropy < cfg.positive_entropy)
        negative = admitted & (entropy >= cfg.positive_entropy) & (entropy < cfg.negative_entropy)
        stored = torch.zeros_like(admitted)
        for name, mask, weight, capacity, bucket in (
            ("pos", positive, cfg.positive_weight, cfg.positive_capacity, probs.argmax(dim=1)),
            ("neg", negative, cfg.negative_weight, cfg.negative_capacity, probs.argmin(dim=1)),
        ):
            if weight <= 0 or capacity == 0 or not bool(mask.any()):
                continue
            index = mask.nonzero().squeeze(1)
            keys, ent, valid = cache_insert(
                memory[f"cap.{name}_keys"],
                memory[f"cap.{name}_entropy"],
                memory[f"cap.{name}_valid"],
                query.index_select(0, index),
                entropy.index_select(0, index),
                bucket.index_select(0, index),
            )
            memory[f"cap.{name}_keys"] = keys
            memory[f"cap.{name}_entropy"] = ent
            memory[f"cap.{name}_valid"] = valid
            stored |= mask
        return stored.cpu()

    def _calibrate(self, state: SubjectState, query: Tensor) -> None:
        """Accumulate the first frames' feature statistics; then pick the source subjects."""
        if not self.personalises_source:
            return
        memory = state.memory
        count = int(memory["cap.calib_count"])
        need = self.config.calibration_frames - count
        if need <= 0:
            return
        take = query[:need]
        memory["cap.calib_sum"] += take.sum(dim=0)
        memory["cap.calib_sq"] += (take**2).sum(dim=0)
        count += take.shape[0]
        memory["cap.calib_count"].fill_(count)
        if count < self.config.calibration_frames:
            return
        mean, var = diagonal_moments(memory["cap.calib_sum"], memory["cap.calib_sq"], count)
        protos, chosen = self._personal_prototypes(mean, var)
        memory["cap.src_protos"] = protos.to(memory["cap.src_protos"].dtype).clone()
        memory["cap.source_choice"] = chosen.to(torch.int64).clone()

    def chosen_source_subjects(self, state: SubjectState) -> list[str]:
        """Ids of the source subjects picked for this subject (empty until calibrated)."""
        return [self.source_ids[i] for i in state.memory["cap.source_choice"].tolist() if i >= 0]

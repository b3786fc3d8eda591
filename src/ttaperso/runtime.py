"""The shared, frozen model and how a subject's tensors are swapped into it."""

from __future__ import annotations

import copy
import hashlib
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .model import FERModel
from .norm_layers import NormControl, convert_batchnorms

__all__ = ["ModelRuntime", "ForwardOutput", "model_digest"]


def model_digest(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state_dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class ForwardOutput:
    """What one forward of a subject produced.

    ``leaves`` are the trainable tensors (views of the subject's parameters with
    ``requires_grad``) the logits depend on; ``moments`` the per-sample BN moments when
    they were collected; ``extras`` per-frame values a strategy's :meth:`head` computes
    for its gates or update in the same call (``(N, ...)`` tensors, e.g. ``tta_cap``'s
    prototype similarities under :data:`~ttaperso.gates.PROTOTYPE_SCORES`). Everything a
    call computes travels in its own output, never on the shared strategy object.
    """

    logits: Tensor
    features: Tensor | None = None
    leaves: dict[str, Tensor] = field(default_factory=dict)
    moments: dict[str, tuple[Tensor, Tensor]] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class ModelRuntime:
    """One private, frozen copy of a :class:`FERModel` shared by all subjects.

    The caller's model is copied once (never per subject) so that nothing the runtime
    does (BN layer replacement, requires_grad, mode flags) can touch it, and so that a
    caller who keeps training their model does not silently change every subject's base.
    """

    def __init__(self, model: FERModel) -> None:
        self.source_digest = model_digest(model)
        module = copy.deepcopy(model)
        module.eval()
        module.requires_grad_(False)
        self.control = NormControl()
        self.bn_layers = convert_batchnorms(module, self.control)
        self.module: FERModel = module
        self.lock = threading.RLock()
        params: dict[str, Tensor] = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        self.parameters: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        # Where each named tensor lives (the owning module's _parameters/_buffers dict and
        # key), found once: swapping a subject's tensors in is then one dict write per
        # tensor instead of torch.func.functional_call's per-call name resolution.
        self._slots: dict[str, tuple[dict[str, Tensor | None], str]] = {}
        for owner_name, owner in module.named_modules(remove_duplicate=False):
            prefix = f"{owner_name}." if owner_name else ""
            for table in (owner._parameters, owner._buffers):
                for key, value in table.items():
                    if value is not None:
                        self._slots.setdefault(prefix + key, (table, key))
        self.device = next(iter(params.values())).device if params else torch.device("cpu")
        self.dtype = next(
            (t.dtype for t in params.values() if t.is_floating_point()), torch.float32
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return self.module.labels

    @property
    def num_classes(self) -> int:
        return self.module.num_classes

    def digest(self) -> str:
        """Digest of the private copy now (equals :attr:`source_digest` unless it was mutated)."""
        return model_digest(self.module)

    @contextmanager
    def _norm_mode(self, prior: float, collect: bool) -> Iterator[NormControl]:
        self.control.prior = prior
        self.control.collect = {} if collect else None
        try:
            yield self.control
        finally:
            self.control.reset()

    def forward(
        self,
        tensors: Mapping[str, Tensor],
        frames: Tensor,
        *,
        trainable: tuple[str, ...] = (),
        bn_prior: float = math.inf,
        collect_moments: bool = False,
        return_features: bool = False,
    ) -> ForwardOutput:
        """Run the shared model with a subject's ``tensors`` swapped in.

        Args:
            tensors: the subject's parameters and buffers by name (others stay shared).
            frames: preprocessed ``(N, C, H, W)`` frames.
            trainable: names (a subset of ``tensors``) to differentiate with respect to;
                gradients are taken on views, so the subject's tensors are only changed
                by the strategy's explicit update.
            bn_prior: weight in frames of the swapped-in BN statistics against the batch
                (``inf``: stored statistics only; ``0``: batch statistics only).
            collect_moments: also return per-sample BN moments for statistic updates.
            return_features: also return ``features(x)`` (needs a features/head split).
        """
        call_tensors = dict(tensors)
        leaves: dict[str, Tensor] = {}
        for name in trainable:
            leaf = call_tensors[name].detach().requires_grad_(True)
            call_tensors[name] = leaf
            leaves[name] = leaf
        with (
            self.lock,
            self._norm_mode(bn_prior, collect_moments) as control,
            torch.set_grad_enabled(bool(trainable)),
        ):
            out = self._call_with(call_tensors, frames, return_features)
            moments = control.collect
        if return_features:
            logits, features = out
        else:
            logits, features = out, None
        return ForwardOutput(logits=logits, features=features, leaves=leaves, moments=moments)

    def forward_segments(
        self,
        tensors: Sequence[Mapping[str, Tensor]],
        frames: Tensor,
        segments: Tensor,
        prior: Tensor,
        frames_per_subject: Tensor,
        *,
        collect_moments: bool = False,
    ) -> ForwardOutput:
        """One no-grad forward for several subjects' frames (BN statistics per subject).

        Args:
            tensors: per subject, its BN running buffers by name (all with the same names);
                they are stacked ``(S, C)`` into the model's slots for this call.
            frames: every subject's frames, concatenated in subject order.
            segments: ``(N,)`` subject index of each frame.
            prior: ``(S, 1)`` weight, in frames, of each subject's stored statistics.
            frames_per_subject: ``(S, 1)`` frames of each subject in ``frames``.
            collect_moments: also return per-sample BN moments (``(N, C)`` per layer).
        """
        names = list(tensors[0]) if tensors else []
        stacked = {name: torch.stack([t[name] for t in tensors]) for name in names}
        with self.lock, torch.no_grad():
            control = self.control
            control.collect = {} if collect_moments else None
            control.segments = segments
            control.segment_prior = prior
            control.segment_frames = frames_per_subject
            try:
                logits = self._call_with(stacked, frames, False)
                moments = control.collect
                assert isinstance(logits, Tensor)
            finally:
                control.reset()
        return ForwardOutput(logits=logits, features=None, leaves={}, moments=moments)

    def _call_with(
        self, tensors: Mapping[str, Tensor], frames: Tensor, return_features: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The module's forward with ``tensors`` in place of its own (restored afterwards).

        Equivalent to ``functional_call(module, tensors, ..., tie_weights=False)`` (the
        fallback for a name outside the cached slots); callers hold :attr:`lock`.
        """
        if any(name not in self._slots for name in tensors):
            return functional_call(
                self.module,
                dict(tensors),
                (frames,),
                {"return_features": return_features},
                tie_weights=False,
                strict=False,
            )
        swapped: list[tuple[dict[str, Tensor | None], str, Tensor | None]] = []
        try:
            for name, tensor in tensors.items():
                table, key = self._slots[name]
                swapped.append((table, key, table[key]))
                table[key] = tensor
            return self.module(frames, return_features=return_features)
        finally:
            for table, key, original in reversed(swapped):
                table[key] = original

"""A subject's adapted state: only the tensors its strategy changes.

Four groups, flattened with a prefix for storage:

* ``params/<name>``  adapted parameters of the shared model (e.g. BN affine),
* ``buffers/<name>`` buffers swapped in with them (e.g. BN running statistics),
* ``optim/<name>/<key>`` optimizer moments, keyed by the parameter they belong to,
* ``memory/<key>``   the strategy's and gates' memory (prediction history, counters, ...).

A state *at rest* (loaded, rolled back, just saved) is kept as a :class:`PackedState`: one
buffer per dtype plus a layout shared by every subject with the same tensors. A resident
subject then costs its tensor bytes and about a kilobyte, instead of a few hundred tensor
objects (about 0.5 KiB each: 0.1 MiB for a ResNet-18 ``tent`` state). Steps work on an
unpacked :class:`SubjectState`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["PackedState", "SubjectState"]

_GROUPS = ("params", "buffers", "optim", "memory")


@dataclass
class SubjectState:
    """Tensors one subject owns. Plain data: strategies read and write it under the lock."""

    params: dict[str, Tensor] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    optim: dict[str, Tensor] = field(default_factory=dict)
    memory: dict[str, Tensor] = field(default_factory=dict)

    def model_tensors(self) -> dict[str, Tensor]:
        """Parameters and buffers to swap into the shared model."""
        return {**self.params, **self.buffers}

    def flat(self) -> dict[str, Tensor]:
        """All tensors under prefixed keys (the on-disk layout)."""
        out: dict[str, Tensor] = {}
        for group in _GROUPS:
            for key, tensor in getattr(self, group).items():
                out[f"{group}/{key}"] = tensor
        return out

    @classmethod
    def from_flat(cls, tensors: Mapping[str, Tensor]) -> SubjectState:
        """Inverse of :meth:`flat`; raises ``KeyError`` naming a key outside the four groups."""
        state = cls()
        for key, tensor in tensors.items():
            group, sep, name = key.partition("/")
            if not sep or group not in _GROUPS or not name:
                raise KeyError(key)
            getattr(state, group)[name] = tensor
        return state

    #: False: the tensors are separate (the form a step works on); see :class:`PackedState`
    is_packed = False

    def clone(self) -> SubjectState:
        """Deep copy of every tensor (used to create and reset subjects)."""
        return SubjectState(
            **{
                group: {k: v.detach().clone() for k, v in getattr(self, group).items()}
                for group in _GROUPS
            }
        )

    def nbytes(self) -> int:
        """Bytes held by this state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.flat().values())

    def unpacked(self) -> SubjectState:
        """An independent copy with separate tensors (same as :meth:`clone`)."""
        return self.clone()

    def packed(self) -> PackedState:
        """A copy for keeping at rest: one buffer per (dtype, device) and a shared layout."""
        tensors = self.flat()
        slots: dict[tuple[torch.dtype, torch.device], int] = {}
        entries: list[tuple[str, int, int, tuple[int, ...]]] = []
        sizes: list[int] = []
        for key, tensor in tensors.items():
            slot = slots.setdefault((tensor.dtype, tensor.device), len(slots))
            if slot == len(sizes):
                sizes.append(0)
            entries.append((key, slot, sizes[slot], tuple(tensor.shape)))
            sizes[slot] += tensor.numel()
        buffers = [
            torch.empty(size, dtype=dtype, device=device)
            for (dtype, device), size in zip(slots, sizes, strict=True)
        ]
        for (_key, slot, offset, _shape), tensor in zip(entries, tensors.values(), strict=True):
            n = tensor.numel()
            buffers[slot][offset : offset + n].copy_(tensor.detach().reshape(-1))
        return PackedState(tuple(buffers), _shared_layout(tuple(entries)))


#: layouts in use, so that subjects with the same tensors share one layout object
_LAYOUTS: dict[tuple[tuple[str, int, int, tuple[int, ...]], ...], object] = {}


def _shared_layout(
    layout: tuple[tuple[str, int, int, tuple[int, ...]], ...],
) -> tuple[tuple[str, int, int, tuple[int, ...]], ...]:
    shared = _LAYOUTS.setdefault(layout, layout)
    if len(_LAYOUTS) > 4096:  # variable-size memory (t3a supports, ...) makes many layouts
        _LAYOUTS.clear()
    return shared  # type: ignore[return-value]


class PackedState:
    """A subject's state at rest: its tensors' values in one buffer per (dtype, device).

    Read-only by convention: :meth:`flat` gives views for reading and saving; a step
    works on :meth:`unpacked` (separate tensors: views of one buffer would share autograd's
    version counter, so an in-place update of one layer's statistics between a forward
    and its backward would invalidate every other layer's saved tensors).
    """

    __slots__ = ("buffers", "layout")
    is_packed = True

    def __init__(
        self,
        buffers: tuple[Tensor, ...],
        layout: tuple[tuple[str, int, int, tuple[int, ...]], ...],
    ) -> None:
        self.buffers = buffers
        #: (flat key, buffer index, offset, shape) per tensor, in :meth:`SubjectState.flat` order
        self.layout = layout

    def flat(self) -> dict[str, Tensor]:
        """Views of every tensor under its prefixed key (do not modify them)."""
        out: dict[str, Tensor] = {}
        for key, slot, offset, shape in self.layout:
            n = 1
            for d in shape:
                n *= d
            out[key] = self.buffers[slot][offset : offset + n].view(shape)
        return out

    def model_tensors(self) -> dict[str, Tensor]:
        """Views of the parameters and buffers to swap into the shared model."""
        return {
            key.partition("/")[2]: t
            for key, t in self.flat().items()
            if key.startswith(("params/", "buffers/"))
        }

    def unpacked(self) -> SubjectState:
        """An independent :class:`SubjectState` with separate tensors (ready for a step)."""
        return SubjectState.from_flat({k: v.clone() for k, v in self.flat().items()})

    def packed(self) -> PackedState:
        """An independent packed copy."""
        return self.clone()

    def clone(self) -> PackedState:
        """An independent packed copy (same layout object)."""
        return PackedState(tuple(b.clone() for b in self.buffers), self.layout)

    def nbytes(self) -> int:
        """Bytes held by this state's tensors."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

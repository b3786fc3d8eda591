"""A subject's adapted state: only the tensors its strategy changes.

Four groups, flattened with a prefix for storage:

* ``params/<name>``  adapted parameters of the shared model (e.g. BN affine),
* ``buffers/<name>`` buffers swapped in with them (e.g. BN running statistics),
* ``optim/<name>/<key>`` optimizer moments, keyed by the parameter they belong to,
* ``memory/<key>``   the strategy's and gates' memory (prediction history, counters, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["SubjectState"]

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

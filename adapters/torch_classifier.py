"""Generic adapter: any PyTorch classifier, with its head named explicitly."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ttaperso.errors import ModelInterfaceError
from ttaperso.model import FERModel

__all__ = ["TorchClassifier"]


class TorchClassifier(FERModel):
    """Wrap ``network`` (frames -> logits) as a :class:`~ttaperso.model.FERModel`.

    Args:
        network: the classifier; it is not modified.
        labels: class names in logit order.
        input_shape: ``(C, H, W)`` of a preprocessed frame (``H``/``W`` may be ``None``).
        head: dotted name of the final classification module (e.g. ``"fc"`` for torchvision
            ResNets). Needed only by strategies that use features and a head; when given,
            a name that matches no module raises, listing the modules that exist.
        input_range: documented value range of preprocessed frames, if any.
        name: identifier used in messages and state metadata.
    """

    def __init__(
        self,
        network: nn.Module,
        labels: Sequence[str],
        input_shape: tuple[int, int | None, int | None],
        *,
        head: str | None = None,
        input_range: tuple[float, float] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            labels, input_shape, input_range=input_range, name=name or type(network).__name__
        )
        self.network = network
        self.head_name = head
        if head is not None:
            modules = dict(network.named_modules())
            if head not in modules or head == "":
                available = [n for n in modules if n][:40]
                raise ModelInterfaceError(
                    f"Expected argument `head` to name a module of the network but {head!r} "
                    f"matches none; modules: {', '.join(available)}"
                )

    def _head_module(self) -> nn.Module:
        if self.head_name is None:
            return super().head  # type: ignore[return-value]
        return self.network.get_submodule(self.head_name)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if not return_features:
            return self.network(x)
        if self.head_name is None:
            super().features(x)  # raises the "no split" error
        captured: list[Tensor] = []
        # A temporary hook, removed before returning: the network's hooks stay as they were.
        handle = self._head_module().register_forward_pre_hook(
            lambda _m, args: captured.append(args[0])
        )
        try:
            logits = self.network(x)
        finally:
            handle.remove()
        return logits, captured[-1].flatten(1)

    def features(self, x: Tensor) -> Tensor:
        return self.forward(x, return_features=True)[1]

    def head(self, z: Tensor) -> Tensor:
        if self.head_name is None:
            return super().head(z)
        return self._head_module()(z)

    def linear_head(self) -> tuple[Tensor, Tensor | None]:
        module = self._head_module() if self.head_name is not None else None
        if not isinstance(module, nn.Linear):
            raise ModelInterfaceError(
                f"Model {self.model_name!r}: head {self.head_name!r} is "
                f"{type(module).__name__}, not nn.Linear"
            )
        return module.weight, module.bias

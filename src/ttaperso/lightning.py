"""Lightning callback: personalize a LightningModule's predictions per subject.

    callback = PersonalizeCallback("norm", subject_key="subject", input_key="x",
                                   labels=LABELS, input_shape=(1, 64, 64))
    trainer = Trainer(callbacks=[callback])                 # gradient-free strategy: fine
    trainer = Trainer(callbacks=[callback], inference_mode=False)   # needed for tent, sar, ...
    trainer.predict(module, dataloader)

During ``trainer.test`` / ``trainer.predict`` the callback wraps the module's network (the
module itself, or the attribute / function given as ``network``) in one
:class:`~ttaperso.Personalizer` and, after each batch, runs that batch's frames through
``Personalizer.predict`` grouped by subject (the order of a subject's frames within the
batch is kept). The personalized logits replace the batch's outputs when the step returned
a tensor of logits (written in place) or a dict with ``output_key``; every batch's
:class:`~ttaperso.Prediction` objects are also kept in :attr:`PersonalizeCallback.predictions`.
A ``test_step``/``predict_step`` that prefers to use the personalized logits itself can
call :meth:`PersonalizeCallback.personalize` and set ``automatic=False``.

Why a callback refuses to run: Lightning runs test/predict under ``torch.inference_mode()``
by default (FACTS.md section 5); tensors made there can never enter autograd, so a gradient
strategy (tent, sar, ...) cannot adapt. The callback raises a :class:`ConfigError` at the
start of the stage, naming ``Trainer(inference_mode=False)`` as the fix, instead of failing
deep inside autograd. Gradient-free strategies (source, norm, ...) run under inference mode.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

from .config import StrategyConfig
from .errors import ConfigError, InputError
from .personalizer import Personalizer, Prediction
from .source_data import SourceData

__all__ = ["PersonalizeCallback"]

NetworkGetter = Callable[[LightningModule], nn.Module]


def _batch_item(batch: Any, key: str | int, what: str) -> Any:
    """``batch[key]`` for a dict (str key) or a tuple/list batch (int key), with a clear error."""
    try:
        if isinstance(batch, Mapping):
            return batch[key]
        if isinstance(batch, Sequence) and isinstance(key, int):
            return batch[key]
    except (KeyError, IndexError):
        pass
    keys = list(batch) if isinstance(batch, Mapping) else f"{len(batch)} positions"
    raise InputError(
        f"PersonalizeCallback: the batch has no {what} under key {key!r}; batch keys: {keys}"
    )


def _subject_ids(value: Any, n: int) -> list[str]:
    """Subject ids of a batch: a str (whole batch), a sequence of str/int, or an int tensor."""
    if isinstance(value, str):
        ids = [value] * n
    elif isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dim() > 1:
            raise InputError(
                "PersonalizeCallback: expected subject ids as str, a list of str, or a 1-D "
                f"integer tensor but got a tensor {value.dtype} {tuple(value.shape)}"
            )
        ids = [str(v) for v in value.reshape(-1).tolist()]
    elif isinstance(value, Sequence):
        ids = [str(v) for v in value]
    else:
        raise InputError(
            f"PersonalizeCallback: expected subject ids as str or a sequence but got "
            f"{type(value).__name__}"
        )
    if len(ids) != n:
        raise InputError(f"PersonalizeCallback: {len(ids)} subject ids for a batch of {n} frames")
    return ids


class PersonalizeCallback(Callback):
    """Personalize predictions per subject during ``trainer.test`` and ``trainer.predict``.

    Args:
        strategy: a registered strategy name or config object (as for the Personalizer).
        subject_key: where the batch holds subject ids (dict key, or tuple position).
        input_key: where the batch holds the preprocessed frames ``(N, C, H, W)``.
        output_key: key of the logits when a step returns a dict.
        network: the module to personalize: None (the LightningModule itself), an
            attribute name of the LightningModule, or a function ``module -> nn.Module``.
        automatic: replace the step outputs after each batch (False: call
            :meth:`personalize` from the step yourself).
        labels, input_shape, head, input_range, source: passed to the Personalizer.
        **options: strategy config overrides (``lr=1e-4``, ...).

    Attributes:
        personalizer: the Personalizer (built at the first test/predict start, kept across
            stages so that subjects continue their adaptation; :meth:`reset` forgets it).
        predictions: subject -> list of :class:`~ttaperso.Prediction`, in stream order.
    """

    def __init__(
        self,
        strategy: str | StrategyConfig = "norm",
        *,
        subject_key: str | int = "subject",
        input_key: str | int = "x",
        output_key: str = "logits",
        network: str | NetworkGetter | None = None,
        automatic: bool = True,
        labels: Sequence[str] | None = None,
        input_shape: tuple[int, int | None, int | None] | None = None,
        head: str | None = None,
        input_range: tuple[float, float] | None = None,
        source: SourceData | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.subject_key = subject_key
        self.input_key = input_key
        self.output_key = output_key
        self.network = network
        self.automatic = automatic
        self._model_kwargs: dict[str, Any] = {
            "labels": labels,
            "input_shape": input_shape,
            "head": head,
            "input_range": input_range,
        }
        self._source = source
        self._options = options
        self.personalizer: Personalizer | None = None
        self.predictions: dict[str, list[Prediction]] = defaultdict(list)

    # ----------------------------------------------------------------- set-up
    def _network(self, pl_module: LightningModule) -> nn.Module:
        if self.network is None:
            return pl_module
        if isinstance(self.network, str):
            module = getattr(pl_module, self.network, None)
            if not isinstance(module, nn.Module):
                raise ConfigError(
                    f"PersonalizeCallback: the LightningModule has no nn.Module attribute "
                    f"{self.network!r}"
                )
            return module
        return self.network(pl_module)

    def _build(self, pl_module: LightningModule) -> Personalizer:
        if self.personalizer is None:
            kwargs = {k: v for k, v in self._model_kwargs.items() if v is not None}
            # The Personalizer copies and freezes the network once (outside inference mode,
            # so that its parameters can take part in gradient strategies' autograd).
            with torch.inference_mode(False):
                self.personalizer = Personalizer(
                    self._network(pl_module),
                    self.strategy,
                    source=self._source,
                    **kwargs,
                    **self._options,
                )
        return self.personalizer

    def needs_gradients(self) -> bool:
        """Whether the strategy differentiates (and so cannot run under inference mode)."""
        if self.personalizer is None:
            raise ConfigError("PersonalizeCallback: no Personalizer yet (no test/predict ran)")
        return self.personalizer.strategy.needs_gradients

    def _start(self, pl_module: LightningModule, stage: str) -> None:
        personalizer = self._build(pl_module)
        if torch.is_inference_mode_enabled() and self.needs_gradients():
            raise ConfigError(
                f"PersonalizeCallback: strategy {personalizer.strategy_name!r} adapts "
                f"with gradients, but the Trainer runs {stage} under torch.inference_mode(), "
                "where no gradient can be taken. Use Trainer(inference_mode=False), or a "
                "gradient-free strategy (source, norm)."
            )

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module, "predict")

    def reset(self) -> None:
        """Forget the Personalizer and every subject's predictions."""
        self.personalizer = None
        self.predictions = defaultdict(list)

    # ------------------------------------------------------------ prediction
    def personalize(self, pl_module: LightningModule, batch: Any) -> Tensor:
        """Personalized logits ``(N, C)`` for a batch, adapting each subject in it.

        Frames are grouped by subject; within a subject they keep their batch order.
        """
        p = self._build(pl_module)
        frames = _batch_item(batch, self.input_key, "frames")
        if not isinstance(frames, Tensor) or frames.dim() != 4:
            raise InputError(
                f"PersonalizeCallback: expected frames (N, C, H, W) under {self.input_key!r} "
                f"but got {tuple(frames.shape) if isinstance(frames, Tensor) else type(frames)}"
            )
        ids = _subject_ids(_batch_item(batch, self.subject_key, "subject ids"), frames.shape[0])
        groups: dict[str, list[int]] = defaultdict(list)
        for i, subject in enumerate(ids):
            groups[subject].append(i)
        logits = torch.empty(frames.shape[0], len(p.labels), dtype=frames.dtype)
        # Lightning runs the hooks under no_grad (inference_mode=False) or inference_mode;
        # a gradient strategy's loss must be built with grad enabled (a no-op otherwise;
        # inference mode was refused at the stage start).
        grad = not torch.is_inference_mode_enabled()
        # One call for the batch's subjects: strategies whose model forward is the same for
        # everyone run it once over the whole batch (predict_many).
        with torch.set_grad_enabled(grad):
            outs = p.predict_many({subject: frames[index] for subject, index in groups.items()})
        for subject, index in groups.items():
            out = outs[subject]
            self.predictions[subject].append(out)
            logits[index] = out.logits.to(logits.dtype).cpu()
        return logits

    def _replace(self, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        if not self.automatic:
            return
        logits = self.personalize(pl_module, batch)
        if isinstance(outputs, Tensor) and outputs.shape == logits.shape:
            outputs.copy_(logits.to(outputs.device, outputs.dtype))
        elif isinstance(outputs, dict) and self.output_key in outputs:
            outputs[self.output_key] = logits.to(outputs[self.output_key].device)
        # Other outputs (a loss, metrics, None) stay as they are: the personalized
        # predictions are in `self.predictions`.

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._replace(pl_module, outputs, batch)

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._replace(pl_module, outputs, batch)

    def subject_predictions(self, subject: str) -> Tensor:
        """All personalized predicted labels of ``subject`` so far, in stream order."""
        if subject not in self.predictions:
            raise InputError(f"Unknown subject {subject!r}; seen: {sorted(self.predictions)[:20]}")
        return torch.cat([p.labels for p in self.predictions[subject]])

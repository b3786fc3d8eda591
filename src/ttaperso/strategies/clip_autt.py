"""``clip_autt``: per-subject test-time tuning of CLIP-AU's Action-Unit prompts.

CLIP-AUTT (Zeeshan et al.; osamazeeshan/CLIP-AUTT, re-implemented from the paper and FACTS.md,
no code copied). Per subject, learnable context vectors replace the context words of every
AU prompt (``n_ctx`` tokens per AU, initialised from the embedding of "a photo of a"); the
frozen CLIP text encoder turns the tuned prompts into AU text embeddings, the image's AU
activations go through the frozen CLIP-AU temporal head. Test-time objective: the entropy
of the video-level prediction (mean frame logits) of the lowest-entropy window of ``K``
consecutive frames among the subject's recent frames; AdamW.

State per subject: the context vectors ``(A, n_ctx, width)``, AdamW's two moments and step
count, the image embeddings of the last ``memory_frames`` frames (temporal context and the
candidate windows), a pending-frame counter, and the AU text embeddings of the current
context (``(A, D)``, recomputed after every step: the text encoder over all AU prompts is
the cost of this method, and a call without a step then runs only the image tower).

Differences from the released code, on purpose:

* the tuned prompt keeps the AU words (``[SOS] ctx_1..ctx_n <AU words> . [EOS]``); the
  release built its tuned prompts without them;
* the prompts are reset per subject (each subject starts from the initial context; the
  release never resets them between subjects);
* the AU list is a checked list of records (the release merged two AU prompts through a
  missing comma);
* streaming: one AdamW step per ``update_every`` admitted frames (the release tunes once per
  20-frame clip); with fewer than ``window_frames`` frames seen, the window is all of them.

Predictions are made before the update of the same call (as in ``tent``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import StrategyConfig
from ..errors import ModelInterfaceError, StateFileError
from ..functional import softmax_entropy
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .base import Strategy, optimizer_step
from .registry import register_strategy

__all__ = ["ClipAuttConfig", "ClipAuttStrategy"]

_CTX = "ctx"
_FEATURES = "clip_autt.features"
_PENDING = "clip_autt.pending"
_TEXT = "clip_autt.au_text"


@dataclass(frozen=True)
class ClipAuttConfig(StrategyConfig):
    """Options of CLIP-AUTT.

    Args:
        lr: AdamW learning rate (authors: 1e-3).
        weight_decay: AdamW weight decay (torch's default 0.01).
        window_frames: ``K``, frames of the lowest-entropy window tuned on (authors: 16).
        memory_frames: recent frames whose embeddings the subject keeps (>= ``window_frames``;
            bounds the state and the candidate windows).
        update_every: admitted frames per AdamW step.
    """

    strategy_name = "clip_autt"
    lr: float = 1e-3
    weight_decay: float = 0.01
    window_frames: int = 16
    memory_frames: int = 32
    update_every: int = 8

    def validate(self) -> None:
        self._check("lr", self.lr > 0.0, "a number > 0")
        self._check("weight_decay", self.weight_decay >= 0.0, "a number >= 0")
        self._check("window_frames", self.window_frames >= 1, "an int >= 1")
        self._check(
            "memory_frames",
            self.memory_frames >= self.window_frames,
            f"an int >= window_frames ({self.window_frames})",
        )
        self._check("update_every", self.update_every >= 1, "an int >= 1")


@dataclass
class ClipAuttForward(ForwardOutput):
    """Forward output plus the AU text embeddings (with their graph when an update is due)."""

    au_text: Tensor | None = None


@register_strategy
class ClipAuttStrategy(Strategy):
    """CLIP-AUTT with per-subject AU context vectors, AdamW moments and recent embeddings."""

    config_class = ClipAuttConfig
    config: ClipAuttConfig
    variable_memory = (*Strategy.variable_memory, _FEATURES)
    needs_gradients = True

    def __init__(
        self, config: ClipAuttConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
        from ..clip_au.model import CLIPAUModel

        module = runtime.module
        if not isinstance(module, CLIPAUModel):
            raise ModelInterfaceError(
                f"Strategy 'clip_autt' tunes CLIP-AU's Action-Unit prompts and needs a "
                f"ttaperso.clip_au.CLIPAUModel; model {module.model_name!r} is a "
                f"{type(module).__name__}"
            )
        self.model: CLIPAUModel = module
        super().__init__(config, runtime, source)
        cfg = config
        self._make_optimizer = lambda params: torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay
        )

    def init_state(self) -> SubjectState:
        state = SubjectState()
        ctx = self.model.context_init()
        state.params[_CTX] = ctx.unsqueeze(0).repeat(len(self.model.aus), 1, 1).contiguous()
        state.memory[_FEATURES] = torch.zeros(0, self.model.clip.embed_dim)
        state.memory[_PENDING] = torch.tensor(0.0, dtype=torch.float64)
        with torch.no_grad():
            state.memory[_TEXT] = self.model.au_text_from_context(state.params[_CTX]).contiguous()
        return state

    def trainable(self, state: SubjectState) -> tuple[str, ...]:
        return (_CTX,)

    def forward(self, state: SubjectState, frames: Tensor) -> ClipAuttForward:
        """Logits of ``frames`` with the subject's prompts and causal context of past frames."""
        model = self.model
        due = float(state.memory[_PENDING]) + frames.shape[0] >= self.config.update_every
        ctx = state.params[_CTX].detach().requires_grad_(due)
        with self.runtime.lock:
            with torch.no_grad():
                z = model.features(frames)
            # The text encoder over all AU prompts is the cost of a step: it runs (with its
            # graph) only when this call may take an optimizer step; otherwise the embeddings
            # of the current context are read from the subject's state.
            if due:
                with torch.enable_grad():
                    au_text = model.au_text_from_context(ctx)
            else:
                au_text = state.memory[_TEXT]
            with torch.no_grad():
                past = state.memory[_FEATURES][-(model.window - 1) :] if model.window > 1 else None
                seq = z if past is None or past.shape[0] == 0 else torch.cat([past, z])
                logits = model.sequence_logits(seq, au_text.detach())[-z.shape[0] :]
        return ClipAuttForward(
            logits=logits, features=z, leaves={_CTX: ctx}, moments=None, au_text=au_text
        )

    def adapt(
        self, state: SubjectState, frames: Tensor, out: ForwardOutput, admitted: Tensor
    ) -> Tensor:
        if out.features is None or not isinstance(out, ClipAuttForward):
            raise ModelInterfaceError("clip_autt.adapt needs the output of its own forward")
        cfg = self.config
        recent = torch.cat([state.memory[_FEATURES], out.features.detach()])[-cfg.memory_frames :]
        state.memory[_FEATURES] = recent.contiguous()
        pending = float(state.memory[_PENDING]) + float(admitted.sum())
        if pending < cfg.update_every or out.au_text is None or not out.au_text.requires_grad:
            state.memory[_PENDING].fill_(pending)
            return torch.zeros_like(admitted)
        state.memory[_PENDING].fill_(0.0)
        with self.runtime.lock:
            loss = self.window_entropy(recent, out.au_text)
            (grad,) = torch.autograd.grad(loss, [out.leaves[_CTX]])
        if not bool(torch.isfinite(grad).all()):
            return torch.zeros_like(admitted)  # a non-finite gradient never reaches the state
        optimizer_step(state, {_CTX: grad}, self._make_optimizer)
        with self.runtime.lock, torch.no_grad():
            state.memory[_TEXT] = self.model.au_text_from_context(state.params[_CTX]).contiguous()
        return admitted.clone()

    def window_entropy(self, recent: Tensor, au_text: Tensor) -> Tensor:
        """Entropy of the video-level prediction of the lowest-entropy window of K frames."""
        k = min(self.config.window_frames, recent.shape[0])
        frame_logits = self.model.sequence_logits(recent, au_text)
        window_logits = frame_logits.unfold(0, k, 1).mean(dim=-1)  # (T - k + 1, C)
        entropies = softmax_entropy(window_logits)
        return entropies[int(entropies.detach().argmin())]

    def check_state(self, state: SubjectState, source: str) -> None:
        super().check_state(state, source)
        rows = state.memory[_FEATURES].shape[0]
        if rows > self.config.memory_frames:
            raise StateFileError(
                f"{source}: memory/{_FEATURES} holds {rows} frames, more than memory_frames="
                f"{self.config.memory_frames}"
            )

"""CLIP-AU: expression recognition through CLIP's similarity to Action-Unit descriptions.

Pipeline (Zeeshan et al., CLIP-AU / CLIP-AUTT; re-implemented from the paper's description):

1. image -> CLIP image embedding ``z`` (L2-normalised);
2. AU activations ``a_k = s * cos(z, t_k) + b_k`` with ``t_k`` the text embedding of the
   prompt ``"<context> <AU description>."`` (``context`` = "a photo of a"), ``s`` CLIP's
   temperature and ``b_k`` a learned per-AU offset: one interpretable score per AU;
3. a light causal temporal head over the last ``window`` frames of ``[a, z]`` -> per-frame
   expression logits; a window's (video-level) prediction is the mean of its frame logits.

The temporal head is causal and pads the stream start by repeating the first frame, so a
frame's logits depend on itself and the ``window - 1`` frames before it only. Called as a
plain :class:`~ttaperso.model.FERModel` (e.g. by the ``source`` strategy), a batch is one
stretch of video; ``clip_autt`` keeps the subject's recent frames and gives every frame its
full causal context across calls.

The AU text embeddings of the fixed prompts are a persistent buffer (part of the model's
digest), recomputed by :meth:`CLIPAUModel.refresh_text` after the text tower changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, ModelInterfaceError
from ..model import FERModel
from .aus import ACTION_UNITS, ActionUnit

if TYPE_CHECKING:  # pragma: no cover
    from ..adapters.open_clip_fer import CLIPFER

__all__ = ["CLIPAUModel", "TemporalHead", "DEFAULT_CONTEXT"]

#: words in front of every AU description; ``clip_autt`` starts its context vectors here
DEFAULT_CONTEXT = "a photo of a"


class TemporalHead(nn.Module):
    """Causal temporal classifier over a sequence of per-frame vectors.

    ``(T, in_dim) -> (T, num_classes)``: LayerNorm, linear projection, a causal 1D
    convolution over ``window`` frames (start padded by repeating the first frame), a
    residual connection and a linear classifier.
    """

    def __init__(self, in_dim: int, num_classes: int, window: int, hidden: int) -> None:
        super().__init__()
        if window < 1 or hidden < 1:
            raise ModelInterfaceError(
                f"Expected `window` >= 1 and `hidden` >= 1 but got window={window}, hidden={hidden}"
            )
        self.window = int(window)
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=self.window)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, seq: Tensor) -> Tensor:
        h = F.gelu(self.proj(self.norm(seq)))
        if self.window > 1:
            padded = torch.cat([h[:1].expand(self.window - 1, -1), h], dim=0)
        else:
            padded = h
        mixed = self.conv(padded.T.unsqueeze(0)).squeeze(0).T
        return self.out(F.gelu(mixed) + h)


class CLIPAUModel(FERModel):
    """CLIP-AU on top of a :class:`~ttaperso.adapters.open_clip_fer.CLIPFER`.

    Args:
        clip: the CLIP adapter (architecture, weights, preprocessing, tokenizer).
        labels: expression classes, in logit order (default: the CLIP adapter's).
        aus: the Action Units used as prompts (default: :data:`~ttaperso.clip_au.aus.ACTION_UNITS`).
        context: words before each AU description (their token count is ``n_ctx``).
        window: frames seen by the temporal head (causal).
        hidden: width of the temporal head.
        use_image_features: also feed the image embedding (not only AU activations) to the head.
    """

    clip: CLIPFER
    au_tokens: Tensor
    au_text: Tensor

    def __init__(
        self,
        clip: CLIPFER,
        labels: Sequence[str] | None = None,
        *,
        aus: Sequence[ActionUnit] = ACTION_UNITS,
        context: str = DEFAULT_CONTEXT,
        window: int = 8,
        hidden: int = 64,
        use_image_features: bool = True,
    ) -> None:
        if not all(hasattr(clip, a) for a in ("clip", "tokenize", "encode_text", "logit_scale")):
            raise ModelInterfaceError(
                f"CLIPAUModel needs a CLIP adapter (ttaperso.adapters.open_clip_fer.CLIPFER), "
                f"got {type(clip).__name__}"
            )
        if not hasattr(clip.clip, "token_embedding"):
            raise ModelInterfaceError(
                "CLIP-AU tunes prompt embeddings and needs open_clip's CLIP class with its own "
                f"text transformer; {type(clip.clip).__name__} has none (CustomTextCLIP?)"
            )
        aus = tuple(aus)
        if len(aus) < 2 or len({a.au for a in aus}) != len(aus):
            raise ModelInterfaceError(
                f"Expected at least 2 distinct Action Units but got {[a.au for a in aus]}"
            )
        super().__init__(
            labels if labels is not None else clip.labels,
            clip.input_shape,
            input_range=clip.input_range,
            name=f"clip-au/{clip.model_name}",
        )
        self.clip = clip
        self.aus = aus
        self.context = context
        context_ids = clip.tokenize([context])[0]
        # Tokens between start-of-text and end-of-text are the context words.
        self.n_ctx = int((context_ids > 0).sum()) - 2
        if self.n_ctx < 1:
            raise ModelInterfaceError(f"Expected a non-empty `context` but got {context!r}")
        prompts = [f"{context} {a.description}." for a in aus]
        tokens = clip.tokenize(prompts)
        truncated = [p for p, t in zip(prompts, tokens, strict=True) if int(t[-1]) != 0]
        if truncated:
            raise ModelInterfaceError(
                f"AU prompts longer than the text context ({clip.context_length} tokens): {truncated}"
            )
        self.register_buffer("au_tokens", tokens)
        self.register_buffer("au_text", torch.zeros(len(aus), clip.embed_dim))
        self.au_bias = nn.Parameter(torch.zeros(len(aus)))
        self.use_image_features = bool(use_image_features)
        in_dim = len(aus) + (clip.embed_dim if use_image_features else 0)
        self.temporal = TemporalHead(in_dim, len(self.labels), window, hidden)
        self.refresh_text()

    # ------------------------------------------------------------------ text side
    @property
    def window(self) -> int:
        """Frames the temporal head sees (including the current one)."""
        return self.temporal.window

    @property
    def au_ids(self) -> tuple[int, ...]:
        """FACS numbers of the AU activation columns."""
        return tuple(a.au for a in self.aus)

    def context_init(self) -> Tensor:
        """Token embeddings of the context words, ``(n_ctx, width)`` (prompt-tuning start)."""
        with torch.no_grad():
            embedded = self.clip.clip.token_embedding(self.au_tokens[:1])
        return embedded[0, 1 : 1 + self.n_ctx].detach().clone()

    def au_text_from_context(self, ctx: Tensor) -> Tensor:
        """Normalised AU text embeddings ``(A, D)`` with the context words replaced by ``ctx``.

        ``ctx``: ``(n_ctx, width)`` shared by all AUs or ``(A, n_ctx, width)`` per AU. The AU
        words stay in the prompt: ``[SOS] ctx_1..ctx_n <AU words> . [EOS]``.
        """
        from ttaperso.adapters.open_clip_fer import encode_prompt_embeddings

        a = len(self.aus)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(a, -1, -1)
        if ctx.shape[:2] != (a, self.n_ctx):
            raise InputError(
                f"Expected context vectors ({a}, {self.n_ctx}, width) but got {tuple(ctx.shape)}"
            )
        embedded = self.clip.clip.token_embedding(self.au_tokens)
        prompt = torch.cat(
            [embedded[:, :1], ctx.to(embedded.dtype), embedded[:, 1 + self.n_ctx :]], dim=1
        )
        return F.normalize(encode_prompt_embeddings(self.clip.clip, prompt, self.au_tokens), dim=-1)

    @torch.no_grad()
    def refresh_text(self) -> None:
        """Recompute the fixed AU prompt embeddings (after changing the text tower)."""
        self.au_text.copy_(self.clip.encode_text(self.au_tokens))

    # --------------------------------------------------------------- prediction
    def au_activations(self, z: Tensor, au_text: Tensor | None = None) -> Tensor:
        """AU activation vectors ``(N, A)`` of normalised image embeddings ``z``."""
        text = self.au_text if au_text is None else au_text
        return self.clip.logit_scale() * z @ text.T + self.au_bias

    def head_inputs(self, z: Tensor, au_text: Tensor | None = None) -> Tensor:
        """Per-frame inputs of the temporal head: ``[AU activations, z]`` or AU activations."""
        acts = self.au_activations(z, au_text)
        return torch.cat([acts, z], dim=1) if self.use_image_features else acts

    def sequence_logits(self, z: Tensor, au_text: Tensor | None = None) -> Tensor:
        """Per-frame logits ``(T, C)`` of a stream stretch of image embeddings ``(T, D)``."""
        return self.temporal(self.head_inputs(z, au_text))

    def features(self, x: Tensor) -> Tensor:
        return self.clip.features(x)

    def head(self, z: Tensor) -> Tensor:
        return self.sequence_logits(z)

    def prepare(self, images: Tensor) -> Tensor:
        return self.clip.prepare(images)

"""CLIP as a zero-shot FER model: any open_clip CLIP architecture behind :class:`FERModel`.

``CLIPFER("ViT-B-32", checkpoint="/path/to/weights.safetensors")`` builds the architecture
with open_clip (no download: ``pretrained`` is never passed to open_clip), loads local weights
without executing pickles, and classifies by cosine similarity to class prompts
("a photo of a face showing {label}." averaged over templates, as in CLIP's zero-shot recipe).

Runtime interface (so feature strategies such as ``t3a`` or ``tta_cap`` work on CLIP):

* ``prepare(images in [0, 1])``: gray repeated to RGB, bilinear resize to the model's image
  size, CLIP's per-channel mean/std normalisation;
* ``features(x)``: the L2-normalised image embedding;
* ``linear_head()``: ``(logit_scale * class text embeddings, None)``;
* ``input_range`` is ``None`` (normalised pixels have no documented range).

``channels=1`` makes the model take one luminance channel in ``[0, 1]`` (``prepare`` then only
resizes) and do the RGB repeat and normalisation as the first step of :meth:`features`: the
same numbers for gray faces with a third of the frame memory.

Tests and timing runs build a tiny randomly initialised CLIP from :func:`tiny_clip_config`
with :func:`build_clip` (open_clip's own ``CLIP`` class, seconds on a CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttaperso.errors import ModelInterfaceError, StateFileError
from ttaperso.model import FERModel

__all__ = [
    "CLIPFER",
    "DEFAULT_TEMPLATES",
    "FER_LABELS",
    "build_clip",
    "tiny_clip_config",
    "load_clip_checkpoint",
    "encode_prompt_embeddings",
    "check_state_dict_fits",
]

#: the seven basic-expression classes (FER2013 order)
FER_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
#: zero-shot prompt templates; ``{label}`` is replaced by the class name
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a face showing {label}.",
    "a person with an expression of {label}.",
    "a close-up photo of a {label} face.",
)
# CLIP's pixel statistics (open_clip.constants.OPENAI_DATASET_MEAN/STD); every open_clip
# CLIP model without its own preprocess config uses them.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_config(
    image_size: int = 16, embed_dim: int = 32, width: int = 32, context_length: int = 24
) -> dict[str, Any]:
    """A CLIP config small enough for unit tests (one layer per tower, ~1.6M parameters).

    The vocabulary is open_clip's full BPE vocabulary (49,408 tokens) so the shipped
    tokenizer works unchanged; most parameters are that token table.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": max(1, image_size // 4),
            "width": width,
            "layers": 1,
            "head_width": max(8, width // 2),
            "mlp_ratio": 2.0,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": width,
            "heads": 2,
            "layers": 1,
            "mlp_ratio": 2.0,
        },
    }


def build_clip(config: Mapping[str, Any], seed: int | None = None) -> nn.Module:
    """Build an open_clip ``CLIP`` from a config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``).

    Random weights; ``seed`` makes them reproducible without touching the global RNG.
    """
    from open_clip.model import CLIP

    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config)
    if missing:
        raise ModelInterfaceError(
            f"Expected a CLIP config with keys embed_dim, vision_cfg, text_cfg; missing {sorted(missing)}"
        )
    if seed is None:
        return CLIP(**dict(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(**dict(config))


def load_clip_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load local weights into an open_clip model without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (open_clip's own loader falls back to a full pickle load
    on old torch and accepts TorchScript archives, so it is not used). A ``state_dict`` entry
    and a DataParallel ``module.`` prefix are unwrapped. The load is strict: a checkpoint for
    another architecture raises :class:`~ttaperso.errors.StateFileError` naming the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"CLIP checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: Any = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise StateFileError(
            f"CLIP checkpoint {str(path)!r} is not a safetensors file or a weights-only torch "
            f"file (TorchScript/pickled models are refused): {exc}"
        ) from exc
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(v, Tensor) for v in checkpoint.values()
    ):
        raise StateFileError(f"CLIP checkpoint {str(path)!r} does not hold a tensor state dict")
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in checkpoint.items()}
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, Tensor) and "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(scale.shape)
    check_state_dict_fits(model, state, f"CLIP checkpoint {str(path)!r}")
    model.load_state_dict(state, strict=True)


def check_state_dict_fits(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`StateFileError` unless ``state`` has exactly ``model``'s keys and shapes.

    Checked before loading, so a refused file leaves the model untouched.
    """
    want = model.state_dict()
    missing = sorted(want.keys() - state.keys())
    unexpected = sorted(state.keys() - want.keys())
    misshapen = sorted(k for k in want.keys() & state.keys() if want[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        raise StateFileError(
            f"{what} does not fit this architecture: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {misshapen[:5]}"
        )


def encode_prompt_embeddings(clip: Any, embeddings: Tensor, tokens: Tensor) -> Tensor:
    """CLIP's text encoder from token *embeddings* (prompt tuning): ``(P, L, width) -> (P, D)``.

    Same computation as open_clip's ``CLIP.encode_text`` after its token lookup: positional
    embedding, causal transformer, final LayerNorm, the feature at the end-of-text token
    (located in ``tokens``, the ids the embeddings stand for) and the text projection.
    Returns unnormalised embeddings.

    With CLIP's causal attention mask and end-of-text pooling, positions after the last
    end-of-text token cannot influence the pooled feature, so the sequence is cut there
    (same result, e.g. 17 instead of 77 positions for the AU prompts: the text encoder
    over all AU prompts is the cost of a ``clip_autt`` step).
    """
    from open_clip.transformer import text_global_pool

    cast_dtype = clip.transformer.get_cast_dtype()
    mask = clip.attn_mask
    length = embeddings.shape[1]
    if mask is not None and clip.text_pool_type == "argmax":
        length = int(tokens.argmax(dim=-1).max()) + 1
        embeddings, tokens, mask = (
            embeddings[:, :length],
            tokens[:, :length],
            mask[:length, :length],
        )
    x = embeddings.to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = text_global_pool(
        x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None)
    )
    projection = clip.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x


@functools.lru_cache(maxsize=8)
def _tokenizer(context_length: int) -> Any:
    # One BPE tokenizer per context length, outside the module: it holds large vocabulary
    # tables that copying the model (the runtime copies it once) should not duplicate.
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


class CLIPFER(FERModel):
    """Zero-shot CLIP classifier over facial-expression prompts.

    Args:
        model_name: an open_clip architecture name (``"ViT-B-32"``, see
            ``open_clip.list_models()``); ignored when ``config`` is given.
        checkpoint: local weights (``.safetensors`` or a weights-only torch file); ``None``
            keeps random weights (timing, tests).
        labels: class names, in logit order; they fill ``{label}`` in the templates.
        templates: prompt templates; a class embedding is the normalised mean over them.
        image_size: input size; default the architecture's.
        channels: 3 (RGB input, normalised by :meth:`prepare`) or 1 (luminance in
            ``[0, 1]``, normalised inside the model).
        config: a CLIP config dict (e.g. :func:`tiny_clip_config`) instead of a named model.
        seed: seed of the random initialisation (``None``: the global RNG).
    """

    clip: Any  # an open_clip CLIP model (open_clip is untyped)
    pixel_mean: Tensor
    pixel_std: Tensor
    class_tokens: Tensor
    class_text: Tensor

    def __init__(
        self,
        model_name: str | None = "ViT-B-32",
        checkpoint: str | Path | None = None,
        *,
        labels: Sequence[str] = FER_LABELS,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        image_size: int | None = None,
        channels: int = 3,
        config: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        import open_clip

        if channels not in (1, 3):
            raise ModelInterfaceError(
                f"Expected argument `channels` to be 1 or 3 but got {channels!r}"
            )
        templates = tuple(templates)
        if not templates or not all(isinstance(t, str) and "{label}" in t for t in templates):
            raise ModelInterfaceError(
                f"Expected argument `templates` to be non-empty strings containing '{{label}}' "
                f"but got {templates!r}"
            )
        if config is None:
            if not isinstance(model_name, str) or model_name not in open_clip.list_models():
                raise ModelInterfaceError(
                    f"Unknown open_clip architecture {model_name!r}; see open_clip.list_models()"
                )
            config = dict(open_clip.get_model_config(model_name))
            name = model_name
        else:
            name = model_name or "custom"
        config = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
        if image_size is not None:
            config["vision_cfg"]["image_size"] = int(image_size)
        size = config["vision_cfg"].get("image_size", 224)
        size = int(size if isinstance(size, int) else size[0])
        super().__init__(labels, (channels, size, size), input_range=None, name=f"clip/{name}")
        clip = build_clip(config, seed=seed)
        if checkpoint is not None:
            load_clip_checkpoint(clip, checkpoint)
        clip.eval()
        self.clip = clip
        self.clip_config = config
        self.templates = templates
        self.context_length = int(config["text_cfg"].get("context_length", 77))
        self.register_buffer("pixel_mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1))
        prompts = [t.format(label=label) for label in self.labels for t in templates]
        self.register_buffer("class_tokens", self.tokenize(prompts))
        self.register_buffer("class_text", torch.zeros(len(self.labels), self.embed_dim))
        self.refresh_text()

    # ------------------------------------------------------------------ text side
    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image/text embedding."""
        return (
            int(self.clip.text_projection.shape[-1])
            if isinstance(self.clip.text_projection, Tensor)
            else int(self.clip_config["embed_dim"])
        )

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``(len(texts), context_length)`` from open_clip's shipped BPE tokenizer."""
        return _tokenizer(self.context_length)(list(texts))

    def encode_text(self, tokens: Tensor) -> Tensor:
        """L2-normalised text embeddings of token ids."""
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    @torch.no_grad()
    def refresh_text(self) -> None:
        """Recompute the class text embeddings (after changing the text tower's weights).

        They are a persistent buffer, so they are part of the model's digest and checkpoint.
        """
        per_prompt = self.encode_text(self.class_tokens)
        per_class = per_prompt.view(len(self.labels), len(self.templates), -1).mean(dim=1)
        self.class_text.copy_(F.normalize(per_class, dim=-1))

    # ----------------------------------------------------------------- image side
    def prepare(self, images: Tensor) -> Tensor:
        x = super().prepare(images)  # channel conversion and resize; values in [0, 1]
        if self.input_shape[0] == 1:
            return x  # normalised inside features()
        return ((x - self.pixel_mean) / self.pixel_std).contiguous()

    def features(self, x: Tensor) -> Tensor:
        if self.input_shape[0] == 1:
            x = (x.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def logit_scale(self) -> Tensor:
        """CLIP's learned temperature ``exp(logit_scale)`` (a scalar tensor)."""
        return self.clip.logit_scale.exp().reshape(())

    def head(self, z: Tensor) -> Tensor:
        return self.logit_scale() * z @ self.class_text.T

    def linear_head(self) -> tuple[Tensor, Tensor | None]:
        return self.logit_scale().detach() * self.class_text, None

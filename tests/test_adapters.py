"""PyEmotion and torchvision/timm adapters (random weights; real weights skip when absent)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from conftest import LABELS
from safetensors.torch import save_file
from torch import nn
from torchvision.models import ResNet18_Weights

import ttaperso
from ttaperso.adapters import pyemotion as pe
from ttaperso.adapters.torchvision_models import (
    VisionClassifier,
    from_timm,
    from_torchvision,
)
from ttaperso.errors import ConfigError, ModelInterfaceError
from ttaperso.streams.data import data_root

# ----------------------------------------------------------------------------- PyEmotion

#: PyEmotion's NetworkV2 state-dict keys and shapes (read from main_model.pkl's "network")
PYEMOTION_SHAPES = {
    "conv_1.1.weight": (32, 1, 3, 3),
    "conv_2.1.weight": (64, 32, 3, 3),
    "conv_3.1.weight": (128, 64, 3, 3),
    "conv_4.1.weight": (256, 128, 3, 3),
    "conv_4.2.running_var": (256,),
    "linear.0.weight": (256, 9216),
    "linear.2.weight": (7, 256),
    "linear.2.bias": (7,),
}


def _random_pyemotion(seed: int = 0) -> pe.PyEmotionNet:
    torch.manual_seed(seed)
    model = pe.PyEmotionNet().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_pyemotion_architecture() -> None:
    model = _random_pyemotion()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 2_750_151  # FACTS.md: 2.75M
    for key, shape in PYEMOTION_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert model.labels == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    x = torch.rand(3, 1, 48, 48) * 2 - 1
    logits, z = model(x, return_features=True)
    w, b = model.linear_head()
    assert z.shape == (3, 256) and torch.allclose(logits, z @ w.T + b, atol=1e-5)
    # prepare: 64x64 face crops in [0, 1] -> 48x48 in [-1, 1]
    x = model.prepare(torch.rand(2, 1, 64, 64))
    assert x.shape == (2, 1, 48, 48) and float(x.min()) >= -1 and float(x.max()) <= 1


def test_pyemotion_runs_under_personalizer() -> None:
    model = _random_pyemotion()
    p = ttaperso.Personalizer(model, "tent", gates=[], update_every=2, lr=1e-2)
    frames = model.prepare(torch.rand(4, 1, 64, 64))
    before = p.predict(frames, "s").logits
    p.predict(frames, "s")
    assert not torch.equal(before, p.predict(frames, "s").logits)  # it adapts
    assert torch.equal(model(frames), p.predict_frozen(frames))  # the given model untouched


def _checkpoint_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_pyemotion_checkpoint_loading_is_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _random_pyemotion(seed=3)
    # PyEmotion's checkpoint: a dict with the state dict under "network" (+ optimizer etc.)
    pkl = tmp_path / "main_model.pkl"
    pkl.write_bytes(
        _checkpoint_bytes({"network": source.state_dict(), "epochs": 50, "accuracy": 0.9})
    )
    cache = tmp_path / "cache"
    loaded = pe.load_pyemotion(cache, pkl_path=pkl)
    x = torch.rand(2, 1, 48, 48) * 2 - 1
    assert torch.equal(loaded(x), source(x))
    cached = list(cache.glob("pyemotion-*.safetensors"))
    assert len(cached) == 1

    def no_pickle(*_args: object) -> None:
        raise AssertionError("the pickle was read again instead of the safetensors cache")

    with monkeypatch.context() as patch:
        patch.setattr(pe, "_state_from_pickle", no_pickle)
        assert torch.equal(pe.load_pyemotion(cache, pkl_path=pkl)(x), source(x))
    # a pickled module (not plain tensors) is refused by weights_only=True
    with pytest.raises(ModelInterfaceError, match="not a weights-only torch checkpoint"):
        pe._state_from_pickle(_checkpoint_bytes(nn.Linear(2, 2)), "evil.pkl")
    with pytest.raises(ModelInterfaceError, match="'network' state dict"):
        pe._state_from_pickle(_checkpoint_bytes({"net": {}}), "other.pkl")
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(_checkpoint_bytes({"network": {"conv_1.1.weight": torch.zeros(1)}}))
    with pytest.raises(ModelInterfaceError, match="do not fit PyEmotionNet"):
        pe.load_pyemotion(tmp_path / "cache2", pkl_path=wrong)


def test_models_registry_lists_pyemotion() -> None:
    assert "pyemotion" in ttaperso.list_models()


@pytest.fixture(scope="module")
def pyemotion_model() -> pe.PyEmotionNet:
    try:
        return pe.load_pyemotion()
    except ModelInterfaceError as exc:
        pytest.skip(f"PyEmotion weights unavailable (no network or PyPI?): {exc}")


@pytest.mark.real_model
@pytest.mark.real_data
def test_pyemotion_on_jaffe(pyemotion_model: pe.PyEmotionNet) -> None:
    from ttaperso.streams import read_jaffe

    folder = data_root() / "jaffe"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set TTAPERSO_DATA)")
    correct = total = 0
    for stream in read_jaffe(folder):
        stream = stream.relabel(pyemotion_model.labels)
        with torch.no_grad():
            pred = pyemotion_model(pyemotion_model.prepare(stream.images)).argmax(1)
        correct += int((pred == stream.labels).sum())
        total += len(stream)
    # 82/213 = 38.5% with prepare's antialiased resize of the 64x64 fer crop (FACTS.md's
    # 38.0% = 81/213 used OpenCV's plain bilinear resize: see docs/models.md)
    assert (correct, total) == (82, 213)


# ----------------------------------------------------------------------------- torchvision / timm


def test_torchvision_resnet18_under_personalizer_with_norm() -> None:
    torch.manual_seed(0)
    model = from_torchvision("resnet18", labels=LABELS, size=112)
    assert model.head_name == "fc" and model.input_shape == (3, 112, 112)
    digest = {k: v.clone() for k, v in model.state_dict().items()}
    p = ttaperso.Personalizer(model, "norm", gates=[])
    frames = model.prepare(torch.rand(4, 1, 64, 64) * 0.5 + 0.5)  # gray crops -> RGB 112
    assert frames.shape == (4, 3, 112, 112)
    first = p.predict(frames, "s")
    second = p.predict(frames, "s")
    assert first.logits.shape == (4, len(LABELS)) and bool(first.updated.all())
    assert not torch.allclose(first.logits, second.logits)  # the subject's statistics moved
    assert all(torch.equal(v, digest[k]) for k, v in model.state_dict().items())
    w, b = model.linear_head()
    assert w.shape == (len(LABELS), 512)


def test_torchvision_local_weights_and_errors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = from_torchvision("mobilenet_v3_small", labels=LABELS, size=64)
    assert trained.head_name == "classifier.3"
    state = {k: v.contiguous() for k, v in trained.network.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    x = torch.rand(2, 3, 64, 64)
    for file in ("w.safetensors", "w.pt"):
        torch.manual_seed(99)  # another random init, replaced by the file
        loaded = from_torchvision(
            "mobilenet_v3_small", labels=LABELS, size=64, weights=tmp_path / file
        )
        assert torch.equal(loaded(x), trained(x))
    with pytest.raises(ModelInterfaceError, match=r"w\.pt: the weights do not fit"):
        from_torchvision(
            "mobilenet_v3_small", labels=("a", "b"), size=64, weights=tmp_path / "w.pt"
        )
    with pytest.raises(ConfigError, match="Unknown torchvision model 'resnet9000'"):
        from_torchvision("resnet9000", labels=LABELS)
    with pytest.raises(ConfigError, match="hub weights are never downloaded"):
        from_torchvision("resnet18", labels=LABELS, weights=ResNet18_Weights.IMAGENET1K_V1)  # type: ignore[arg-type]
    with pytest.raises(ModelInterfaceError, match="matches none"):
        from_torchvision("resnet18", labels=LABELS, head="classifier")


def test_vision_classifier_standardises_channels() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    model = VisionClassifier(
        net, ("a", "b"), (3, 8, 8), head="1", mean=[0.5, 0.4, 0.3], std=[0.25, 0.5, 1.0]
    )
    images = torch.rand(2, 3, 8, 8)
    x = model.prepare(images)
    expected = (images - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.25, 0.5, 1.0]
    ).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    assert model.input_range == (-2.0, 2.0)
    with pytest.raises(ConfigError, match="both `mean` and `std`"):
        VisionClassifier(net, ("a", "b"), (3, 8, 8), mean=[0.5] * 3)


def test_timm_classifier() -> None:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = from_timm("resnet10t", labels=LABELS, size=32, in_chans=1)
    assert model.head_name == "fc" and model.input_shape == (1, 32, 32)
    p = ttaperso.Personalizer(model, "norm", gates=[])
    out = p.predict(model.prepare(torch.rand(3, 1, 48, 48)), "s")
    assert out.logits.shape == (3, len(LABELS))
    with pytest.raises(ConfigError, match="Unknown timm model"):
        from_timm("no_such_net", labels=LABELS)

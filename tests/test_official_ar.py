"""Family `ar` against the OFFICIAL LlamaGen c2i GPT, on a checkpoint in the official format.

tests/fixtures/ar_tiny_official.pt was made by tests/fixtures/make_ar_official.py, which ran
FoundationVision/LlamaGen @ce98ec4 `autoregressive/models/gpt.py` on CPU: a tiny GPT (vocab 16,
10 classes, 8x8 grid, dim 64, 2 layers, 2 heads, dropouts 0) with seeded random weights, saved as
{"model": state_dict} like train_c2i.py, plus its training-call logits and loss and its
KV-cached (generate.py) logits on 3 fixed token rows with labels [1, 7, 10] (10 = null class).
Only numbers are here. Official alignment: training logits row j predicts tokens[:, j] (the input
is [class, tokens[:, :-1]]), the same as raygen's `logits_uncached` rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raygen.models import build_model
from raygen.models.ar import ARModel, from_official, official_arch

FIXTURE = Path(__file__).parent / "fixtures" / "ar_tiny_official.pt"
TOL = dict(rtol=1e-5, atol=1e-5)  # same computation path as the official one
CROSS = dict(rtol=1e-5, atol=5e-5)  # cached vs uncached: the official paths differ by 1.1e-5 themselves


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def _config_overrides(f: dict) -> dict:
    """ARConfig overrides for the fixture's official ModelArgs (grid from block_size)."""
    c = f["config"]
    grid = int(round(c["block_size"] ** 0.5))
    assert grid * grid == c["block_size"] and c["cls_token_num"] == 1 and c["model_type"] == "c2i"
    return dict(
        vocab_size=c["vocab_size"],
        num_classes=c["num_classes"],
        grid_size=grid,
        dim=c["dim"],
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        resid_dropout=c["resid_dropout_p"],
        ffn_dropout=c["ffn_dropout_p"],
        token_dropout=c["token_dropout_p"],
        class_dropout=c["class_dropout_prob"],
        rope_base=float(c["rope_base"]),
        norm_eps=c["norm_eps"],
    )


def _loaded(f: dict) -> ARModel:
    overrides = _config_overrides(f)
    assert overrides == dict(  # the size the brief fixes, dropouts off (class dropout only adds the null row)
        vocab_size=16, num_classes=10, grid_size=8, dim=64, n_layer=2, n_head=2, resid_dropout=0.0,
        ffn_dropout=0.0, token_dropout=0.0, class_dropout=0.1, rope_base=10000.0, norm_eps=1e-5,
    )
    model = build_model("ar", "debug", **overrides)
    model.load_state_dict(from_official(f["checkpoint"]["model"], model.config), strict=True)
    return model.eval()


def test_official_arch_reads_the_fixture_shapes(official):
    state = official["checkpoint"]["model"]  # train_c2i.py's container key
    assert official_arch(state) == dict(dim=64, n_layer=2, vocab_size=16, num_classes=10)
    assert state["cls_embedding.embedding_table.weight"].shape == (11, 64)  # num_classes + the null row
    with pytest.raises(ValueError, match="c2i"):
        official_arch({k: v for k, v in state.items() if not k.startswith("cls_embedding.")})


def test_official_state_dict_has_raygen_names_and_shapes(official):
    model = build_model("ar", "debug", **_config_overrides(official))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in official["checkpoint"]["model"].items()}
    assert ours == theirs  # no renaming needed; freqs_cis is in neither


def test_from_official_drops_non_weights_and_keeps_unknown_keys(official):
    state = dict(official["checkpoint"]["model"])
    model = build_model("ar", "debug", **_config_overrides(official))
    extra = {
        "freqs_cis": torch.zeros(65, 16, 2),
        "layers.0.attention.kv_cache.k_cache": torch.zeros(3, 2, 72, 32),  # after setup_caches
        "layers.1.attention.kv_cache.v_cache": torch.zeros(3, 2, 72, 32),
    }
    converted = from_official({**state, **extra}, model.config)
    assert converted.keys() == state.keys() and all(converted[k] is state[k] for k in state)
    with pytest.raises(RuntimeError, match="cls_embedding.cap_proj.fc1.weight"):
        stray = {**state, "cls_embedding.cap_proj.fc1.weight": torch.zeros(1)}
        model.load_state_dict(from_official(stray, model.config), strict=True)


def test_uncached_logits_match_the_official_training_forward(official):
    model = _loaded(official)
    tokens, labels, want = official["tokens"], official["labels"], official["logits"]  # (3, 64), (3,), (3, 64, 16)
    got = model.logits_uncached(tokens[:, :-1], labels=labels)  # (3, 64, 16): the official input
    torch.testing.assert_close(got, want, **TOL)
    full = model.logits_uncached(tokens, labels=labels)  # (3, 65, 16): one more row, predicting nothing
    torch.testing.assert_close(full[:, :-1], want, **TOL)


def test_cached_logits_match_the_official_generation_path(official):
    model = _loaded(official)
    tokens, labels = official["tokens"], official["labels"]
    got = model.logits_cached(tokens[:, :-1], labels=labels)  # (3, 64, 16)
    torch.testing.assert_close(got, official["logits_cached"], **TOL)
    torch.testing.assert_close(got, official["logits"], **CROSS)


def test_training_loss_matches_the_official_loss(official):
    model = _loaded(official)
    batch = {"tokens": official["tokens"], "label": official["labels"]}
    with torch.no_grad():
        out = model(batch)  # eval mode: no dropout, no label dropout
    torch.testing.assert_close(out["loss"], official["loss"], **TOL)

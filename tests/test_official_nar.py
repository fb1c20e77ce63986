"""Family `nar` against the official NAR code: an official checkpoint loads strictly and gives its outputs.

`fixtures/nar_tiny_official.pt` holds numbers only: a tiny instance of NAR's own c2i GPT
(ThisisBillhe/NAR @ 225c1fb, NAR-images/autoregressive/models/gpt.py, weights re-drawn so the
heads are non-zero), its checkpoint container, fixed tokens/labels, the raw head logits and the
combined logits and loss of its training-path forward (eval mode), and its own generate()
teacher-forced on the same tokens, with and without CFG. `fixtures/make_nar_official.py`
re-makes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raygen.models import build_model
from raygen.models.nar import NARModel, from_official, official_arch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURES / "nar_tiny_official.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(fixture: dict) -> NARModel:
    c = fixture["config"]
    model = build_model(
        "nar", "debug", vocab_size=c["vocab_size"], num_classes=c["num_classes"], grid_size=int(c["block_size"] ** 0.5),
        dim=c["dim"], n_layer=c["n_layer"], n_head=c["n_head"], resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0,
    )
    model.load_state_dict(from_official(fixture["checkpoint"]["model"], model.config))  # strict
    return model.eval()


def test_fixture_is_the_tiny_official_model(fixture: dict, model: NARModel):
    c = fixture["config"]
    sizes = (c["vocab_size"], c["num_classes"], c["block_size"], c["dim"], c["n_layer"], c["n_head"])
    assert sizes == (16, 10, 64, 64, 2, 2)
    assert model.config.grid_size == 8 and len(model.layers) == 3  # 2 backbone blocks + the vertical head's
    assert fixture["labels"].tolist() == [1, 7, 10]  # 10: the null class row


def test_official_arch_reads_the_shapes(fixture: dict):
    arch = official_arch(fixture["checkpoint"]["model"])
    assert arch == {"dim": 64, "n_layer": 2, "vocab_size": 16, "num_classes": 10}


def test_official_arch_of_a_paper_size():
    with torch.device("meta"):
        model = build_model("nar", "B", vocab_size=16384, num_classes=1000)
    assert official_arch(model.state_dict()) == {"dim": 768, "n_layer": 12, "vocab_size": 16384, "num_classes": 1000}


def test_from_official_drops_tables_and_caches_and_keeps_unknown_keys(fixture: dict, model: NARModel):
    state = dict(fixture["checkpoint"]["model"])
    extras = {
        "freqs_cis": torch.zeros(65, 16, 2),
        "proximity_mask": torch.ones(3, 72, 72, dtype=torch.bool),
        "layers.0.attention.kv_cache.k_cache": torch.zeros(3, 2, 72, 32),
        "layers.2.attention.kv_cache.v_cache": torch.zeros(3, 2, 72, 32),
    }
    converted = from_official({**state, **extras}, model.config)
    assert list(converted) == list(state) and all(converted[k] is state[k] for k in state)
    unknown = from_official({**state, "cls_embedding.uncond_embedding": torch.zeros(120, 8)}, model.config)
    with pytest.raises(RuntimeError, match="cls_embedding.uncond_embedding"):
        model.load_state_dict(unknown)


def test_heads_match_the_official_forward(fixture: dict, model: NARModel):
    tokens, labels = fixture["tokens"], fixture["labels"]
    with torch.no_grad():
        h = model._embed(tokens, labels=labels, train=False)  # (B, N + 1, D)
        logits_r, logits_b = model._heads(h, freqs=model.freqs_cis, mask=model.attn_mask)  # (B, N + 1, V) each
        loss = model({"tokens": tokens, "label": labels})["loss"]  # eval mode: no label dropout
    assert logits_r.abs().mean() > 0.5 and logits_b.abs().mean() > 0.5  # informative, not zero heads
    torch.testing.assert_close(logits_r, fixture["logits_r"], **TOL)
    torch.testing.assert_close(logits_b, fixture["logits_b"], **TOL)
    torch.testing.assert_close(model.logits_uncached(tokens, labels=labels), fixture["logits"], **TOL)
    torch.testing.assert_close(loss, fixture["loss"], **TOL)


def test_cached_sampler_matches_the_official_generate(fixture: dict, model: NARModel):
    tokens, labels, c = fixture["tokens"], fixture["labels"], fixture["config"]
    plain = model.logits_cached(tokens, labels=labels)
    assert model.last_forward_passes == fixture["sample_steps"] == 2 * 8 - 1
    torch.testing.assert_close(plain, fixture["sample_logits"], **TOL)
    guided = model.logits_cached(tokens, labels=labels, cfg_scale=c["cfg_scale"], cfg_interval=c["cfg_interval"])
    # 4x guidance scales the cached path's roundoff (~6e-6 unguided) up to ~3e-5
    torch.testing.assert_close(guided, fixture["sample_logits_cfg"], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(guided, plain, atol=1e-2)  # guidance did act

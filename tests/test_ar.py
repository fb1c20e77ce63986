"""Family `ar` (LlamaGen raster GPT) and the model registry: sizes, training contract, sampling."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from raygen.models import MODEL_REGISTRY, PAPER_PARAMS, build_model, model_config, register_family
from raygen.models.ar import AR_FAMILY, AR_SIZES, ARConfig, ARModel
from raygen.models.base import FamilySpec, TrainableModel
from raygen.models.sampling import cfg_mix, sample_logits

# A small model whose uncached reference loop stays cheap: 36 tokens, 64 ids, 10 classes.
SMALL = dict(vocab_size=64, grid_size=6, num_classes=10)


def _model(seed: int = 0, head_std: float = 0.3, **overrides) -> ARModel:
    """debug-size model in eval mode with a random (non-zero) head, so logits are informative."""
    torch.manual_seed(seed)
    model = build_model("ar", "debug", **{**SMALL, **overrides}).eval()
    with torch.no_grad():
        model.output.weight.normal_(0.0, head_std)
    return model


def _batch(config: ARConfig, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, config.vocab_size, (batch_size, config.seq_len), generator=g, dtype=torch.int32),
        "label": torch.randint(0, config.num_classes, (batch_size,), generator=g),
    }


# --- registry and sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(PAPER_PARAMS))
def test_paper_sizes_have_llamagen_parameter_counts(key):
    family, size = key
    with torch.device("meta"):
        model = build_model(family, size)
    n = model.num_params()
    assert abs(n - PAPER_PARAMS[key]) <= 0.03 * PAPER_PARAMS[key]
    if family not in ("ctf", "d2it"):  # exact counts of the official classes; these two: the papers' rounded figures
        assert n == PAPER_PARAMS[key]
    assert all(p.is_meta for p in model.parameters())  # nothing materialised (emigm has no `output`)


def test_every_registered_size_builds_on_meta():
    for family, spec in MODEL_REGISTRY.items():
        assert "debug" in {s.lower() for s in spec.sizes}
        for size in spec.sizes:
            with torch.device("meta"):
                model = build_model(family, size)
            assert isinstance(model, TrainableModel) and model.num_params() > 0


def test_size_names_are_case_insensitive():
    assert model_config("ar", "xl") == model_config("ar", "XL") == model_config("AR", "Xl") == AR_SIZES["XL"]
    assert model_config("ar", "DEBUG") == AR_SIZES["debug"]
    cfg = model_config("ar", "debug", dim=64)
    assert cfg.dim == 64 and AR_SIZES["debug"].dim == 128  # a copy: the sizes dict is untouched


def test_unknown_family_size_or_field_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model family 'gpt'; known: .*ar"):
        model_config("gpt", "B")
    with pytest.raises(ValueError, match=r"unknown size 'M'.*known: debug, B, L, XL, XXL"):
        model_config("ar", "M")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['width'\].*valid: .*dim.*n_layer"):
        build_model("ar", "debug", width=3)


def test_register_family_rejects_duplicates_and_missing_debug():
    with pytest.raises(ValueError, match="already registered"):
        register_family(AR_FAMILY)
    no_debug = FamilySpec(family="nodebug", model_cls=ARModel, config_cls=ARConfig, sizes={"B": ARConfig()})
    with pytest.raises(ValueError, match="debug"):
        register_family(no_debug)
    twins = {"debug": ARConfig(), "Debug": ARConfig()}
    clash = FamilySpec(family="clash", model_cls=ARModel, config_cls=ARConfig, sizes=twins)
    with pytest.raises(ValueError, match="case"):
        register_family(clash)
    assert "nodebug" not in MODEL_REGISTRY and "clash" not in MODEL_REGISTRY


def test_config_validation_and_json():
    with pytest.raises(ValueError, match="divisible by n_head"):
        ARConfig(dim=100, n_head=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        ARConfig(dim=36, n_head=6)  # head_dim 6
    with pytest.raises(ValueError, match="positive"):
        ARConfig(n_layer=0)
    with pytest.raises(ValueError, match="positive"):
        ARConfig(vocab_size=0)
    with pytest.raises(ValueError, match="dropout"):
        ARConfig(class_dropout=1.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        model_config("ar", "debug", n_head=8, dim=48)  # overrides are validated too
    cfg = AR_SIZES["XXL"]
    assert ARConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_state_dict_uses_llamagen_names_and_skips_rope():
    model = build_model("ar", "debug", **SMALL)
    keys = set(model.state_dict())
    assert "freqs_cis" not in keys
    assert {
        "cls_embedding.embedding_table.weight",
        "tok_embeddings.weight",
        "layers.0.attention.wqkv.weight",
        "layers.3.feed_forward.w3.weight",
        "layers.3.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    } <= keys
    assert model.cls_embedding.embedding_table.weight.shape == (11, 128)  # + the null class


def test_rope_table_survives_casts_and_meta_materialisation():
    model = build_model("ar", "debug", **SMALL)
    table = model.freqs_cis.clone()
    assert model.to(torch.bfloat16).freqs_cis.dtype == torch.float32
    with torch.device("meta"):
        meta = build_model("ar", "debug", **SMALL)
    real = meta.to_empty(device="cpu")
    torch.testing.assert_close(real.freqs_cis, table)
    real.initialize_weights()
    assert torch.count_nonzero(real.output.weight) == 0
    assert 0.015 < real.tok_embeddings.weight.std().item() < 0.025
    assert torch.equal(real.norm.weight, torch.ones(128))


# --- training contract -----------------------------------------------------------------------


def test_forward_at_init_is_uniform_and_only_the_head_learns_first():
    torch.manual_seed(0)
    model = build_model("ar", "debug")  # vocab 16384, 16x16 grid
    batch = _batch(model.config, batch_size=2)
    out = model(batch)
    assert set(out) == {"loss", "acc"} and out["loss"].ndim == 0 and not out["acc"].requires_grad
    assert math.isclose(out["loss"].item(), math.log(16384), rel_tol=1e-6)  # zero head => uniform
    out["loss"].backward()
    assert model.output.weight.grad.abs().sum() > 0


def test_backward_reaches_every_parameter():
    model = _model().train()
    model.forward(_batch(model.config))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_forward_accepts_grids_and_checks_length():
    model = _model()
    batch = _batch(model.config)
    flat = model(batch)["loss"]
    grid = model({**batch, "tokens": batch["tokens"].reshape(4, 6, 6)})["loss"]
    torch.testing.assert_close(flat, grid)
    with pytest.raises(ValueError, match="36 tokens"):
        model({**batch, "tokens": batch["tokens"][:, :20]})


def test_class_dropout_follows_the_generator():
    no_dropout = dict(resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0)
    always = _model(class_dropout=1.0, **no_dropout).train()
    batch = _batch(always.config)
    other = {**batch, "label": (batch["label"] + 1) % 10}
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(always(batch, generator=g)["loss"], always(other, generator=g)["loss"])  # all null
    never = _model(class_dropout=0.0, **no_dropout).train()
    assert not torch.allclose(never(batch, generator=g)["loss"], never(other, generator=g)["loss"])
    half = _model(class_dropout=0.5, **no_dropout).train()
    big = _batch(half.config, batch_size=32)
    runs = [half(big, generator=torch.Generator().manual_seed(s))["loss"] for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_param_groups_split_by_ndim():
    model = build_model("ar", "debug", **SMALL)
    groups = model.param_groups(0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert all(p.ndim == 1 for p in groups[1]["params"])
    torch.optim.AdamW(groups, lr=1e-4)


def test_flops_per_sample_formula():
    model = build_model("ar", "debug", **SMALL)
    c = model.config
    embeddings = model.tok_embeddings.weight.numel() + model.cls_embedding.embedding_table.weight.numel()
    assert model.num_params(non_embedding=True) == model.num_params() - embeddings
    want = 6 * (model.num_params() - embeddings) * 36 + 12 * c.n_layer * c.dim * 36**2
    assert model.flops_per_sample() == want


def test_loss_falls_on_a_learnable_batch():
    torch.manual_seed(0)
    model = build_model("ar", "debug", vocab_size=16, grid_size=8, num_classes=10).train()
    labels = torch.arange(10)  # (10,)
    pos = torch.arange(64)
    tokens = (labels[:, None] * 5 + pos[None] * (labels[:, None] % 3 + 1)) % 16  # a function of the label
    batch = {"tokens": tokens.int(), "label": labels}
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=2e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = model(batch, generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isclose(losses[0], math.log(16), rel_tol=1e-5)
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0], losses[::10]


# --- sampling --------------------------------------------------------------------------------


def _greedy_uncached(model: ARModel, labels: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The reference: a full uncached pass per token, CFG on the last logits, argmax."""
    tokens = torch.empty(len(labels), 0, dtype=torch.long)
    null = torch.full_like(labels, model.config.num_classes)
    for _ in range(model.config.seq_len):
        logits = model.logits_uncached(tokens, labels=labels)[:, -1]
        if cfg_scale != 1.0:
            logits = cfg_mix(logits, model.logits_uncached(tokens, labels=null)[:, -1], cfg_scale)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens.reshape(len(labels), 6, 6)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cached_greedy_generation_equals_uncached(cfg_scale):
    model = _model(seed=1)
    labels = torch.tensor([0, 3, 7])
    got = model.generate(labels, cfg_scale=cfg_scale, temperature=0.0)
    assert got.shape == (3, 6, 6) and got.dtype == torch.int64
    assert torch.equal(got, _greedy_uncached(model, labels, cfg_scale))
    assert len(got.unique()) > 3  # a real sequence, not a constant


def test_cached_logits_match_uncached():
    model = _model(seed=2)
    batch = _batch(model.config, batch_size=3)
    tokens, labels = batch["tokens"][:, :-1], batch["label"]
    cached = model.logits_cached(tokens, labels=labels)
    uncached = model.logits_uncached(tokens, labels=labels)
    assert cached.shape == uncached.shape == (3, 36, 64)
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


def test_seeds_control_samples():
    model = _model(seed=3)
    labels = torch.tensor([1, 2, 3, 4])

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(labels, cfg_scale=1.5, temperature=1.0, generator=g, **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(5, top_k=8, top_p=0.9), sample(5, top_k=8, top_p=0.9))
    assert torch.equal(sample(0, top_k=1), model.generate(labels, cfg_scale=1.5, temperature=0.0))


def test_cfg_scale_one_is_the_conditional_sampler():
    model = _model(seed=4)
    labels = torch.tensor([2, 5])
    got = model.generate(labels, cfg_scale=1.0, temperature=1.0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    tokens = torch.empty(2, 0, dtype=torch.long)
    for _ in range(36):
        logits = model.logits_uncached(tokens, labels=labels)[:, -1]
        tokens = torch.cat([tokens, sample_logits(logits, generator=g)[:, None]], dim=1)
    assert torch.equal(got.reshape(2, 36), tokens)


def test_generate_restores_mode_and_checks_inputs():
    model = _model().train()
    out = model.generate([1, 2], temperature=0.0, steps=36)
    assert model.training and out.shape == (2, 6, 6) and int(out.max()) < 64
    model.eval()
    model.generate(torch.tensor([1]), temperature=0.0)
    assert not model.training
    with pytest.raises(ValueError, match="steps must be 36"):
        model.generate(torch.tensor([1]), steps=8)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\)"):
        model.generate(torch.tensor([10]))


def test_generate_under_bf16_autocast():
    model = _model(grid_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(torch.tensor([1, 2]), cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 2) and out.dtype == torch.int64

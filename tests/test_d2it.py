"""Family `d2it` (D2iT's Dynamic Content Transformer and Grain Transformer): unit tests, no Ray, tiny sizes.

D2iT has no public code, so there are no known answers from an official class; the tests pin
what the design states exactly: routing invariances, the grain loss's masking, adaLN-Zero,
the null class, CFG at scale 1, reproducible sampling, and DiT's parameter layout.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raygen.models.registry import PAPER_PARAMS
from raygen.models.d2it import (
    D2IT_FAMILY,
    D2IT_SIZES,
    DIT_PARAMS,
    ContentTransformer,
    D2iT,
    D2iTConfig,
    DiTBlock,
    cells_to_fine,
    sincos_2d,
)
from raygen.models.diffusion import Guidance, diffusion_loss

G, C = 4, 2  # a 4x4 coarse grid (N = 16) and an 8x8 fine grid (F = 64) of 2-channel latents
N, FN = G * G, 4 * G * G
TINY = dict(grid_size=G, token_dim=C, num_classes=10, dim=32, depth=2, n_head=2, refine_depth=1,
            refine_dim=16, refine_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest here


def _model(seed: int = 0, *, randomize: bool = True, **overrides) -> ContentTransformer:
    """A tiny model; randomize fills the zero-initialised (adaLN-Zero) weights so outputs depend on inputs."""
    torch.manual_seed(seed)
    model = ContentTransformer(dataclasses.replace(D2IT_SIZES["debug"], **{**TINY, **overrides}))
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0.0, 0.1)
    return model


def _batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grain = (torch.rand(b, N, generator=g) < 0.5).to(torch.uint8)
    grain[:, 0], grain[:, 1] = 0, 1  # both grains in every sample
    return {"latents": torch.randn(b, N, C, generator=g), "fine": torch.randn(b, FN, C, generator=g),
            "grain": grain, "label": torch.randint(0, 10, (b,), generator=g)}


def _loss(model: ContentTransformer, batch: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    return model(batch, generator=torch.Generator().manual_seed(seed))


def _off_grain(batch: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    """The batch with every unrepresented value replaced: x_c of fine cells, x_f of coarse cells."""
    g = torch.Generator().manual_seed(seed)
    fine = batch["grain"].bool()
    lat = torch.where(fine[..., None], 100 * torch.randn(batch["latents"].shape, generator=g), batch["latents"])
    fine_pos = cells_to_fine(fine, G)[..., None]
    fin = torch.where(fine_pos, batch["fine"], -100 * torch.randn(batch["fine"].shape, generator=g))
    return {**batch, "latents": lat, "fine": fin}


# --- routing ---------------------------------------------------------------------------------------


def test_routing_shapes_and_each_token_reads_only_its_grain():
    model = _model().eval()
    batch = _batch()
    fine = batch["grain"].bool()
    with torch.no_grad():
        tok = model.route_in(batch["latents"], batch["fine"], fine)
        assert tok.shape == (3, N, 32)
        other = _off_grain(batch)
        assert torch.equal(model.route_in(other["latents"], other["fine"], fine), tok)  # exact invariance
        # changing a cell's own latents changes that token only: coarse cell 0, fine cell 1 (sample 0)
        lat, fin = batch["latents"].clone(), batch["fine"].clone()
        lat[0, 0] += 1.0
        fin[0, 2 * G + 3] += 1.0  # fine position (row 1, col 3) lies in cell (0, 1)
        moved = (model.route_in(lat, fin, fine) != tok).any(dim=-1)  # (B, N)
    expect = torch.zeros(3, N, dtype=torch.bool)
    expect[0, :2] = True
    assert torch.equal(moved, expect)


def test_predict_shapes_and_zero_init():
    model = _model(randomize=False).eval()
    b = _batch()
    args = (b["latents"], b["fine"], b["grain"].bool(), torch.tensor([0, 500, 999]), b["label"])
    with torch.no_grad():
        out_c, out_f = model.predict(*args)
        assert out_c.shape == (3, N, 2 * C) and out_f.shape == (3, FN, 2 * C)
        assert out_c.dtype == out_f.dtype == torch.float32
        assert torch.count_nonzero(out_c) == 0 and torch.count_nonzero(out_f) == 0  # adaLN-Zero heads
        # the RefineNet correction alone is zero: with a live coarse head, fine = nearest-upsample(coarse)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
        torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.1)
        out_c, out_f = model.predict(*args)
    up = out_c.reshape(3, G, 1, G, 1, 2 * C).expand(3, G, 2, G, 2, 2 * C).reshape(3, FN, 2 * C)
    assert torch.count_nonzero(out_c) > 0 and torch.equal(out_f, up)
    block = model.blocks[0]
    assert isinstance(block, DiTBlock)
    x, cond = torch.randn(2, N, 32), torch.randn(2, 32)
    assert torch.equal(block(x, cond), x)  # a zero-gated block is the identity


def test_sincos_table_is_dits_layout():
    table = sincos_2d(3, 8)  # (9, 8): [sin col, cos col] (2 freqs each) then [sin row, cos row]
    row, col = 1, 2
    w = torch.tensor([1.0, 0.01])  # 10000^(-i/2), i = 0, 1
    want = torch.cat([torch.sin(col * w), torch.cos(col * w), torch.sin(row * w), torch.cos(row * w)])
    torch.testing.assert_close(table[row * 3 + col], want)


# --- the grain loss ---------------------------------------------------------------------------------


def test_loss_ignores_unrepresented_latents_and_matches_its_definition():
    model = _model().train()
    batch = _batch()
    out = _loss(model, batch)
    assert set(out) == {"loss", "loss_coarse", "loss_fine", "fine_frac"}
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    moved = _loss(model, _off_grain(batch))
    for key in out:  # fixed generator: bit-identical when only unrepresented values change
        assert torch.equal(moved[key], out[key]), key
    # recompute from the documented draws: k, eps_c, eps_f, label dropout
    g = torch.Generator().manual_seed(1)
    sched = model.schedule
    k = sched.sample_steps(3, generator=g)
    eps_c, eps_f = torch.randn(3, N, C, generator=g), torch.randn(3, FN, C, generator=g)
    y = model.y_embedder.token_drop(batch["label"], g)
    xc_t, xf_t = sched.q_sample(batch["latents"], k, eps_c), sched.q_sample(batch["fine"], k, eps_f)
    fine = batch["grain"].bool()
    with torch.no_grad():
        out_c, out_f = model.predict(xc_t, xf_t, fine, k, y)
    t = lambda a: a.transpose(1, 2)  # noqa: E731 - (B, L, C) -> (B, C, L)
    lc = t(diffusion_loss(sched, t(out_c), x0=t(batch["latents"]), x_t=t(xc_t), k=k, noise=t(eps_c))["loss"])
    lf = t(diffusion_loss(sched, t(out_f), x0=t(batch["fine"]), x_t=t(xf_t), k=k, noise=t(eps_f))["loss"])
    torch.testing.assert_close(out["loss_coarse"], lc[~fine].mean())  # each grain averaged on its own
    torch.testing.assert_close(out["loss_fine"], lf[cells_to_fine(fine, G)].mean())
    torch.testing.assert_close(out["loss"], out["loss_coarse"] + out["loss_fine"])
    torch.testing.assert_close(out["fine_frac"], fine.float().mean())


def test_fine_weight_and_single_grain_batches():
    batch = _batch()
    base = _loss(_model().train(), batch)
    weighted = _loss(_model(fine_loss_weight=0.25).train(), batch)
    torch.testing.assert_close(weighted["loss"], base["loss_coarse"] + 0.25 * base["loss_fine"])
    model = _model().train()
    for value, empty in ((0, "loss_fine"), (1, "loss_coarse")):
        out = _loss(model, {**batch, "grain": torch.full((3, N), value, dtype=torch.uint8)})
        assert out[empty] == 0 and torch.isfinite(out["loss"]) and out["fine_frac"] == value
        out["loss"].backward()  # the empty grain's path is still in the graph (no unused parameters)
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)


def test_class_dropout_uses_the_null_class():
    batch = _batch()
    model = _model().train()
    model.y_embedder.dropout_prob = 1.0  # every label dropped
    dropped = _loss(model, batch)
    model.y_embedder.dropout_prob = 0.0  # the dropout draw is the last one: earlier draws are the same
    null = _loss(model, {**batch, "label": torch.full((3,), model.y_embedder.null_id)})
    assert torch.equal(dropped["loss"], null["loss"])
    assert model.y_embedder.embedding_table.num_embeddings == 11  # 10 classes + the null row


def test_backward_reaches_every_parameter():
    model = _model().train()
    _loss(model, _batch(b=4))["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --- guidance and sampling ---------------------------------------------------------------------------


def test_cfg_scale_one_is_the_conditional_prediction_and_guidance_mixes_with_the_null_class():
    model = _model().eval()
    b = _batch()
    labels, fine = b["label"], b["grain"].bool()
    x = torch.randn(3, C, 5 * N)  # [coarse | fine] on the last axis
    split = lambda v: (v[..., :N].transpose(1, 2), v[..., N:].transpose(1, 2))  # noqa: E731
    with torch.no_grad():
        cond_c, cond_f = model.predict(*split(x), fine, torch.full((3,), 400), labels)
        unc_c, unc_f = model.predict(*split(x), fine, torch.full((3,), 400), torch.full((3,), 10))
        eps1, v1 = model.denoiser(labels, fine, Guidance(1.0))(x, 400)
        eps3, v3 = model.denoiser(labels, fine, Guidance(3.0))(x, 400)
    want = torch.cat([cond_c, cond_f], dim=1).transpose(1, 2)  # (B, 2C, N + F)
    assert torch.equal(eps1, want[:, :C]) and torch.equal(v1, want[:, C:])
    want_u = torch.cat([unc_c, unc_f], dim=1).transpose(1, 2)
    torch.testing.assert_close(eps3, want_u[:, :C] + 3.0 * (want[:, :C] - want_u[:, :C]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v3, want[:, C:], atol=1e-5, rtol=1e-5)  # variance: the conditional half


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generate_shapes_finite_and_reproducible(sampler):
    model = _model()
    grain = _batch()["grain"].reshape(3, G, G)
    run = lambda seed: model.generate([1, 2, 3], grain=grain, steps=4, cfg_scale=2.0, sampler=sampler,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    out = run(0)
    assert out["latents"].shape == (3, N, C) and out["fine"].shape == (3, FN, C)
    assert torch.isfinite(out["latents"]).all() and torch.isfinite(out["fine"]).all()
    fine = grain.reshape(3, N).bool()
    assert torch.equal(out["grain"], fine.to(torch.uint8))
    assert (out["latents"][fine] == 0).all() and (out["latents"][~fine] != 0).all()  # unrepresented -> 0
    fine_pos = cells_to_fine(fine, G)
    assert (out["fine"][~fine_pos] == 0).all() and (out["fine"][fine_pos] != 0).all()
    assert model.last_sampling == {"nfe": 4, "passes": 8}  # guided: doubled batch at each step
    again = run(0)
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(run(1)["latents"], out["latents"])
    assert model.training  # train mode restored


def test_generate_needs_a_grain_map_and_rejects_token_knobs():
    model = _model()
    with pytest.raises(ValueError, match="grain"):
        model.generate([1], steps=2)
    with pytest.raises(ValueError, match="top_k"):
        model.generate([1], grain=torch.zeros(1, G, G), steps=2, top_k=5)
    with pytest.raises(ValueError, match="0 \\(coarse\\) or 1"):
        model.generate([1], grain=torch.full((1, G, G), 2), steps=2)


# --- sizes -------------------------------------------------------------------------------------------


def _count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("size", ["L", "XL"])
def test_paper_sizes_within_3_percent_and_dit_trunk_is_dits(size):
    with torch.device("meta"):
        model = D2IT_FAMILY.model_cls(D2IT_FAMILY.sizes[size])
    assert abs(model.num_params() / PAPER_PARAMS[("d2it", size)] - 1) < 0.03  # DCT + the 3.7M DGT
    assert abs(model.dct.num_params() / PAPER_PARAMS[("d2it", size)] - 1) < 0.03  # the DCT alone
    model = model.dct
    d = model.config.dim
    # DiT-*/2 minus what D2iT replaces: the patch embedding Conv(4 -> D, 2x2), the frozen (256, D)
    # pos_embed, and the final Linear(D -> 2*2*2*4); every other tensor is DiT's, name and shape.
    trunk = DIT_PARAMS[size] - (16 * d + d) - 256 * d - (32 * d + 32)
    assert _count(model.t_embedder, model.y_embedder, model.blocks, model.final_layer.adaLN_modulation) == trunk
    names = {k for k in model.state_dict() if k.startswith("blocks.0.")}
    assert names == {f"blocks.0.{k}.{w}" for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
                                                    "adaLN_modulation.1") for w in ("weight", "bias")}


def test_sizes_and_config_checks():
    assert set(D2IT_SIZES) == {"debug", "B", "L", "XL"} and D2IT_FAMILY.family == "d2it"
    xl = D2IT_SIZES["XL"]
    assert (xl.refine_width, xl.refine_n_head, xl.n_layer) == (576, 8, 30)
    assert D2IT_SIZES["B"].n_layer == 12  # 10 DiT + 2 RefineNet
    with pytest.raises(ValueError):
        D2iTConfig(noise_schedule="sqrt")
    with pytest.raises(ValueError):
        D2iTConfig(dim=100, n_head=16)
    assert _model(randomize=False).flops_per_sample() > 0


# --- the pair: grain transformer + content transformer ---------------------------------------------


def _pair(seed: int = 0) -> D2iT:
    torch.manual_seed(seed)
    model = D2iT(dataclasses.replace(D2IT_SIZES["debug"], **TINY, grain_dim=16, grain_depth=1, grain_heads=2))
    with torch.no_grad():
        for p in model.dct.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.1)
    return model


def test_the_pair_loss_is_the_sum_of_its_parts_each_gradient_its_own():
    model = _pair().train()
    batch = _batch()
    out = model(batch, generator=torch.Generator().manual_seed(1))
    dct = model.dct(batch, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out["loss_coarse"], dct["loss_coarse"]) and torch.allclose(out["loss_fine"], dct["loss_fine"])
    # the DGT is the ar model on the grain map: its loss is the cross-entropy of the map's ids
    model.eval()
    out = model(batch, generator=torch.Generator().manual_seed(1))
    logits = model.dgt.logits_uncached(batch["grain"][:, :-1].long(), labels=batch["label"])  # (B, N, 2)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), batch["grain"].long().reshape(-1))
    assert torch.allclose(out["grain_loss"], ce, atol=1e-6)
    assert torch.allclose(out["loss"], model.dct(batch, generator=torch.Generator().manual_seed(1))["loss"] + ce,
                          atol=1e-6)
    model.zero_grad()
    model.dgt({"tokens": batch["grain"].long(), "label": batch["label"]})["loss"].backward()
    assert all(p.grad is None for p in model.dct.parameters())  # disjoint: the grain loss never reaches the DCT


def test_the_three_grain_map_sources_are_plumbed():
    model = _pair().eval()
    labels = torch.tensor([0, 3])
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    given = torch.tensor([[[1, 0, 0, 0]] * G, [[0] * G] * G])  # (2, G, G)
    out = model.generate(labels, grain=given, steps=3, generator=g())
    assert torch.equal(out["grain"].reshape(2, G, G), given.to(torch.uint8))
    assert model.last_sampling["grain_passes"] == 0 and model.last_sampling["nfe"] == 3
    # predicted: the DGT's own sampler, from the same generator first
    pred = model.generate(labels, steps=3, generator=g(), grain_cfg_scale=2.0)
    expect = model.dgt.generate(labels, cfg_scale=2.0, generator=g())
    assert torch.equal(pred["grain"].reshape(2, G, G), expect.to(torch.uint8)) and model.last_sampling["grain_passes"] == N
    # random: Bernoulli(random_fine_ratio) per cell
    rand = model.generate(torch.zeros(64, dtype=torch.long), steps=1, generator=g(), grain_source="random",
                          random_fine_ratio=0.25)
    assert abs(rand["grain"].float().mean().item() - 0.25) < 0.05
    assert torch.equal(rand["grain"], model.generate(torch.zeros(64, dtype=torch.long), steps=1, generator=g(),
                                                     grain_source="random", random_fine_ratio=0.25)["grain"])
    # the content follows the grain map: unrepresented values are zero
    fine_pos = cells_to_fine(pred["grain"].bool(), G)
    assert (pred["fine"][~fine_pos] == 0).all() and (pred["latents"][pred["grain"].bool()] == 0).all()
    with pytest.raises(ValueError, match="grain source"):
        model.generate(labels, steps=1, generator=g(), grain_source="data")

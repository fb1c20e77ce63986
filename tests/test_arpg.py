"""Family `arpg` (ARPG: random-order guided decoding): sizes, masking, cached parallel sampling, editing."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from raygen.models import PAPER_PARAMS, build_model, model_config
from raygen.models.arpg import ARPG_SIZES, ORDERS, ARPGConfig, ARPGModel, generation_order, step_sizes
from raygen.models.sampling import cfg_mix, sample_logits

# 16 tokens, 64 ids, 10 classes: uncached reference loops stay cheap.
SMALL = dict(vocab_size=64, grid_size=4, num_classes=10)
N = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: with other processes on a 2-core box, 2 intra-op threads spin-wait
    each other (~50x slower); one thread is fastest. Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0, head_std: float = 0.3, **overrides) -> ARPGModel:
    """debug-size model in eval mode with a random (non-zero) head, so logits are informative."""
    torch.manual_seed(seed)
    model = build_model("arpg", "debug", **{**SMALL, **overrides}).eval()
    with torch.no_grad():
        model.output.weight.normal_(0.0, head_std)
    return model


def _batch(config: ARPGConfig, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, config.vocab_size, (batch_size, config.seq_len), generator=g, dtype=torch.int32),
        "label": torch.randint(0, config.num_classes, (batch_size,), generator=g),
    }


def _count_pass1_calls(model: ARPGModel) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Batch sizes of every call of the first pass-1 block (one call per network forward)."""
    calls: list[int] = []
    handle = model.self_layers[0].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls, handle


# --- sizes, config, state dict ---------------------------------------------------------------


@pytest.mark.parametrize("size", ["L", "XL", "XXL"])
def test_paper_sizes_have_the_official_parameter_counts(size):
    with torch.device("meta"):
        model = build_model("arpg", size)
    c = model.config
    assert (c.n_pass1, c.n_pass2) == {"L": (12, 12), "XL": (18, 18), "XXL": (24, 24)}[size]
    n = model.num_params()
    assert abs(n - PAPER_PARAMS[("arpg", size)]) <= 0.03 * PAPER_PARAMS[("arpg", size)]
    assert n == {"L": 319_845_376, "XL": 718_997_760, "XXL": 1_302_449_664}[size]
    assert model.embeddings.weight.shape[0] == 16384 + 1 + 1000 + 1 + 1


def test_config_validation_json_and_split():
    with pytest.raises(ValueError, match="divisible by n_head"):
        ARPGConfig(dim=100, n_head=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        ARPGConfig(dim=36, n_head=6)
    with pytest.raises(ValueError, match="n_cross_layer"):
        ARPGConfig(n_layer=4, n_cross_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        ARPGConfig(class_dropout=-0.1)
    cfg = model_config("arpg", "debug", n_layer=6, n_cross_layer=4)
    assert (cfg.n_pass1, cfg.n_pass2) == (2, 4)
    assert model_config("arpg", "xl") == ARPG_SIZES["XL"]
    for c in (ARPG_SIZES["XXL"], cfg):
        assert ARPGConfig(**json.loads(json.dumps(dataclasses.asdict(c)))) == c


def test_state_dict_layout_and_zero_init_head():
    model = build_model("arpg", "debug", **SMALL)
    keys = set(model.state_dict())
    assert "freqs_cis" not in keys
    assert {
        "embeddings.weight",
        "self_layers.1.attention.wqkv.weight",
        "kv_norm.weight",
        "to_k.weight",
        "to_v.weight",
        "cross_layers.1.attention.wq.weight",
        "cross_layers.1.attention.wo.weight",
        "cross_layers.1.feed_forward.w2.weight",
        "norm.weight",
        "output.weight",
    } <= keys
    assert not any("cross_layers" in k and ("wqkv" in k or "wk" in k or "wv" in k) for k in keys)
    assert model.embeddings.weight.shape == (64 + 1 + 10 + 1 + 1, 128)
    assert (model.mask_id, model.null_id) == (64, 64 + 1 + 10)
    assert torch.count_nonzero(model.output.weight) == 0
    assert model.to(torch.bfloat16).freqs_cis.dtype == torch.float32


def test_flops_and_param_groups():
    model = build_model("arpg", "debug", **SMALL)
    c = model.config
    assert model.num_params(non_embedding=True) == model.num_params() - model.embeddings.weight.numel()
    want = 6 * model.num_params(non_embedding=True) * N + 12 * c.n_layer * c.dim * N**2
    assert model.flops_per_sample() == want
    groups = model.param_groups(0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# --- training contract -----------------------------------------------------------------------


def test_loss_is_log_vocab_at_init_and_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_model("arpg", "debug")  # vocab 16384, 16x16 grid
    out = model(_batch(model.config, batch_size=2), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "acc"} and not out["acc"].requires_grad
    assert math.isclose(out["loss"].item(), math.log(16384), rel_tol=1e-6)  # zero head => uniform
    small = _model().train()
    small(_batch(small.config))["loss"].backward()
    assert [n for n, p in small.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


def test_query_i_sees_only_the_tokens_before_it_in_its_order():
    model = _model(seed=1)
    batch = _batch(model.config, batch_size=2)
    tokens, labels = batch["tokens"].long(), batch["label"]
    order = generation_order("random", 4, torch.Generator().manual_seed(3))
    base = model.teacher_forced_logits(tokens, labels=labels, order=order)  # (B, N, V)
    for j in (0, 5, 14):
        bumped = tokens.clone()
        bumped[:, order[j]] = (bumped[:, order[j]] + 1) % 64  # the token at order position j
        got = model.teacher_forced_logits(bumped, labels=labels, order=order)
        torch.testing.assert_close(got[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-6)
        assert (got[:, j + 1 :] - base[:, j + 1 :]).abs().amax() > 1e-4
    bumped = tokens.clone()
    bumped[:, order[-1]] = (bumped[:, order[-1]] + 1) % 64  # the last token is never an input
    torch.testing.assert_close(model.teacher_forced_logits(bumped, labels=labels, order=order), base)


def test_forward_permutes_with_the_generator_and_drops_labels():
    no_dropout = dict(resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0)
    model = _model(class_dropout=0.0, **no_dropout).train()
    batch = _batch(model.config)
    runs = [model(batch, generator=torch.Generator().manual_seed(s))["loss"] for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    grid = {**batch, "tokens": batch["tokens"].reshape(4, 4, 4)}
    torch.testing.assert_close(model(grid, generator=torch.Generator().manual_seed(1))["loss"], runs[0])
    always = _model(class_dropout=1.0, **no_dropout).train()
    other = {**batch, "label": (batch["label"] + 1) % 10}
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(always(batch, generator=g1)["loss"], always(other, generator=g2)["loss"])
    with pytest.raises(ValueError, match="16 tokens"):
        model({**batch, "tokens": batch["tokens"][:, :9]})


def test_loss_falls_on_a_learnable_batch():
    torch.manual_seed(0)
    model = build_model("arpg", "debug", vocab_size=16, grid_size=4, num_classes=10).train()
    labels = torch.arange(10)
    pos = torch.arange(16)
    tokens = (labels[:, None] * 5 + pos[None] // 8) % 16  # a function of the label and the half (top/bottom)
    batch = {"tokens": tokens.int(), "label": labels}
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=2e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        loss = model(batch, generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isclose(losses[0], math.log(16), rel_tol=1e-5)
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0], losses[::10]


# --- schedules and orders --------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["arccos", "cosine"])
@pytest.mark.parametrize("n", [1, 16, 37, 256])
def test_step_sizes_cover_every_token_once(schedule, n):
    for steps in range(1, n + 1):
        sizes = step_sizes(n, steps, schedule)
        assert len(sizes) == steps and sum(sizes) == n and min(sizes) >= 1, (steps, sizes)
    assert step_sizes(n, n, schedule) == [1] * n
    assert step_sizes(n, n + 5, schedule) == [1] * n  # clamped
    assert step_sizes(0, 8, schedule) == []


def test_step_sizes_follow_the_official_schedules():
    arccos = step_sizes(256, 64, "arccos")
    assert arccos[0] == 256 - int(256 * math.acos(1 / 64) / (math.pi / 2))
    assert arccos[-1] > arccos[0]  # arccos reveals few tokens first, many at the end
    cosine = step_sizes(256, 64, "cosine")
    assert cosine[0] == 256 - int(256 * math.cos(math.pi / 2 / 64))
    with pytest.raises(ValueError, match="schedule"):
        step_sizes(16, 4, "linear")


@pytest.mark.parametrize("name", ORDERS)
def test_generation_orders_are_permutations(name):
    for grid in (1, 2, 3, 4, 5, 16):
        order = generation_order(name, grid, torch.Generator().manual_seed(0))
        assert order.dtype == torch.int64 and torch.equal(order.sort().values, torch.arange(grid * grid))


def test_generation_orders_mean_what_they_say():
    assert generation_order("raster", 3).tolist() == list(range(9))
    assert generation_order("spiral-in", 3).tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert generation_order("spiral-out", 3).tolist() == [4, 3, 6, 7, 8, 5, 2, 1, 0]
    assert generation_order("z-curve", 4).tolist()[:8] == [0, 1, 4, 5, 2, 3, 6, 7]
    assert generation_order("alternate", 3).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    r = [generation_order("random", 4, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(r[0], r[1]) and not torch.equal(r[0], r[2])
    with pytest.raises(ValueError, match="unknown generation order"):
        generation_order("hilbert", 4)


# --- sampling --------------------------------------------------------------------------------


def _cfg(logits_fn, tokens, labels, i, cfg_scale, cfg_schedule):
    logits = logits_fn(tokens, labels)[:, i]
    if cfg_scale != 1.0:
        scale = 1 + (cfg_scale - 1) * (i + 1) / N if cfg_schedule == "linear" else cfg_scale
        logits = cfg_mix(logits, logits_fn(tokens, torch.full_like(labels, 10))[:, i], scale)
    return logits


@pytest.mark.parametrize(
    "cfg_scale,cfg_schedule,order,class_rope",
    [(1.0, "linear", "raster", "zero"), (2.0, "linear", "raster", "zero"), (2.0, "constant", "z-curve", "zero"),
     (2.0, "linear", "raster", "origin")],
)
def test_one_token_per_step_equals_uncached_greedy(cfg_scale, cfg_schedule, order, class_rope):
    model = _model(seed=2, class_rope=class_rope)
    labels = torch.tensor([0, 3, 7])
    got = model.generate(labels, cfg_scale=cfg_scale, steps=N, temperature=0.0, order=order, cfg_schedule=cfg_schedule)
    assert got.shape == (3, 4, 4) and got.dtype == torch.int64 and model.last_forward_passes == N
    perm = generation_order(order, 4)
    tokens = torch.zeros(3, N, dtype=torch.long)  # raster layout; unknown entries never seen (causal)
    logits_fn = lambda t, lab: model.teacher_forced_logits(t, labels=lab, order=perm)  # noqa: E731
    for i in range(N):
        tokens[:, perm[i]] = _cfg(logits_fn, tokens, labels, i, cfg_scale, cfg_schedule).argmax(-1)
    assert torch.equal(got.reshape(3, N), tokens)
    assert len(got.unique()) > 3


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_parallel_steps_equal_an_uncached_block_causal_pass(cfg_scale):
    """Several tokens per step: the cache path equals recomputing every step from scratch."""
    model = _model(seed=3)
    labels = torch.tensor([1, 4])
    g = torch.Generator().manual_seed(5)
    got = model.generate(labels, cfg_scale=cfg_scale, steps=5, temperature=0.0, generator=g)
    order = torch.rand(2, N, generator=torch.Generator().manual_seed(5)).argsort(dim=1)  # one per sample
    sizes = step_sizes(N, 5, "arccos")
    guided = cfg_scale != 1.0
    cond = model._cond_ids(torch.cat([labels, torch.full_like(labels, 10)]) if guided else labels)
    fed, block = cond[:, None], [0]  # ids in feeding order and each one's chunk index
    pos = model.freqs_cis[1:][order.repeat(2, 1) if guided else order]  # (B2, N, K/2, 2); null half = same orders
    seq = torch.empty(2, 0, dtype=torch.long)
    with torch.inference_mode():
        for s, n_pred in enumerate(sizes):
            chunks = torch.tensor(block)
            mask = chunks[:, None] >= chunks[None, :]  # a chunk sees itself and everything before
            cls = model.freqs_cis[:1].expand(pos.shape[0], 1, -1, -1)
            freqs = torch.cat([cls, pos[:, : fed.shape[1] - 1]], dim=1)
            k, v = model._context(model.embeddings(fed), freqs, causal=False, attn_mask=mask)
            done = seq.shape[1]
            logits = model._guided(k, v, pos[:, done : done + n_pred], causal=False)
            if guided:
                logits = cfg_mix(*logits.chunk(2), 1 + (cfg_scale - 1) * (done + n_pred) / N)
            new = logits.argmax(-1)
            seq = torch.cat([seq, new], dim=1)
            fed = torch.cat([fed, new.repeat(2 if guided else 1, 1)], dim=1)
            block += [s + 1] * n_pred
    want = torch.empty_like(seq).scatter_(1, order, seq)
    assert torch.equal(got.reshape(2, N), want)


def test_steps_is_the_number_of_forward_passes():
    model = _model(seed=4)
    calls, handle = _count_pass1_calls(model)
    try:
        for steps, cfg_scale in ((4, 1.0), (7, 2.5), (None, 2.5)):
            calls.clear()
            model.generate(torch.tensor([1, 2, 3]), cfg_scale=cfg_scale, steps=steps, generator=torch.Generator())
            want = N if steps is None else steps  # the default 64 is clamped to N
            assert len(calls) == model.last_forward_passes == want
            assert set(calls) == {6 if cfg_scale != 1.0 else 3}  # CFG doubles the batch, cfg 1 does not
        calls.clear()
        keep = torch.zeros(4, 4, dtype=torch.bool)
        keep[:2] = True
        model.edit(torch.tensor([1]), torch.zeros(1, 4, 4, dtype=torch.long), keep, steps=3, cfg_scale=2.0)
        assert len(calls) == model.last_forward_passes == 3
    finally:
        handle.remove()


def test_seeds_control_samples_and_cfg_one_is_the_conditional_sampler():
    model = _model(seed=5)
    labels = torch.tensor([1, 2, 3, 4])

    def sample(seed, **kw):
        return model.generate(labels, generator=torch.Generator().manual_seed(seed), **kw)

    for kw in (dict(cfg_scale=1.5, steps=6), dict(cfg_scale=4.0, steps=3, top_k=8, top_p=0.9, schedule="cosine")):
        assert torch.equal(sample(0, **kw), sample(0, **kw))
        assert not torch.equal(sample(0, **kw), sample(1, **kw))
    # cfg 1 with one raster token per step = ancestral sampling from the uncached conditional model
    got = sample(7, cfg_scale=1.0, steps=N, order="raster")
    g = torch.Generator().manual_seed(7)
    tokens = torch.zeros(4, N, dtype=torch.long)
    for i in range(N):
        logits = model.teacher_forced_logits(tokens, labels=labels, order=torch.arange(N))[:, i]
        tokens[:, i] = sample_logits(logits, generator=g)
    assert torch.equal(got.reshape(4, N), tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_restores_mode_checks_inputs_and_runs_in_bf16(dtype):
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model.generate([1, 2], cfg_scale=3.0, steps=5, generator=torch.Generator().manual_seed(0))
    assert model.training and out.shape == (2, 4, 4) and out.dtype == torch.int64 and int(out.max()) < 64
    with pytest.raises(ValueError, match="unknown generation order"):
        model.generate([1], order="diagonal")
    with pytest.raises(ValueError, match="step schedule"):
        model.generate([1], schedule="linear")
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.generate([1], cfg_schedule="cosine")
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\)"):
        model.generate([10])
    with pytest.raises(ValueError, match="repeat"):
        model.generate([1], prefix_tokens=torch.zeros(1, 2, dtype=torch.long), prefix_positions=torch.tensor([3, 3]))


# --- zero-shot editing ------------------------------------------------------------------------


def _box(r0, r1, c0, c1):
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.mark.parametrize(
    "kind", ["inpaint", "outpaint", "random-shared", "random-per-sample", "nothing", "everything"]
)
def test_edit_keeps_every_known_token(kind):
    model = _model(seed=6)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (5, 4, 4), generator=g)
    keep = {
        "inpaint": ~_box(1, 3, 1, 3),  # a hole in the middle
        "outpaint": _box(1, 3, 1, 4),  # a crop; the border is generated
        "random-shared": torch.rand(4, 4, generator=g) < 0.5,
        "random-per-sample": torch.rand(5, 4, 4, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.7, 0.5])[:, None, None],
        "nothing": torch.zeros(4, 4, dtype=torch.bool),
        "everything": torch.ones(4, 4, dtype=torch.bool),
    }[kind]
    labels = torch.tensor([0, 1, 2, 3, 4])
    new_labels = (labels + 5) % 10  # class-conditional editing: regenerate under another label
    for lab, cfg in ((labels, 1.0), (new_labels, 3.0)):
        out = model.edit(lab, tokens, keep, cfg_scale=cfg, steps=4, generator=torch.Generator().manual_seed(2))
        assert out.shape == (5, 4, 4) and out.dtype == torch.int64
        mask = keep.expand_as(tokens)
        assert torch.equal(out[mask], tokens[mask])
        if kind != "everything":
            assert not torch.equal(out[~mask], tokens[~mask])  # something was generated
    if kind == "everything":
        assert model.last_forward_passes == 0


def test_edit_is_conditioned_on_the_kept_tokens():
    model = _model(seed=7, head_std=1.0)
    keep = _box(0, 2, 0, 4)  # the top half
    a = torch.randint(0, 64, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[:, :2] = (b[:, :2] + 7) % 64
    run = lambda t: model.edit(torch.tensor([1, 1, 1]), t, keep, steps=8, temperature=0.0, order="z-curve")  # noqa: E731
    assert not torch.equal(run(a)[:, 2:], run(b)[:, 2:])
    # generate's prefix arguments are the same path
    pos = keep.flatten().nonzero()[:, 0]
    got = model.generate(torch.tensor([1, 1, 1]), steps=8, temperature=0.0, order="z-curve",
                         prefix_tokens=a.flatten(1)[:, pos], prefix_positions=pos)
    assert torch.equal(got, run(a))


def test_class_rope_origin_gives_queries_their_absolute_position():
    zero, origin = _model(seed=5), _model(seed=5, class_rope="origin")
    assert origin.num_params() == zero.num_params()
    assert torch.equal(origin.freqs_cis[0], origin.freqs_cis[1]) and not zero.freqs_cis[0].any()
    # The second query of orders starting at cell 0 and at cell 5 has the same relative view
    # (one known token, one cell to its left): "zero" cannot tell the two apart, "origin" can.
    tokens, labels = torch.zeros(1, N, dtype=torch.long), torch.tensor([1])
    for model, differs in ((zero, False), (origin, True)):
        second = [model.teacher_forced_logits(tokens, labels=labels, order=torch.roll(torch.arange(N), -p)[None])[0, 1]
                  for p in (0, 5)]
        assert (not torch.allclose(second[0], second[1], atol=1e-5)) == differs
    with pytest.raises(ValueError, match="class_rope"):
        _model(class_rope="middle")


def test_random_order_is_drawn_per_sample_and_scan_orders_are_shared():
    model = _model(seed=6)
    seen = []
    decode = model._decode
    model._decode = lambda labels, orders, *rest: seen.append(orders) or decode(labels, orders, *rest)
    model.generate(torch.tensor([1, 1, 1]), steps=4, generator=torch.Generator().manual_seed(0))
    (orders,) = seen
    assert orders.shape == (3, N) and len({tuple(o.tolist()) for o in orders}) == 3
    assert all(torch.equal(o.sort().values, torch.arange(N)) for o in orders)
    seen.clear()
    model.generate(torch.tensor([1, 2]), steps=4, order="spiral-in")
    assert seen[0].shape == (1, N)

"""Family `nar` (Neighboring AR): proximity mask, decoding schedule, loss alignment, cached sampling."""

from __future__ import annotations

import math

import pytest
import torch

import raygen.models.sampling as sampling
from raygen.models import MODEL_REGISTRY, PAPER_PARAMS, build_model
from raygen.models.nar import (
    NAR_SIZES,
    NARConfig,
    NARModel,
    decode_schedule,
    diagonal,
    neighbour_logits,
    proximity_mask,
)
from raygen.models.sampling import cfg_mix, sample_logits

# Small enough that uncached reference loops stay cheap: a 5x5 grid, 64 ids, 10 classes.
SMALL = dict(vocab_size=64, grid_size=5, num_classes=10)
G = SMALL["grid_size"]
N = G * G


def _model(seed: int = 0, head_std: float = 0.3, **overrides) -> NARModel:
    """debug-size model in eval mode with random (non-zero) heads, so logits are informative."""
    torch.manual_seed(seed)
    model = build_model("nar", "debug", **{**SMALL, **overrides}).eval()
    with torch.no_grad():
        model.output.weight.normal_(0.0, head_std)
        model.medusa_output.weight.normal_(0.0, head_std)
    return model


def _batch(config: NARConfig, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, config.vocab_size, (batch_size, config.seq_len), generator=g, dtype=torch.int32),
        "label": torch.randint(0, config.num_classes, (batch_size,), generator=g),
    }


def _decode_order(grid: int) -> list[tuple[int, int]]:
    """(h, w) in the order the sampler makes them: by anti-diagonal, then by row."""
    return sorted(((h, w) for h in range(grid) for w in range(grid)), key=lambda p: (p[0] + p[1], p[0]))


# --- the mask and the schedule -----------------------------------------------------------------


@pytest.mark.parametrize("grid", [1, 2, 3, 4, 5])
def test_proximity_mask_is_its_definition(grid):
    mask = proximity_mask(grid)
    n = grid * grid
    assert mask.shape == (n + 1, n + 1) and mask.dtype == torch.bool
    want = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    want[0, 0] = True  # the class token sees only itself
    for q in range(n):
        qh, qw = divmod(q, grid)
        want[1 + q, 0] = True  # every token sees the class token
        for k in range(n):
            kh, kw = divmod(k, grid)
            want[1 + q, 1 + k] = kh + kw <= qh + qw
    assert torch.equal(mask, want)


def test_model_caches_the_mask_as_a_non_persistent_buffer():
    model = build_model("nar", "debug", **SMALL)
    assert torch.equal(model.attn_mask, proximity_mask(G))
    assert "attn_mask" not in model.state_dict() and "freqs_cis" not in model.state_dict()


@pytest.mark.parametrize("grid", [1, 2, 3, 4, 5, 7])
def test_schedule_has_2g_minus_1_passes_and_makes_every_token_once(grid):
    schedule = decode_schedule(grid)
    assert len(schedule) == 2 * grid - 1
    made = [p for _, m in schedule for p in m]
    assert sorted(made) == list(range(grid * grid))  # each position exactly once
    for k, (fed, new) in enumerate(schedule):
        assert new == diagonal(grid, k)
        assert fed == ([] if k == 0 else diagonal(grid, k - 1))
        assert fed == sorted(fed, key=lambda p: p // grid)  # increasing row
        if k == 0:
            continue
        growing = k < grid
        assert len(new) == len(fed) + (1 if growing else -1)
        # made token j reads B of fed[j - 1] (its upper neighbour) and R of fed[j] (its left one)
        offset = 1 if growing else 0
        for j, p in enumerate(new):
            h, w = divmod(p, grid)
            up = fed[j - offset] if 0 <= j - offset < len(fed) else None
            left = fed[j - offset + 1] if 0 <= j - offset + 1 < len(fed) else None
            assert up == ((h - 1) * grid + w if h > 0 else None)
            assert left == (h * grid + w - 1 if w > 0 else None)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_generate_runs_2g_minus_1_passes_and_writes_each_position_once(monkeypatch, cfg_scale):
    model = _model(vocab_size=N)
    counter = {"next": 0}

    def numbering(logits, **kwargs):  # the i-th token drawn gets id i, in every sample
        lead = logits.shape[-2]
        ids = torch.arange(counter["next"], counter["next"] + lead).expand(logits.shape[:-1])
        counter["next"] += lead
        return ids

    monkeypatch.setattr(sampling, "sample_logits", numbering)  # the draw behind SamplingOptions.sample
    batches = []
    hook = model.layers[0].register_forward_hook(lambda mod, args, out: batches.append(out.shape[0]))
    out = model.generate(torch.tensor([1, 2, 3]), cfg_scale=cfg_scale)
    hook.remove()
    assert model.last_forward_passes == len(batches) == 2 * G - 1
    assert batches == [3 if cfg_scale == 1.0 else 6] * (2 * G - 1)  # cfg 1: no null-class half
    assert counter["next"] == N  # N tokens drawn, and every one of them landed in its own slot:
    want = torch.empty(G, G, dtype=torch.long)
    for i, (h, w) in enumerate(_decode_order(G)):
        want[h, w] = i
    assert torch.equal(out, want.expand(3, G, G))


# --- the loss --------------------------------------------------------------------------------


def _reference_neighbour_logits(r: torch.Tensor, b: torch.Tensor, grid: int) -> torch.Tensor:
    """Position by position: which head output scores target (h, w)."""
    rows = []
    for h in range(grid):
        for w in range(grid):
            if h == 0 and w == 0:
                rows.append((r[:, 0] + b[:, 0]) / 2)  # the class position
            elif h == 0:
                rows.append(r[:, 1 + h * grid + w - 1])  # R of the left neighbour
            elif w == 0:
                rows.append(b[:, 1 + (h - 1) * grid + w])  # B of the upper neighbour
            else:
                rows.append((r[:, 1 + h * grid + w - 1] + b[:, 1 + (h - 1) * grid + w]) / 2)
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_neighbour_logits_match_a_per_position_reference(grid):
    g = torch.Generator().manual_seed(grid)
    r, b = torch.randn(2, 2, grid * grid + 1, 7, generator=g)
    torch.testing.assert_close(neighbour_logits(r, b, grid), _reference_neighbour_logits(r, b, grid))


def _planted_heads(tokens: torch.Tensor, grid: int, vocab: int, strength: float):
    """R/B logits that put `strength` on the right / lower neighbour's id (class: on x_(0,0))."""
    bsz = tokens.shape[0]
    x = tokens.reshape(bsz, grid, grid)
    r = torch.zeros(bsz, grid * grid + 1, vocab)
    b = torch.zeros(bsz, grid * grid + 1, vocab)
    rows = torch.arange(bsz)
    r[rows, 0, x[:, 0, 0]] = strength
    b[rows, 0, x[:, 0, 0]] = strength
    for h in range(grid):
        for w in range(grid):
            if w + 1 < grid:
                r[rows, 1 + h * grid + w, x[:, h, w + 1]] = strength
            if h + 1 < grid:
                b[rows, 1 + h * grid + w, x[:, h + 1, w]] = strength
    return r, b


def _ce(logit: float, vocab: int) -> float:
    """Cross-entropy of a target holding `logit` while every other id holds 0."""
    return -logit + math.log(math.exp(logit) + vocab - 1)


def test_loss_scores_each_target_against_its_neighbours():
    model = build_model("nar", "debug", vocab_size=N, grid_size=G, num_classes=10).eval()
    tokens = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    batch = {"tokens": tokens.int(), "label": torch.tensor([1, 2])}
    s = 12.0
    r, b = _planted_heads(tokens, G, N, s)

    # the heads' logits, planted: the backbone returns them as its states and the heads pass them on
    model.output, model.medusa_output = torch.nn.Identity(), torch.nn.Identity()

    def run(heads):
        model._states = lambda h, **kw: heads
        try:
            return model(batch)
        finally:
            del model._states

    aligned = run((r, b))
    assert aligned["acc"].item() == 1.0
    assert math.isclose(aligned["loss"].item(), _ce(s, N), rel_tol=1e-3)  # every target at full strength
    # R alone: row 0 scores at full strength, the interior and x_(0,0) at half, column 0 not at all
    r_only = run((r, torch.zeros_like(b)))
    want = ((G - 1) * _ce(s, N) + (1 + (G - 1) ** 2) * _ce(s / 2, N) + (G - 1) * math.log(N)) / N
    assert math.isclose(r_only["loss"].item(), want, rel_tol=1e-5)
    b_only = run((torch.zeros_like(r), b))
    assert math.isclose(b_only["loss"].item(), want, rel_tol=1e-5)  # the transpose of the same picture
    swapped = run((b, r))  # each head aimed at the other neighbour: only x_(0,0) is right
    assert swapped["acc"].item() <= 2 / N and swapped["loss"].item() > 1.0


def test_forward_at_init_is_uniform():
    torch.manual_seed(0)
    model = build_model("nar", "debug")  # vocab 16384, 16x16 grid
    out = model(_batch(model.config, batch_size=1))
    assert set(out) == {"loss", "acc"} and out["loss"].ndim == 0 and not out["acc"].requires_grad
    assert math.isclose(out["loss"].item(), math.log(16384), rel_tol=1e-6)  # both heads zero => uniform
    out["loss"].backward()
    assert model.output.weight.grad.abs().sum() > 0 and model.medusa_output.weight.grad.abs().sum() > 0


def test_backward_reaches_every_parameter():
    model = _model().train()
    model(_batch(model.config))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_forward_accepts_grids_and_checks_length():
    model = _model()
    batch = _batch(model.config)
    flat = model(batch)["loss"]
    grid = model({**batch, "tokens": batch["tokens"].reshape(4, G, G)})["loss"]
    torch.testing.assert_close(flat, grid)
    with pytest.raises(ValueError, match=f"{N} tokens"):
        model({**batch, "tokens": batch["tokens"][:, :20]})


def test_class_dropout_follows_the_generator():
    no_dropout = dict(resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0)
    half = _model(class_dropout=0.5, **no_dropout).train()
    batch = _batch(half.config, batch_size=16)
    runs = [half(batch, generator=torch.Generator().manual_seed(s))["loss"] for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    always = _model(class_dropout=1.0, **no_dropout).train()
    other = {**batch, "label": (batch["label"] + 1) % 10}
    torch.testing.assert_close(always(batch)["loss"], always(other)["loss"])  # every label is null


def test_loss_falls_on_a_learnable_batch():
    torch.manual_seed(0)
    model = build_model("nar", "debug", vocab_size=16, grid_size=6, num_classes=8).train()
    labels = torch.arange(8)
    pos = torch.arange(36)
    tokens = (labels[:, None] * 5 + pos[None] * (labels[:, None] % 3 + 1)) % 16  # a function of the label
    batch = {"tokens": tokens.int(), "label": labels}
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=2e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = model(batch, generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isclose(losses[0], math.log(16), rel_tol=1e-5)
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0], losses[::5]


# --- sizes and registry ------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["B", "M", "L", "XL", "XXL"])
def test_named_sizes_have_the_official_parameter_counts(size):
    with torch.device("meta"):
        model = build_model("nar", size)
    assert model.num_params() == PAPER_PARAMS[("nar", size)]
    assert model.config.n_layer + 1 == len(model.layers) and model.head_block is model.layers[-1]


def test_registry_and_state_dict_names():
    assert MODEL_REGISTRY["nar"].sizes is NAR_SIZES and set(NAR_SIZES) == {"debug", "B", "M", "L", "XL", "XXL"}
    model = build_model("nar", "debug", **SMALL)
    keys = set(model.state_dict())
    n = model.config.n_layer
    assert {f"layers.{n}.attention.wqkv.weight", "medusa_norm.weight", "medusa_output.weight", "output.weight"} <= keys
    assert f"layers.{n + 1}.attention.wqkv.weight" not in keys


def test_tables_survive_casts_and_meta_materialisation():
    model = build_model("nar", "debug", **SMALL)
    rope = model.freqs_cis.clone()
    assert model.to(torch.bfloat16).freqs_cis.dtype == torch.float32
    with torch.device("meta"):
        meta = build_model("nar", "debug", **SMALL)
    real = meta.to_empty(device="cpu")
    torch.testing.assert_close(real.freqs_cis, rope)
    assert torch.equal(real.attn_mask, proximity_mask(G))
    real.initialize_weights()
    assert torch.count_nonzero(real.output.weight) == 0 and torch.count_nonzero(real.medusa_output.weight) == 0


def test_flops_per_sample_counts_the_head_block_and_the_class_position():
    model = build_model("nar", "debug", **SMALL)
    c = model.config
    embeddings = model.tok_embeddings.weight.numel() + model.cls_embedding.embedding_table.weight.numel()
    want = 6 * (model.num_params() - embeddings) * (N + 1) + 12 * (c.n_layer + 1) * c.dim * (N + 1) ** 2
    assert model.flops_per_sample() == want


# --- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_logits_match_uncached(cfg_scale):
    model = _model(seed=2)
    batch = _batch(model.config, batch_size=3)
    tokens, labels = batch["tokens"], batch["label"]
    cached = model.logits_cached(tokens, labels=labels, cfg_scale=cfg_scale)
    uncached = model.logits_uncached(tokens, labels=labels)
    if cfg_scale != 1.0:
        uncached = cfg_mix(uncached, model.logits_uncached(tokens, labels=torch.full_like(labels, 10)), cfg_scale)
    assert cached.shape == uncached.shape == (3, N, 64)
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


def _uncached_sampler(model: NARModel, labels, *, cfg_scale=1.0, cfg_interval=-1, pick) -> torch.Tensor:
    """The reference: per anti-diagonal, one full uncached pass (not-yet-made tokens are 0)."""
    tokens = torch.zeros(len(labels), N, dtype=torch.long)
    null = torch.full_like(labels, model.config.num_classes)
    made_so_far = 0
    for k in range(2 * G - 1):
        new = diagonal(G, k)
        logits = model.logits_uncached(tokens, labels=labels)[:, new]
        if cfg_scale != 1.0 and (cfg_interval < 0 or made_so_far <= cfg_interval):
            logits = cfg_mix(logits, model.logits_uncached(tokens, labels=null)[:, new], cfg_scale)
        tokens[:, new] = pick(logits)
        made_so_far += len(new)
    return tokens.reshape(len(labels), G, G)


@pytest.mark.parametrize(("cfg_scale", "cfg_interval"), [(1.0, -1), (2.0, -1), (2.0, 6)])
def test_cached_greedy_generation_equals_uncached(cfg_scale, cfg_interval):
    model = _model(seed=1)
    labels = torch.tensor([0, 3, 7])
    got = model.generate(labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=0.0)
    assert got.shape == (3, G, G) and got.dtype == torch.int64
    want = _uncached_sampler(model, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, pick=lambda x: x.argmax(-1))
    assert torch.equal(got, want)
    assert len(got.unique()) > 3  # a real grid, not a constant


def test_cfg_interval_drops_the_null_half():
    model = _model(seed=1)
    batches = []
    hook = model.layers[0].register_forward_hook(lambda mod, args, out: batches.append(out.shape[0]))
    model.generate(torch.tensor([1, 2]), cfg_scale=2.0, cfg_interval=6, temperature=0.0)
    hook.remove()
    assert batches == [4, 4, 4, 4] + [2] * 5  # 1 + 2 + 3 = 6 made before pass 3; 10 > 6 before pass 4


def test_cfg_scale_one_is_the_conditional_sampler():
    model = _model(seed=4)
    labels = torch.tensor([2, 5])
    got = model.generate(labels, cfg_scale=1.0, temperature=1.0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    want = _uncached_sampler(model, labels, pick=lambda x: sample_logits(x, generator=g))
    assert torch.equal(got, want)


def test_seeds_control_samples():
    model = _model(seed=3)
    labels = torch.tensor([1, 2, 3, 4])

    def sample(seed, **kw):
        return model.generate(labels, cfg_scale=1.5, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(5, top_k=8, top_p=0.9), sample(5, top_k=8, top_p=0.9))
    assert torch.equal(sample(0, top_k=1), model.generate(labels, cfg_scale=1.5, temperature=0.0))


def test_generate_restores_mode_and_checks_inputs():
    model = _model().train()
    out = model.generate([1, 2], temperature=0.0, steps=2 * G - 1)
    assert model.training and out.shape == (2, G, G) and int(out.max()) < 64
    model.eval()
    model.generate(torch.tensor([1]), temperature=0.0)
    assert not model.training
    with pytest.raises(ValueError, match="steps must be 9"):
        model.generate(torch.tensor([1]), steps=25)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\)"):
        model.generate(torch.tensor([10]))


def test_generate_on_a_one_token_grid_and_under_bf16_autocast():
    model = _model(grid_size=1)
    assert model.generate(torch.tensor([1, 2]), cfg_scale=2.0).shape == (2, 1, 1)
    assert model.last_forward_passes == 1
    model = _model(grid_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(torch.tensor([1, 2]), cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 3) and out.dtype == torch.int64


@pytest.mark.parametrize("grid", [2, 3, 5])
def test_neighbour_sources_gather_what_neighbour_logits_assembles(grid):
    from raygen.models.nar import neighbour_sources

    g = torch.Generator().manual_seed(grid)
    r, b = torch.randn(2, grid * grid + 1, 7, generator=g), torch.randn(2, grid * grid + 1, 7, generator=g)
    src_r, src_b, w_r, w_b = neighbour_sources(grid)
    gathered = w_r[:, None] * r[:, src_r] + w_b[:, None] * b[:, src_b]
    assert torch.equal(gathered, neighbour_logits(r, b, grid))  # bit for bit


def test_the_training_loss_and_gradients_equal_the_assembled_logits_path():
    from raygen.models.base import token_loss

    torch.manual_seed(0)
    model = build_model("nar", "debug", vocab_size=32, num_classes=4, grid_size=4, dim=32, n_layer=2, n_head=2,
                        class_dropout=0.0)
    model.eval()  # no dropout: both paths see the same network
    batch = {"tokens": torch.randint(0, 32, (3, 16)), "label": torch.tensor([0, 1, 3])}
    loss = model(batch)["loss"]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    h = model._embed(batch["tokens"], labels=batch["label"], train=False)
    r, b = model._heads(h, freqs=model.freqs_cis, mask=model.attn_mask)
    ref = token_loss(neighbour_logits(r, b, 4), batch["tokens"])["loss"]
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(grads, ref_grads):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)

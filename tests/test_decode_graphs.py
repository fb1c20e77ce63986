"""The static-shape decode step and its CUDA graphs (raygen.models.graphs, the `graphs` sampling option).

On a CPU `graphs="on"` runs the static path eagerly: fixed-shape caches read whole under a mask,
positions and slots as tensors. It must draw the same ids as the dynamic path ("off") for a fixed
seed, give the same step logits to float32 rounding, and never let an unwritten cache slot
change anything. `graphs.SIMULATE` runs StepGraphs' capture bookkeeping (static input buffers,
outputs overwritten in place, state kept between calls) without CUDA; the captured graphs
themselves are checked only where a GPU is present.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from raygen import families
from raygen.config import SampleConfig
from raygen.models import build_model, graphs
from raygen.models.ar import ARModel
from raygen.models.arpg import step_sizes
from raygen.models.ctf import Lookup
from raygen.models.layers import Attention, KVCache, StaticCaches, StaticKVCache
from raygen.models.sampling import SamplingOptions, takes_execution_options

V, CLASSES, GRID, K = 64, 10, 4, 4  # vocab, classes, grid side, CTF clusters
ARCH = dict(vocab_size=V, num_classes=CLASSES, grid_size=GRID, dim=32, n_layer=2, n_head=2)
LABELS = torch.tensor([0, 3, 7])
POISON = 1e30  # finite, and far beyond any real key or value: a slot that leaked in would show


def _model(family: str, seed: int = 1):
    """A tiny model (eval mode) whose every parameter is moved by noise, so no head is zero."""
    torch.manual_seed(0)
    if family == "ctf":
        lookup = Lookup(torch.arange(V) % K, torch.arange(K))
        model = build_model("ctf", "debug", clusters=K, lookup_fingerprint=lookup.fingerprint(), **ARCH)
        model.bind_lookup(lookup)
    else:
        model = build_model(family, "debug", **ARCH)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _gen(device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(7)


TOPS = dict(cfg_scale=3.0, top_k=5, temperature=1.5)
CASES = {
    "ar": [{}, dict(cfg_scale=2.0), TOPS, dict(temperature=0.0)],
    "ctf": [{}, dict(cfg_scale=2.0), TOPS],  # CTF stage 1: ARModel's sampler over coarse labels
    "nar": [{}, dict(cfg_scale=2.0), TOPS, dict(cfg_scale=2.0, cfg_interval=3)],
    "arpg": [{}, dict(cfg_scale=2.0, steps=5), dict(order="raster", steps=8, **TOPS),
             dict(order="spiral-in", cfg_scale=2.0, cfg_schedule="constant", schedule="cosine", steps=4),
             dict(order="alternate", temperature=0.0, steps=16)],
}
FAMILY_CASES = [(f, i) for f, cases in CASES.items() for i in range(len(cases))]


@pytest.fixture(params=[False, True], ids=["eager", "simulated-capture"])
def simulate(request, monkeypatch):
    monkeypatch.setattr(graphs, "SIMULATE", request.param)
    return request.param


def _rounding(logits: torch.Tensor) -> float:
    """float32 rounding of logits: 1e-5 at the golden tests' scale (|logit| <= 5), in proportion above.

    The error of a logit follows the size of the decode's arithmetic, not its own value: CFG at
    scale 3 of logits ~ 15 ends near 2e-5, also on guided logits near zero.
    """
    return 1e-5 * max(1.0, float(logits.abs().max()) / 5)


def _record_logits(monkeypatch) -> list[torch.Tensor]:
    """Every logits tensor the samplers hand to SamplingOptions.sample, copied."""
    seen: list[torch.Tensor] = []
    original = SamplingOptions.sample

    def sample(self, logits):
        seen.append(logits.clone())
        return original(self, logits)

    monkeypatch.setattr(SamplingOptions, "sample", sample)
    return seen


# --- ids and logits: static path == dynamic path -------------------------------------------------


@pytest.mark.parametrize(("family", "case"), FAMILY_CASES)
def test_static_path_draws_the_dynamic_paths_ids(family, case, simulate):
    model, kw = _model(family), CASES[family][case]
    off = model.generate(LABELS, generator=_gen(), graphs="off", **kw)
    on = model.generate(LABELS, generator=_gen(), graphs="on", **kw)
    assert torch.equal(on, off)
    if simulate:  # the kept state (caches, recorded steps) serves a second call as well
        assert torch.equal(model.generate(LABELS, generator=_gen(), graphs="on", **kw), off)


def test_the_cases_are_not_trivial():
    for family in CASES:
        model = _model(family)
        ids = [model.generate(LABELS, generator=_gen(), graphs="on", **kw) for kw in CASES[family][:3]]
        assert not torch.equal(ids[0], ids[1]) and not torch.equal(ids[1], ids[2])
        assert len(ids[0].unique()) > 3


@pytest.mark.parametrize(("family", "case"), FAMILY_CASES)
def test_static_step_logits_equal_the_dynamic_steps(family, case, monkeypatch):
    model, kw = _model(family), CASES[family][case]
    seen = _record_logits(monkeypatch)
    model.generate(LABELS, generator=_gen(), graphs="off", **kw)
    n = len(seen)
    model.generate(LABELS, generator=_gen(), graphs="on", **kw)
    assert n > 1 and len(seen) == 2 * n
    tol = _rounding(torch.stack([logits.abs().max() for logits in seen[:n]]))  # the decode's scale
    for dynamic, static in zip(seen[:n], seen[n:]):
        torch.testing.assert_close(static, dynamic, atol=tol, rtol=0)


def test_teacher_forced_cached_logits_agree():
    tokens = torch.randint(V, (3, GRID * GRID), generator=torch.Generator().manual_seed(3))
    ar = _model("ar")
    ref = ar.logits_cached(tokens[:, :-1], labels=LABELS)
    static = ar.logits_cached(tokens[:, :-1], labels=LABELS, graphs="on")
    torch.testing.assert_close(static, ref, atol=_rounding(ref), rtol=0)
    uncached = ar.logits_uncached(tokens[:, :-1], labels=LABELS)
    torch.testing.assert_close(static, uncached, atol=_rounding(uncached), rtol=0)
    nar = _model("nar")
    kw = dict(labels=LABELS, cfg_scale=2.0, cfg_interval=5)
    ref = nar.logits_cached(tokens, **kw)
    torch.testing.assert_close(nar.logits_cached(tokens, graphs="on", **kw), ref, atol=_rounding(ref), rtol=0)


def test_arpg_prefix_and_edit_match(simulate):
    model = _model("arpg")
    tokens = torch.randint(V, (3, GRID, GRID), generator=torch.Generator().manual_seed(3))
    keep = torch.zeros(3, GRID, GRID, dtype=torch.bool)
    keep[0, :2] = keep[1, 0, 0] = keep[2, 1:3, 1:3] = True  # three kept counts: three decodes
    for mode in ("off", "on"):
        kw = dict(cfg_scale=2.0, steps=4, generator=_gen(), graphs=mode)
        out = model.edit(LABELS, tokens, keep, **kw)
        if mode == "off":
            ref = out
    assert torch.equal(out, ref) and torch.equal(out[keep], tokens[keep])
    prefix = dict(prefix_tokens=tokens.flatten(1)[:, :3], prefix_positions=torch.tensor([5, 0, 9]), steps=4, **TOPS)
    assert torch.equal(model.generate(LABELS, generator=_gen(), graphs="on", **prefix),
                       model.generate(LABELS, generator=_gen(), graphs="off", **prefix))


# --- the mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "case"), [("ar", 1), ("ctf", 2), ("nar", 3), ("arpg", 1), ("arpg", 2)])
def test_unwritten_slots_are_hidden(family, case, monkeypatch):
    """Poisoned unwritten slots (every slot at the start of a decode) change no logit and no id."""
    model, kw = _model(family), CASES[family][case]
    seen = _record_logits(monkeypatch)
    clean = model.generate(LABELS, generator=_gen(), graphs="on", **kw)
    n = len(seen)
    reset = StaticCaches.reset

    def poisoned_reset(self):
        reset(self)
        for i, cache in enumerate(self.layers):
            cache.k.fill_(POISON if i % 2 else -POISON)
            cache.v.fill_(POISON)

    monkeypatch.setattr(StaticCaches, "reset", poisoned_reset)
    assert torch.equal(model.generate(LABELS, generator=_gen(), graphs="on", **kw), clean)
    for a, b in zip(seen[:n], seen[n:]):
        assert torch.equal(a, b)


def test_static_attention_matches_the_growing_cache():
    """Attention over a StaticKVCache (all slots, masked) == over KVCache's growing prefix, step by step."""
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    freqs = torch.randn(6, 4, 2)  # (S_max, K/2, 2)
    x = torch.randn(2, 6, 32)  # (B, L, D)
    dynamic = KVCache(2, 4, 6, 8)
    statics = StaticCaches(1, 2, 4, 6, 8)
    statics.reset()
    for cache in statics.layers:
        cache.k.fill_(POISON)
        cache.v.fill_(-POISON)
    for i in range(6):
        ref = attn(x[:, i : i + 1], freqs[i : i + 1], kv_cache=dynamic, start_pos=i)
        pos = statics.slot_ids[i : i + 1]
        mask = statics.visible(pos, statics.slot_ids[None] <= pos[:, None])  # (1, S)
        assert mask.sum() == i + 1
        out = attn(x[:, i : i + 1], freqs[pos], attn_mask=mask, kv_cache=statics.layers[0], start_pos=pos)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_static_cache_writes_slots_and_views_share_memory():
    cache = StaticKVCache(4, 2, 5, 3)
    k = torch.ones(4, 2, 2, 3)
    full_k, _ = cache.update(torch.tensor([3, 1]), k, 2 * k)
    assert full_k.shape == (4, 2, 5, 3)
    assert full_k[:, :, [1, 3]].eq(1).all() and full_k[:, :, [0, 2, 4]].eq(0).all()
    half = cache.keep_batch(2)
    half.update(2, k[:2, :, :1], k[:2, :, :1])  # an int start: slot 2
    assert cache.k[:2, :, 2].eq(1).all() and cache.k[2:, :, 2].eq(0).all()


# --- graphs per step shape, kept state -----------------------------------------------------------


def _steps(model) -> graphs.StepGraphs:
    return graphs._KEPT[model][2][1]


def test_one_recorded_step_per_distinct_shape(simulate):
    if not simulate:
        pytest.skip("the recorded steps exist on the capture path only")
    ar = _model("ar")
    ar.generate(LABELS, generator=_gen(), graphs="on", cfg_scale=2.0)
    assert len(_steps(ar)) == 1  # every position: one graph
    arpg = _model("arpg")
    arpg.generate(LABELS, generator=_gen(), graphs="on", cfg_scale=2.0, steps=6)
    sizes = step_sizes(GRID * GRID, 6)
    pairs = {(1, sizes[0])} | set(zip(sizes, sizes[1:]))  # (tokens fed, tokens asked)
    assert len(_steps(arpg)) == len(pairs)
    nar = _model("nar")
    nar.generate(LABELS, generator=_gen(), graphs="on")
    assert len(_steps(nar)) == 2 * GRID - 1  # first pass, then each diagonal length growing and shrinking


def test_kept_state_is_reused_and_rebuilt_when_tensors_move(simulate):
    if not simulate:
        pytest.skip("state is kept between calls on the capture path only")
    model = _model("ar")
    model.generate(LABELS, generator=_gen(), graphs="on")
    first = graphs._KEPT[model][2]
    model.generate(LABELS, generator=_gen(), graphs="on")
    assert graphs._KEPT[model][2] is first
    model.float()  # rebuilds the RoPE table: captured steps would read the old one
    model.generate(LABELS, generator=_gen(), graphs="on")
    assert graphs._KEPT[model][2] is not first
    model.generate(LABELS[:2], generator=_gen(), graphs="on")  # another batch: another state, the old one freed
    assert graphs._KEPT[model][0][1] == 2 and len(graphs._KEPT) >= 1
    graphs.release(model)
    assert model not in graphs._KEPT


# --- the knob ----------------------------------------------------------------------------------


def test_auto_is_off_on_a_cpu():
    model = _model("ar")
    assert graphs.decode_plan("auto", model) == (False, False)
    assert graphs.decode_plan("on", model) == (True, False)
    assert graphs.decode_plan("off", model) == (False, False)
    for family in CASES:
        model, kw = _model(family), CASES[family][1]
        assert torch.equal(model.generate(LABELS, generator=_gen(), **kw),
                           model.generate(LABELS, generator=_gen(), graphs="off", **kw))


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="graphs must be one of auto, on, off"):
        SamplingOptions(graphs="yes")
    with pytest.raises(ValueError, match="graphs must be one of"):
        _model("ar").generate(LABELS, graphs=True)


def test_graphs_is_an_execution_option_outside_the_signature():
    params = inspect.signature(ARModel.generate).parameters
    assert "graphs" not in params and "generator" in params
    assert takes_execution_options(_model("nar").generate)
    assert not takes_execution_options(lambda labels, **kw: labels)


def test_family_generate_passes_sample_graphs(monkeypatch):
    import raygen.models.ar as ar_module

    modes = []
    plan = ar_module.decode_plan
    monkeypatch.setattr(ar_module, "decode_plan", lambda mode, module: (modes.append(mode), plan(mode, module))[1])
    family = families.get("ar")
    knobs = family.check_knobs({})
    model = _model("ar")
    out = {}
    for graphs_value in ("on", True, "off", False, "auto"):
        sample = SampleConfig(graphs=graphs_value)
        out[graphs_value] = family.generate(model, LABELS, sample, _gen(), knobs)
    assert modes == ["on", "on", "off", "off", "auto"]
    assert all(torch.equal(ids, out["off"]) for ids in out.values())

    class Plain:  # a sampler without sampling_entry: no graphs keyword
        def generate(self, labels, *, cfg_scale, steps, temperature, top_k, top_p, generator):
            return labels

    assert torch.equal(family.generate(Plain(), LABELS, SampleConfig(graphs="on"), _gen(), knobs), LABELS)


def test_sample_config_field():
    field = {f.name: f for f in dataclasses.fields(SampleConfig)}["graphs"]
    assert field.default == "auto" and "CUDA graphs" in field.metadata.get("help", str(field.metadata))


# --- the captured path (GPU only) -----------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("family", "case"), FAMILY_CASES)
def test_captured_graphs_draw_the_eager_ids_on_gpu(family, case, monkeypatch):
    model, kw = _model(family).cuda(), CASES[family][case]
    labels = LABELS.cuda()
    assert graphs.decode_plan("auto", model) == (True, True)
    seen = _record_logits(monkeypatch)
    off = model.generate(labels, generator=_gen("cuda"), graphs="off", **kw)
    n = len(seen)
    on = model.generate(labels, generator=_gen("cuda"), graphs="on", **kw)
    steps = _steps(model)
    assert steps.capture and len(steps) >= 1
    again = model.generate(labels, generator=_gen("cuda"), graphs="auto", **kw)  # replays the kept graphs
    assert torch.equal(on, off) and torch.equal(again, off)
    tol = 10 * _rounding(torch.stack([logits.abs().max() for logits in seen[:n]]))
    for dynamic, static in zip(seen[:n], seen[n : 2 * n]):
        torch.testing.assert_close(static, dynamic, atol=tol, rtol=0)
    hook = model.register_forward_pre_hook(lambda module, args: None)  # a hook: "on" runs the static path eagerly
    try:
        assert graphs.decode_plan("on", model) == (True, False) and graphs.decode_plan("auto", model) == (False, False)
        eager = model.generate(labels, generator=_gen("cuda"), graphs="on", **kw)
    finally:
        hook.remove()
    assert torch.equal(eager, on)
    for captured, static in zip(seen[n : 2 * n], seen[3 * n :]):  # the same kernels, replayed or launched
        torch.testing.assert_close(captured, static, atol=1e-6, rtol=1e-6)

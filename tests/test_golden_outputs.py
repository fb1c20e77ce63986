"""Fixed-seed outputs of every family are pinned: a refactor of raygen/models must not change them.

For each registered family and kind (ar, arpg, nar, ctf stage 1, ctf stage 2, the CTF pair) at
the debug size with a tiny grid and vocabulary, this records the training losses and metrics of
a fixed batch, the uncached/cached logits paths, and the ids of `generate` (and arpg's `edit`)
for several knob settings, all under fixed seeds. The test compares them with
tests/fixtures/golden_outputs.pt: ids exactly, losses to 1e-6, logit tensors to 1e-5.

Weights: `torch.manual_seed(0)` before the build (the family's own init), then every parameter is
moved by seeded noise, taken in sorted state-dict order, so that the zero-initialised heads do
not make every sample uniform noise. The init itself is pinned too (a per-parameter sum).

Regenerate the fixture ONLY when an output change is intended (and say so in the commit):

    RAYGEN_WRITE_GOLDEN=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_golden_outputs.py
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from raygen.models import build_model
from raygen.models.ar import ARModel
from raygen.models.arpg import ARPGModel
from raygen.models.ctf import CTFPair, CTFStage1, CTFStage2, Lookup
from raygen.models.nar import NARModel

FIXTURE = Path(__file__).parent / "fixtures" / "golden_outputs.pt"
V, CLASSES, GRID, K = 16, 4, 4, 4  # vocab, classes, grid side, CTF clusters
ARCH = dict(vocab_size=V, num_classes=CLASSES, grid_size=GRID, dim=32, n_layer=2, n_head=2)
LABELS = torch.tensor([0, 1, 3])
FLOAT_TOL = 1e-6  # losses, metrics, parameter sums
LOGITS_TOL = 1e-5  # logit tensors (|logit| ~ 5-10): another thread count reorders sums by ~5e-6


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter by N(0, 0.3) noise drawn in sorted name order (so heads are not zero)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            params[name].add_(0.3 * torch.randn(params[name].shape, generator=g))


def _build(family: str, size: str, seed: int = 1, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(family, size, **{**ARCH, **overrides})
    if hasattr(model, "bind_lookup"):
        model.bind_lookup(_lookup())
    init = torch.stack([p.detach().sum() for _, p in sorted(model.named_parameters())])  # (P,)
    _perturb_(model, seed)
    model._golden_init = {"init/param_sums": init}  # type: ignore[attr-defined]
    return model


def _lookup() -> Lookup:
    f2c = torch.arange(V) % K  # fine id f -> coarse f mod K
    return Lookup(f2c, torch.arange(K))  # representative of c is c (a member)


def _ctf(stage: int, **overrides) -> torch.nn.Module:
    kw = dict(clusters=K, lookup_fingerprint=_lookup().fingerprint(), **overrides)
    return _build("ctf", "debug" if stage == 1 else "aux-debug", seed=1 + stage, **kw)


def _batch(n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {"tokens": torch.randint(V, (n, GRID, GRID), generator=g), "label": torch.tensor([0, 3, 1])[:n]}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def _forward(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Training-mode losses (dropout + class dropout under seeds), grad norm, and eval-mode losses."""
    out: dict[str, torch.Tensor] = dict(getattr(model, "_golden_init", {}))
    model.train()
    torch.manual_seed(11)  # nn.Dropout draws from the global RNG
    train = model(_batch(), generator=_gen())
    train["loss"].backward()
    grad = torch.stack([p.grad.norm() for _, p in sorted(model.named_parameters()) if p.grad is not None]).sum()
    model.zero_grad(set_to_none=True)
    out.update({f"train/{k}": v.detach().reshape(1) for k, v in train.items()})
    out["train/grad_norm_sum"] = grad.reshape(1)
    model.eval()
    with torch.no_grad():
        ev = model(_batch(), generator=_gen())
    out.update({f"eval/{k}": v.reshape(1) for k, v in ev.items()})
    model.train()
    return out


def _generate(model, knobs: dict[str, dict]) -> dict[str, torch.Tensor]:
    out = {}
    for name, kw in knobs.items():
        out[f"generate/{name}"] = model.generate(LABELS, generator=_gen(), **kw)
        if hasattr(model, "last_forward_passes"):
            out[f"passes/{name}"] = torch.tensor([model.last_forward_passes])
    return out


TOPS = dict(top_k=5, top_p=0.8)


def case_ar() -> dict[str, torch.Tensor]:
    model = _build("ar", "debug")
    out = _forward(model)
    out.update(_generate(model, {
        "plain": {},
        "cfg2": dict(cfg_scale=2.0),
        "cfg3_topk_topp_temp": dict(cfg_scale=3.0, temperature=1.5, **TOPS),
        "greedy": dict(temperature=0.0, steps=GRID * GRID),
    }))
    model.eval()
    tokens = _batch()["tokens"].flatten(1)[:, :-1]
    out["logits_uncached"] = model.logits_uncached(tokens, labels=LABELS)
    out["logits_cached"] = model.logits_cached(tokens, labels=LABELS)
    return out


def _arpg_case(**overrides) -> dict[str, torch.Tensor]:
    model = _build("arpg", "debug", **overrides)
    out = _forward(model)
    out.update(_generate(model, {
        "plain": {},
        "random_cfg2": dict(cfg_scale=2.0, steps=5),
        "spiral_in_cfg2_constant_cosine": dict(order="spiral-in", cfg_scale=2.0, cfg_schedule="constant",
                                               schedule="cosine", steps=4),
        "raster_tops": dict(order="raster", steps=16, temperature=0.7, **TOPS),
        "zcurve_cfg3": dict(order="z-curve", cfg_scale=3.0, steps=3),
        "alternate_greedy": dict(order="alternate", temperature=0.0, steps=6),
    }))
    tokens = _batch()["tokens"]
    keep = torch.zeros(GRID, GRID, dtype=torch.bool)
    keep[:2] = True
    out["edit/shared_keep"] = model.edit(LABELS, tokens, keep, cfg_scale=2.0, steps=4, generator=_gen())
    per_sample = torch.zeros(3, GRID, GRID, dtype=torch.bool)
    per_sample[0, 0, 0] = per_sample[1, :, :2] = per_sample[2, 1:3, 1:3] = True
    out["edit/per_sample"] = model.edit(LABELS, tokens, per_sample, order="spiral-out", steps=3, generator=_gen(),
                                        **TOPS)
    out["generate/prefix"] = model.generate(LABELS, prefix_tokens=tokens.flatten(1)[:, :3],
                                            prefix_positions=torch.tensor([5, 0, 9]), steps=4, generator=_gen())
    model.eval()
    order = torch.tensor([3, 1, 2, 0, 4, 5, 6, 7, 15, 14, 13, 12, 8, 9, 10, 11])
    out["teacher_forced_logits"] = model.teacher_forced_logits(tokens, labels=torch.tensor([0, 4, 2]), order=order)
    return out


def case_arpg() -> dict[str, torch.Tensor]:
    return _arpg_case()


def case_arpg_origin() -> dict[str, torch.Tensor]:
    return _arpg_case(class_rope="origin", n_cross_layer=1, n_layer=3)


def case_nar() -> dict[str, torch.Tensor]:
    model = _build("nar", "debug")
    out = _forward(model)
    out.update(_generate(model, {
        "plain": {},
        "cfg2": dict(cfg_scale=2.0),
        "cfg2_interval3": dict(cfg_scale=2.0, cfg_interval=3),
        "cfg3_interval0_tops": dict(cfg_scale=3.0, cfg_interval=0, temperature=1.2, **TOPS),
        "greedy": dict(temperature=0.0, steps=2 * GRID - 1),
    }))
    model.eval()
    tokens = _batch()["tokens"]
    out["logits_uncached"] = model.logits_uncached(tokens, labels=LABELS)
    out["logits_cached"] = model.logits_cached(tokens, labels=LABELS)
    out["logits_cached_cfg"] = model.logits_cached(tokens, labels=LABELS, cfg_scale=2.0, cfg_interval=5)
    return out


def case_ctf_stage1() -> dict[str, torch.Tensor]:
    model = _ctf(1)
    out = _forward(model)
    out.update(_generate(model, {
        "plain": {},
        "cfg2_tops": dict(cfg_scale=2.0, temperature=0.9, **TOPS),
    }))
    out["generate_coarse/cfg2"] = model.generate_coarse(LABELS, cfg_scale=2.0, generator=_gen())
    return out


def _coarse() -> torch.Tensor:
    return torch.randint(K, (3, GRID, GRID), generator=torch.Generator().manual_seed(5))


def case_ctf_stage2() -> dict[str, torch.Tensor]:
    model = _ctf(2)
    out = _forward(model)
    out.update(_generate(model, {
        "restrict": dict(coarse=_coarse()),
        "free_tops": dict(coarse=_coarse(), restrict=False, temperature=0.8, **TOPS),
        "restrict_topk1": dict(coarse=_coarse(), top_k=1, steps=1),
    }))
    model.eval()
    out["fine_logits"] = model.fine_logits(_coarse().flatten(1), LABELS)
    return out


def case_ctf_pair() -> dict[str, torch.Tensor]:
    pair = CTFPair(_ctf(1), _ctf(2))
    out = _forward(pair)
    out.update(_generate(pair, {
        "plain": {},
        "cfg2_fine": dict(cfg_scale=2.0, fine_temperature=0.5, fine_top_k=2, **TOPS),
        "free": dict(temperature=1.3, fine_top_p=0.9, restrict=False),
    }))
    return out


CASES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")
}


def compute_all() -> dict[str, torch.Tensor]:
    """Every case's outputs, keyed 'case/what'."""
    return {f"{case}/{key}": value.detach().clone() for case, fn in CASES.items() for key, value in fn().items()}


def write_fixture() -> None:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(compute_all(), FIXTURE)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    if os.environ.get("RAYGEN_WRITE_GOLDEN") == "1":
        write_fixture()
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_seed_outputs_are_unchanged(case, golden):
    got = {f"{case}/{k}": v for k, v in CASES[case]().items()}
    want = {k: v for k, v in golden.items() if k.startswith(f"{case}/")}
    assert sorted(got) == sorted(want), "the recorded outputs differ in keys"
    for key, value in got.items():
        ref = want[key]
        assert value.dtype == ref.dtype and value.shape == ref.shape, key
        if value.is_floating_point():
            tol = LOGITS_TOL if "logits" in key else FLOAT_TOL
            torch.testing.assert_close(value, ref, rtol=FLOAT_TOL, atol=tol, msg=key)
        else:
            assert torch.equal(value, ref), f"{key}: ids changed\n{value}\nvs\n{ref}"


def test_outputs_are_not_trivial(golden):
    """The pinned samples depend on the weights (not uniform noise from zero heads) and on the knobs."""
    a, b = golden["ar/generate/plain"], golden["ar/generate/cfg2"]
    assert not torch.equal(a, b)
    assert not torch.equal(golden["arpg/generate/plain"], golden["arpg_origin/generate/plain"])
    assert not torch.equal(golden["nar/generate/cfg2"], golden["nar/generate/cfg2_interval3"])


COMMON = [("cfg_scale", 1.0), ("steps", None), ("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("generator", None)]
SIGNATURES = {  # (positional after self, keyword-only with defaults) of generate/edit before the refactor
    (ARModel, "generate"): (["labels"], COMMON),
    (ARPGModel, "generate"): (["labels"], COMMON + [("order", "random"), ("schedule", "arccos"),
                                                   ("cfg_schedule", "linear"), ("prefix_tokens", None),
                                                   ("prefix_positions", None)]),
    (ARPGModel, "edit"): (["labels", "tokens", "keep"], COMMON + [("order", "random"), ("schedule", "arccos"),
                                                                  ("cfg_schedule", "linear")]),
    (NARModel, "generate"): (["labels"], COMMON + [("cfg_interval", -1)]),
    (CTFStage1, "generate"): (["labels"], COMMON),
    (CTFStage2, "generate"): (["labels"], COMMON + [("coarse", None), ("restrict", True)]),
    (CTFPair, "generate"): (["labels"], COMMON + [("fine_temperature", 1.0), ("fine_top_k", 0), ("fine_top_p", 1.0),
                                                  ("restrict", True)]),
}


@pytest.mark.parametrize(("cls", "method"), sorted(SIGNATURES, key=lambda k: (k[0].__name__, k[1])))
def test_sampler_signatures_are_unchanged(cls, method):
    """The platform reads family knobs off inspect.signature(model.generate): its keywords are pinned too."""
    params = list(inspect.signature(getattr(cls, method)).parameters.values())[1:]  # without self
    positional, keywords = SIGNATURES[cls, method]
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    assert [(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY] == keywords
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)

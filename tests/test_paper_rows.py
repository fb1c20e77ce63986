"""The family plugins' paper rows (`Family.paper_rows`, the presets of `raygen eval --protocol paper`):
every row names a size of its family, settings raygen accepts, and a parameter count raygen's model of that
size has."""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import pytest
import torch

from raygen import families
from raygen.config import SampleConfig, load_config
from raygen.families.base import PaperRow
from raygen.models.ctf import CTFPair, Lookup
from raygen.models.registry import build_model, family_spec
from raygen.platform.evaluate.protocol import settings

PAPER_FAMILIES = ("ar", "arpg", "nar", "ctf", "emigm", "d2it")  # each has a paper (ar: LlamaGen, via the tables)
ROWS = [(name, row) for name in PAPER_FAMILIES for row in families.get(name).paper_rows]
IDS = [f"{name}-{row.size}-{row.key}" for name, row in ROWS]
CTF_STAGE2 = "aux-L"  # every CTF row's stage 2 is the paper's 343M aux model


@functools.lru_cache(maxsize=None)
def _count(name: str, size: str) -> int:
    with torch.device("meta"):
        return build_model(name, size).num_params()


def _value(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([MB])", text)
    assert m, f"params {text!r} is not a count such as '320M' or '1.46B'"
    return round(float(m.group(1)) * {"M": 1e6, "B": 1e9}[m.group(2)])


@pytest.mark.parametrize("name", PAPER_FAMILIES)
def test_every_family_with_a_paper_has_rows_and_keys_are_unique_per_size(name):
    rows = families.get(name).paper_rows
    assert rows and all(isinstance(r, PaperRow) for r in rows)
    keys = [(r.size, r.key) for r in rows]
    assert len(set(keys)) == len(keys), f"{name}: a key repeats within a size"
    assert all(r.key and " " not in r.key and ":" not in r.key for r in rows)
    assert all(r.paper and r.model and r.params and r.fid is not None and r.fid > 0 for r in rows)


@pytest.mark.parametrize("name, row", ROWS, ids=IDS)
def test_a_rows_size_is_a_raygen_size_at_the_rows_resolution(name, row):
    sizes = family_spec(name).sizes
    assert row.size in sizes and row.size != "debug"
    assert row.resolution == 256 and sizes[row.size].grid_size == 16  # 256 px through the f16 codecs: 16x16 tokens
    assert row.n == 50_000
    assert row.images_per_s is None or row.throughput_setup


@pytest.mark.parametrize("name, row", ROWS, ids=IDS)
def test_a_rows_settings_are_a_valid_sample_config_and_knobs(name, row):
    """The route --protocol paper takes: the row as flags on the config, then the family's own checks."""
    family = families.get(name)
    assert set(row.sample) <= {f.name for f in dataclasses.fields(SampleConfig)}
    assert {"cfg_scale", "steps", "temperature"} <= set(row.sample)  # given, not left to defaults
    cfg = load_config(None, [f"model.family={name}", f"model.size={row.size}"], **settings(row))
    assert cfg.eval.n == row.n
    family.check_sample(cfg.sample)
    knobs = family.check_knobs(cfg.sample.knobs)
    assert {f.name for f in dataclasses.fields(knobs)} == set(row.sample.get("knobs", {}))  # every knob given
    for key, value in row.sample.items():
        if key != "knobs":
            assert getattr(cfg.sample, key) == value


@pytest.mark.parametrize("name, row", ROWS, ids=IDS)
def test_a_rows_params_are_within_3_percent_of_raygens_model(name, row):
    parts = row.params.split("+")
    sizes = [row.size, CTF_STAGE2] if name == "ctf" else [row.size]
    assert len(parts) == len(sizes)
    for text, size in zip(parts, sizes):
        n = _count(name, size)
        assert abs(_value(text) - n) <= 0.03 * n, f"{name} {size}: the paper's {text} vs raygen's {n:,}"


TINY = {"ar": dict(dim=32, n_layer=2, n_head=2), "arpg": dict(dim=32, n_layer=2, n_head=2),
        "nar": dict(dim=32, n_layer=2, n_head=2), "ctf": dict(dim=32, n_layer=2, n_head=2),
        "emigm": dict(dim=32, depth=2, n_head=2, head_depth=1, head_width=32),
        "d2it": dict(dim=32, depth=1, n_head=2, grain_dim=32, grain_depth=1, grain_heads=2)}


def _debug_model(name: str):
    """A tiny model of the family's debug size at the rows' 16x16 grid (the sampler's code paths, not its scores)."""
    if name != "ctf":
        return build_model(name, "debug", **TINY[name])
    v, k = family_spec("ctf").sizes["debug"].vocab_size, 512
    lookup = Lookup(torch.arange(v) % k, torch.arange(k))
    stages = []
    for size in ("debug", "aux-debug"):
        model = build_model("ctf", size, lookup_fingerprint=lookup.fingerprint(), **TINY[name])
        model.bind_lookup(lookup)
        stages.append(model)
    return CTFPair(*stages)


def _code_path(row: PaperRow) -> str:
    """What decides the sampler's code path: steps, knobs and whether it guides (not the scales' values)."""
    knobs = {k: v for k, v in row.sample.get("knobs", {}).items() if k not in ("cfg_t_min", "cfg_t_max")}
    return repr((row.sample.get("steps"), sorted(knobs.items()), row.sample["cfg_scale"] != 1))


@pytest.mark.parametrize("name", PAPER_FAMILIES)
def test_each_rows_settings_sample_with_a_tiny_model(name, one_thread):
    """Each distinct code path of a family's rows, once, through family.generate (steps and knobs accepted)."""
    torch.manual_seed(0)
    family, model = families.get(name), _debug_model(name).eval()
    assert model.config.grid_size == 16
    rows = {_code_path(row): row for row in family.paper_rows}
    for row in rows.values():
        cfg = load_config(None, [], **settings(row))
        out = family.generate(model, torch.tensor([3]), cfg.sample, torch.Generator().manual_seed(0),
                              family.check_knobs(cfg.sample.knobs))
        out = out["latents"] if isinstance(out, dict) else out
        assert out.shape[0] == 1 and math.isfinite(float(out.float().sum()))

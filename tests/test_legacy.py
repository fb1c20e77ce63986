"""Data sets and exports written before the family plugins (raygen fa7443b) still work.

tests/fixtures/legacy/ was written by that commit's own code (tests/fixtures/make_legacy.py):
a schema-version-1 data set (no declared columns), an `ar` export, CTF stage exports and a
CTF pair export, and the ids that code sampled from each export at a fixed seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raygen.config import SampleConfig, load_config
from raygen.platform.data import shards
from raygen.platform.evaluate.sampling import load_export, sample_grid

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def test_a_version_1_data_set_reads_as_declared_ids_and_checks():
    manifest = shards.read_manifest(LEGACY / "data")
    assert manifest["schema_version"] == 1
    col = shards.data_column(manifest)
    assert (col.name, col.kind, col.dtype, col.shape, col.vocab_size) == ("tokens", "ids", "int32", (16,), 16)
    report = shards.check_dataset(LEGACY / "data")
    assert report.ok, report.problems
    assert sum(report.label_counts) == 96 and report.values["tokens"]["max"] < 16


@pytest.mark.parametrize("name", ["export-ar", "export-ctf-stage1", "export-ctf-pair"])
def test_old_exports_load_and_sample_the_same_ids(name):
    expected = torch.load(LEGACY / "expected_tokens.pt", weights_only=True)[name]
    model, meta = load_export(LEGACY / name)
    sample = SampleConfig(**{**meta["sample"], "labels": "0-3", "per_label": 2, "seed": 0})
    assert torch.equal(sample_grid(model, meta, sample, None)["tokens"], expected)


def test_an_old_ctf_stage_2_export_loads_but_does_not_sample_alone():
    from raygen import families

    meta = json.loads((LEGACY / "export-ctf-stage2" / "config.json").read_text())
    family = families.get(meta["family"])
    assert not family.can_sample(meta)
    model, _ = load_export(LEGACY / "export-ctf-stage2")
    assert model.config.stage == 2


def test_an_old_data_set_still_plans_training(tmp_path):
    from raygen.platform.train.driver import plan_training

    cfg = load_config(None, ["model.family=ar", "model.arch.dim=32", "model.arch.n_layer=1", "model.arch.n_head=2",
                             "train.workers=1", "train.global_batch=8", f"workdir={tmp_path}"])
    plan = plan_training(cfg, cluster_cpus=2, cluster_gpus=0, data_dir=str(LEGACY / "data"))
    assert plan.arch["vocab_size"] == 16 and plan.arch["grid_size"] == 4 and plan.column["kind"] == "ids"

"""train.init_from on other data: the class rule (rows by name, null last, new classes fresh), the
vocabulary rule (refused unless train.init_reset=head), and data.classes subsets.

Known answers: tables whose rows are their own row numbers, so every copied row says where it
came from.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from raygen.config import load_config
from raygen.errors import ConfigError
from raygen.models import build_model
from raygen.platform.data import shards
from raygen.platform.evaluate.sampling import write_export
from raygen.platform.train.driver import plan_training
from raygen.platform.train.init import adapt_state, class_mapping, remap_rows, resolve_init
from tests.test_shards import make_dataset

TINY = ["model.arch.dim=32", "model.arch.n_head=2", "train.global_batch=8"]
DEPTH = {"emigm": ["model.arch.depth=1", "model.arch.head_depth=1", "model.arch.head_width=32"]}


def tiny(family: str) -> list[str]:
    return [*TINY, *DEPTH.get(family, ["model.arch.n_layer=2"])]


def test_rows_are_copied_by_class_with_the_rows_around_the_block_kept():
    parent = torch.arange(8.0)[:, None].repeat(1, 2)  # rows: 2 token rows, classes 0..4 at rows 2..6, null at 7
    fresh = torch.full((7, 2), -1.0)  # this run: 2 token rows, 4 classes at rows 2..5, null at 6
    out = remap_rows(parent, fresh, (2, 5), (2, 4), [4, None, 0, 2])
    assert out[:, 0].tolist() == [0, 1, 6, -1, 2, 4, 7]  # class 1 is new: its fresh row stays
    other_vocab = remap_rows(parent, torch.full((9, 2), -1.0), (2, 5), (4, 4), [4, None, 0, 2])
    assert other_vocab[:, 0].tolist() == [-1, -1, -1, -1, 6, -1, 2, 4, 7]  # token rows: another vocabulary's


def test_classes_match_by_name_else_by_index():
    assert class_mapping([str(i) for i in range(10)], ["3", "5", "8"], 10, 3) == (
        [3, 5, 8], "3 of 3 classes matched by name")
    assert class_mapping(["cat", "dog"], ["dog", "owl", "cat"], 2, 3) == (
        [1, None, 0], "2 of 3 classes matched by name")
    assert class_mapping(None, ["a", "b", "c"], 2, 3) == (
        [0, 1, None], "2 of 3 classes matched by index (a side has no class names)")


def _parent(tmp_path, family: str, data_dir, overrides=()):
    """A parent export trained (here: initialised) on `data_dir`, its rows numbered."""
    cfg = load_config(None, [f"workdir={tmp_path}", f"model.family={family}", *tiny(family), *overrides])
    plan = plan_training(cfg, cluster_cpus=2, cluster_gpus=0, data_dir=str(data_dir))
    model = build_model(family, "debug", **plan.arch)
    state = model.state_dict()
    for key in model.class_tables():
        state[key] = torch.arange(state[key].shape[0], dtype=torch.float32)[:, None].expand_as(state[key]).clone()
    m = plan.manifest
    meta = {"family": family, "size": "debug", "arch": plan.arch, "model_config": plan.model_config,
            "data": {"class_names": m.get("class_names"), "tokenizer_fingerprint": m["tokenizer"]["fingerprint"]}}
    return write_export(tmp_path / f"parent-{family}", state, meta), state


def _child(tmp_path, family, data_dir, parent_dir, overrides=()):
    cfg = load_config(None, [f"workdir={tmp_path}", f"model.family={family}", *tiny(family),
                             f"train.init_from={parent_dir}", *overrides])
    plan = plan_training(cfg, cluster_cpus=2, cluster_gpus=0, data_dir=str(data_dir))
    return resolve_init(cfg, plan, f"sqlite:///{tmp_path}/mlflow.db"), plan


def _named(root):
    """The test data set with class names (as a digits or folder source writes them)."""
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "class_names": [str(i) for i in range(10)]}))
    return root


@pytest.mark.parametrize("family", ["ar", "arpg", "emigm"])
def test_a_subset_of_classes_starts_from_the_parents_rows_of_those_classes(tmp_path, family):
    data = _named(make_dataset(tmp_path / "d", codec="pixels" if family == "emigm" else "palette"))
    parent_dir, parent = _parent(tmp_path, family, data)
    init, plan = _child(tmp_path, family, data, parent_dir, ["data.classes=[8,3]"])
    assert plan.arch["num_classes"] == 2 and plan.manifest["class_names"] == ["8", "3"]
    assert init.class_map == [8, 3] and init.fresh == []
    assert init.notes == ["classes: 2 of 2 classes matched by name; the parent has 10"]
    fresh = build_model(family, "debug", **plan.arch).state_dict()
    state = adapt_state(parent, fresh, init)
    (key, ((p0, _), (f0, fc))), = init.tables.items()
    rows = state[key][:, 0].tolist()
    assert rows[f0:f0 + 2] == [p0 + 8, p0 + 3]  # the parent's rows of classes "8" and "3"
    assert rows[f0 + fc:] == parent[key][p0 + 10:, 0].tolist()  # null (and what follows) kept last
    assert all(torch.equal(state[k], parent[k]) for k in state if k != key)
    build_model(family, "debug", **plan.arch).load_state_dict(state)  # it loads strictly


def test_another_vocabulary_needs_init_reset_head_and_then_starts_the_head_afresh(tmp_path):
    data = make_dataset(tmp_path / "d")  # 16 ids
    parent_dir, parent = _parent(tmp_path, "arpg", data, ["model.arch.vocab_size=16"])
    meta = json.loads((parent_dir / "config.json").read_text())
    # the parent made 32 ids: pretend its data came from a bigger palette
    with torch.device("meta"):
        want = build_model("arpg", "debug", **{**meta["arch"], "vocab_size": 32}).state_dict()
    bigger = {k: torch.arange(v.shape[0], dtype=torch.float32)[:, None].expand(v.shape).clone() if v.ndim == 2
              else parent[k] for k, v in want.items()}
    meta["arch"]["vocab_size"] = meta["model_config"]["vocab_size"] = 32
    write_export(parent_dir, bigger, {k: v for k, v in meta.items() if k != "format"})
    with pytest.raises(ConfigError, match=r"has another architecture: vocab_size=32 \(this run: 16\); another "
                                          r"vocabulary \(another codec\): set train.init_reset=head"):
        _child(tmp_path, "arpg", data, parent_dir)
    init, plan = _child(tmp_path, "arpg", data, parent_dir, ["train.init_reset=head"])
    assert init.fresh == ["output.weight"] and init.class_map == list(range(10))
    fresh = build_model("arpg", "debug", **plan.arch).state_dict()
    state = adapt_state(bigger, fresh, init)
    assert torch.equal(state["output.weight"], fresh["output.weight"])
    table = state["embeddings.weight"][:, 0]  # 16 ids + MASK fresh, then classes 33..42 of the parent, null, none
    assert torch.equal(table[:17], fresh["embeddings.weight"][:17, 0])
    assert table[17:].tolist() == list(range(33, 45))


def test_another_architecture_and_unknown_classes_are_refused_before_any_worker(tmp_path):
    data = _named(make_dataset(tmp_path / "d"))
    parent_dir, _ = _parent(tmp_path, "ar", data)
    with pytest.raises(ConfigError, match=r"has another architecture: n_layer=2 \(this run: 3\); fine-tuning needs "
                                          r"the same architecture"):
        _child(tmp_path, "ar", data, parent_dir, ["model.arch.n_layer=3"])
    with pytest.raises(ConfigError, match=r"data.classes: 'cat' is not a class of the data set .*; its classes: 0, 1"):
        _child(tmp_path, "ar", data, parent_dir, ["data.classes=[3,cat]"])


def test_keep_classes_filters_and_relabels_a_batch():
    batch = pa.table({"label": pa.array([0, 3, 5, 3, 9], pa.int64()), "index": pa.array(np.arange(5))})
    out = shards.keep_classes(batch, [5, 3])
    assert out.column("label").to_pylist() == [1, 0, 1] and out.column("index").to_pylist() == [1, 2, 3]


def test_a_class_subset_of_a_real_data_set_counts_its_rows(tmp_path):
    data = _named(make_dataset(tmp_path / "d"))
    m = shards.read_manifest(data)
    labels = np.concatenate([shards.read_rows(data, m, m["rows"])[1]])
    view = shards.class_view(data, m, ["7", "0"])
    assert view["rows"] == int(((labels == 7) | (labels == 0)).sum()) > 0
    assert view["num_classes"] == 2 and view["class_subset"]["ids"] == [7, 0]
    assert dataclasses.asdict(shards.data_info(view))["num_classes"] == 2

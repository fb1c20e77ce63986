"""MLflow runs, the registry and model URIs on a real SQLite store (no Ray needed)."""

from __future__ import annotations

import json

import pytest
import torch

from raygen.config import SampleConfig
from raygen.errors import UserError
from raygen.models.registry import build_model
from raygen.platform import tracking
from raygen.platform.evaluate.sampling import load_export, sample_grid, write_export


def _export(tmp_path, run_id="local"):
    from raygen.models.tokenizers import PaletteConfig, PaletteTokenizer

    arch = {"vocab_size": 4, "num_classes": 3, "grid_size": 4}
    model = build_model("ar", "debug", **arch)
    tok = PaletteTokenizer(PaletteConfig(size=4), image_size=4, channels=1,
                           palette=torch.tensor([[0.0], [80.0], [160.0], [255.0]]))
    meta = {"family": "ar", "size": "debug", "arch": arch, "model_config": {}, "weights": "raw",
            "tokenizer": {**tok.spec(), "fingerprint": tok.fingerprint()},
            "data": {"source": "digits", "num_classes": 3, "grid": [4, 4], "vocab_size": 4},
            "sample": {"cfg_scale": 1.5, "per_label": 2}, "run_id": run_id, "steps": 1}
    return write_export(tmp_path / "export", model.state_dict(), meta), model


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(str(tmp_path / "work"))
    exp = tracking.ensure_experiment(uri, "raygen", str(tmp_path / "work"))
    return uri, exp


def _registered(store, tmp_path):
    """(uri, run id) of a run whose export is registered as digits-ar version 1."""
    uri, exp = store
    run_id = tracking.create_run(uri, exp, "t", {}, {})
    export, _ = _export(tmp_path, run_id)
    tracking.log_artifact(uri, run_id, export, tracking.MODEL_ARTIFACT)
    tracking.register(uri, run_id, "digits-ar", "latest")
    return uri, run_id


def test_default_store_is_sqlite_in_workdir(tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    with socket.socket() as server:  # a server that answers (the URI is checked for reachability)
        server.bind(("127.0.0.1", 0))
        server.listen()
        http = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert tracking.tracking_uri(str(tmp_path), http) == http
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x.db")
    assert tracking.tracking_uri(str(tmp_path), "http://127.0.0.1:5000") == "sqlite:////x.db"


def test_registry_round_trip_and_model_uris(store, tmp_path):
    uri, exp = store
    run_id = tracking.create_run(uri, exp, "t", {"model.family": "ar"}, {})
    export, model = _export(tmp_path, run_id)
    with pytest.raises(UserError, match="has no 'model' artifact"):
        tracking.register(uri, run_id, "digits-ar", "latest")
    tracking.log_artifact(uri, run_id, export, tracking.MODEL_ARTIFACT)
    assert tracking.register(uri, run_id, "digits-ar", "latest") == 1
    assert tracking.register(uri, run_id, "digits-ar") == 2
    tracking.set_alias(uri, "digits-ar", "champion", 2)
    tracking.set_alias(uri, "digits-ar", "first", 1)
    # MLflow's reserved @latest always names the newest version
    assert tracking.list_models(uri) == [{"name": "digits-ar", "versions": [1, 2],
                                          "aliases": {"latest": 2, "champion": 2, "first": 1}}]
    with pytest.raises(UserError, match="newest version"):
        tracking.set_alias(uri, "digits-ar", "latest", 1)
    for ref in ("models:/digits-ar@latest", "models:/digits-ar@first", "models:/digits-ar/2", f"runs:/{run_id}",
                str(export)):
        path, rid = tracking.resolve_model(uri, ref)
        assert (path / "model.pt").is_file() and json.loads((path / "config.json").read_text())["family"] == "ar"
        assert rid == (None if ref == str(export) else run_id)
        loaded, _ = load_export(path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_unknown_names_and_aliases_list_what_exists(store, tmp_path):
    uri, run_id = _registered(store, tmp_path)
    with pytest.raises(UserError, match="no registered model 'digits-arr'; registered: digits-ar"):
        tracking.resolve_model(uri, "models:/digits-arr@latest")
    with pytest.raises(UserError, match="has no alias 'best'; aliases: latest; versions: 1"):
        tracking.resolve_model(uri, "models:/digits-ar@best")
    with pytest.raises(UserError, match="has no version '7'"):
        tracking.resolve_model(uri, "models:/digits-ar/7")
    with pytest.raises(UserError, match="no MLflow run 'nope'"):
        tracking.resolve_model(uri, "runs:/nope")
    with pytest.raises(UserError, match="cannot find model 'elsewhere'"):
        tracking.resolve_model(uri, "elsewhere")
    with pytest.raises(UserError, match="bad alias"):
        tracking.register(uri, run_id, "digits-ar", "v3")


def test_a_sweeps_alias_brings_its_sampling_knobs(store, tmp_path):
    from raygen.platform.evaluate.scoring import resolve_target

    uri, run_id = _registered(store, tmp_path)
    tracking.set_alias(uri, "digits-ar", "best-fid", 1)
    tracking.set_alias(uri, "digits-ar", "best", 1)
    # what a sample sweep tags (raygen.platform.sweep.driver._register); other aliases' tags stay theirs
    tracking.set_version_tags(uri, "digits-ar", 1, {
        "raygen.sweep": "s", "raygen.sweep.best-fid.trial_run": "r", "raygen.sweep.best-fid.sample.cfg_scale": 3.0,
        "raygen.sweep.best-fid.sample.steps": 16, "raygen.sweep.best-fid.sample.knobs.fine_temperature": 0.9,
        "raygen.sweep.best.train.lr": 0.001})
    knobs = {"sample.cfg_scale": 3.0, "sample.knobs.fine_temperature": 0.9, "sample.steps": 16}
    assert tracking.alias_knobs(uri, "models:/digits-ar@best-fid") == knobs
    for ref in ("models:/digits-ar@best", "models:/digits-ar@latest", "models:/digits-ar/1", f"runs:/{run_id}"):
        assert tracking.alias_knobs(uri, ref) == {}
    # the export's defaults (cfg 1.5) < the alias's knobs < flags < key=value overrides
    flags = {"tracking.uri": uri}
    t = resolve_target("models:/digits-ar@best-fid", [], flags)
    assert (t.cfg.sample.cfg_scale, t.cfg.sample.steps, t.cfg.sample.per_label) == (3.0, 16, 2)
    assert t.cfg.sample.knobs == {"fine_temperature": 0.9} and t.knobs == knobs
    assert resolve_target("models:/digits-ar@best-fid", [], {**flags, "sample.cfg_scale": 5.0}).cfg.sample.cfg_scale == 5.0
    assert resolve_target("models:/digits-ar@best-fid", ["sample.steps=4"], flags).cfg.sample.steps == 4
    assert resolve_target("models:/digits-ar@latest", [], flags).cfg.sample.cfg_scale == 1.5


def test_sample_grid_from_an_export(tmp_path):
    export, _ = _export(tmp_path)
    model, meta = load_export(export)
    png = tmp_path / "grid.png"
    out = sample_grid(model, meta, SampleConfig(labels="0-2", per_label=2, seed=1), png)
    assert out["images"].shape == (6, 4, 4, 1) and out["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    from PIL import Image

    assert Image.open(png).size[1] > Image.open(png).size[0] / 3  # 3 rows of 2
    again = sample_grid(model, meta, SampleConfig(labels="0-2", per_label=2, seed=1), None)
    assert torch.equal(again["tokens"], out["tokens"])


def test_cli_models_commands(store, tmp_path, run_cli):
    uri, exp = store
    run_id = tracking.create_run(uri, exp, "t", {}, {})
    export, _ = _export(tmp_path, run_id)
    tracking.log_artifact(uri, run_id, export, tracking.MODEL_ARTIFACT)
    code, out, _ = run_cli("models", "--tracking-uri", uri, "register", run_id, "--name", "m1", "--alias", "latest")
    assert code == 0 and "models:/m1@latest" in out
    code, out, _ = run_cli("models", "--tracking-uri", uri, "list")
    assert code == 0 and "m1: versions 1; @latest->v1" in out
    code, out, _ = run_cli("models", "--tracking-uri", uri, "show", "m1")
    assert code == 0 and f"run {run_id}" in out
    code, _, err = run_cli("models", "--tracking-uri", uri, "show", "m2")
    assert code == 2 and "registered: m1" in err
    png = tmp_path / "s.png"
    code, out, _ = run_cli("sample", "models:/m1@latest", "--tracking-uri", uri, "--labels", "0-1",
                           "--per-label", "3", "--out", str(png))
    assert code == 0 and png.is_file() and "6 samples" in out


def test_unknown_sampling_knob_is_refused(tmp_path):
    from raygen.errors import ConfigError

    export, _ = _export(tmp_path)
    model, meta = load_export(export)
    with pytest.raises(ConfigError, match="unknown sample.knobs order: family ar has no sampling knobs"):
        sample_grid(model, meta, SampleConfig(labels="0", per_label=1, knobs={"order": "raster"}), None)


def test_edit_keeps_known_tokens_and_ar_refuses(tmp_path):
    from PIL import Image

    from raygen.platform.evaluate.sampling import edit_grid, load_edit_inputs

    export, _ = _export(tmp_path)
    model, meta = load_export(export)
    img = tmp_path / "img.png"
    Image.fromarray((torch.arange(16).reshape(4, 4) * 16).to(torch.uint8).numpy(), "L").save(img)
    mask = tmp_path / "mask.png"
    Image.fromarray(((torch.arange(16).reshape(4, 4) % 4 >= 2) * 255).to(torch.uint8).numpy(), "L").save(mask)
    tokens, keep = load_edit_inputs(meta, img, mask)
    assert tokens.shape == (1, 4, 4) and keep.sum() == 8 and bool(keep[:, :2].all())
    with pytest.raises(UserError, match="the ar family cannot edit"):
        edit_grid(model, meta, tokens, keep, SampleConfig(labels="0", per_label=1), None)
    all_black = tmp_path / "black.png"
    Image.new("L", (4, 4), 0).save(all_black)
    with pytest.raises(UserError, match="nothing to regenerate"):
        load_edit_inputs(meta, img, all_black)

"""`raygen eval` and `raygen report` end to end on the shared local Ray: a tiny digits model is
trained once (1 worker, 8 steps), registered, evaluated by an actor pool and reported."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

TINY = ["model.arch.dim=64", "model.arch.n_layer=2", "model.arch.n_head=2", "train.workers=1",
        "train.global_batch=16", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=2",
        "train.checkpoint_every=8", "train.steps=8", "sample.per_label=1", "sample.batch_size=40"]


@pytest.fixture(scope="module")
def workdir(ray_local, tmp_path_factory):
    return tmp_path_factory.mktemp("eval-e2e")  # the digits classifier comes from the session's $RAYGEN_CACHE


@pytest.fixture(scope="module")
def registered(workdir, digits8):
    """(run id, model URI) of a tiny AR trained through Ray Train and registered in MLflow."""
    from raygen.config import load_config
    from raygen.platform import tracking
    from raygen.platform.train.driver import train

    cfg = load_config("demo", [f"workdir={workdir}", "tracking.run_name=eval-tiny", *TINY])
    r = train(cfg, data_dir=str(digits8))
    tracking.register(r.tracking_uri, r.run_id, "eval-tiny", "latest")
    return r.run_id, "models:/eval-tiny@latest"


def _run(workdir, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir.resolve()}/mlflow.db")
    return client, client.get_run(run_id)


def test_eval_logs_eval_metrics_to_the_models_run(workdir, digits8, registered, run_cli, tmp_path):
    run_id, uri = registered
    code, out, err = run_cli("eval", uri, "--n", "40", f"workdir={workdir}", "eval.batch_size=10", "sample.cfg_scale=1.5")
    assert code == 0, err
    assert f"logged to run {run_id}" in out and "40 images on 2 workers" in out
    client, run = _run(workdir, run_id)
    m = run.data.metrics
    assert 0 <= m["eval/class_acc"] <= 1 and m["eval/fd_digits"] > 0 and m["perf/eval_images_per_s"] > 0
    assert "eval/fid" not in m  # no Inception weights configured
    p = run.data.params
    assert p["eval.n"] == "40" and p["eval.sample.cfg_scale"] == "1.5" and p["eval.extractors"].startswith("digits-classifier:")
    assert p["sample.cfg_scale"] == "2.0"  # the training run's own params are untouched
    assert [s for s, _ in [(h.step, h.value) for h in client.get_metric_history(run_id, "eval/fd_digits")]] == [8]
    arts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert any(a.endswith(".json") for a in arts) and any(a.endswith(".png") for a in arts)

    # A reference made from the data set gives the same FD-digits as the implicit real digits, and
    # one worker draws the same samples as two (per-batch seeds).
    ref = tmp_path / "digits8.npz"
    code, out, err = run_cli("eval", "--make-reference", str(digits8), "--out", str(ref), f"workdir={workdir}")
    assert code == 0 and ref.is_file() and "8x8x1 images; digits-classifier (1797 images" in out, err
    code, out, err = run_cli("eval", uri, "--n", "40", "--reference", str(ref), "--workers", "1", f"workdir={workdir}",
                             "eval.batch_size=10", "sample.cfg_scale=1.5")
    assert code == 0, err
    _, run2 = _run(workdir, run_id)
    assert run2.data.metrics["eval/fd_digits"] == pytest.approx(m["eval/fd_digits"], rel=1e-6)  # batching order only
    assert run2.data.metrics["eval/class_acc"] == m["eval/class_acc"]


def test_eval_refuses_what_it_cannot_compare(workdir, registered, run_cli, tmp_path):
    import numpy as np

    from raygen.platform.evaluate.metrics import DIGITS, Reference

    _, uri = registered
    ref = Reference(16, 1, {"name": "digits"})
    ref.add(DIGITS, "0" * 16, np.random.default_rng(0).normal(size=(20, 4)))
    ref.save(tmp_path / "ref16.npz")
    code, _, err = run_cli("eval", uri, "--reference", str(tmp_path / "ref16.npz"), f"workdir={workdir}")
    assert code == 2 and "holds 16x16x1 images but the model makes 8x8x1" in err
    code, _, err = run_cli("eval", uri, "--inception-weights", str(tmp_path / "missing.pth"), f"workdir={workdir}")
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("raygen: error: Inception weights") and "pt_inception-2015-12-05-6726825d.pth" in line
    assert "eval.inception_weights=PATH" in line and "RAYGEN_INCEPTION_WEIGHTS=PATH" in line
    code, _, err = run_cli("eval", f"workdir={workdir}")
    assert code == 2 and "give a MODEL to evaluate" in err


def test_eval_with_inception_weights_and_a_reference_logs_fid_is_precision_recall(workdir, registered, run_cli,
                                                                                  tmp_path, monkeypatch):
    import torch

    from raygen.models.inception import FIDInceptionV3
    from raygen.platform.evaluate import metrics as M
    from raygen.platform.evaluate.digits import digits_split

    run_id, uri = registered
    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)  # random weights: this checks the wiring, not the numbers
    w = M.load_inception_weights(str(weights))
    ref = M.Reference(8, 1, {"name": "digits"})
    real = torch.from_numpy(digits_split()["test_x"][:8])  # (8, 8, 8, 1) uint8
    ref.add(M.INCEPTION, w.fingerprint, M.Extractors(inception_state=w.state)(real)["inception_pool"])
    ref.save(tmp_path / "ref.npz")
    code, out, err = run_cli("eval", uri, "--n", "8", "--reference", str(tmp_path / "ref.npz"), "--inception-weights",
                             str(weights), f"workdir={workdir}", "eval.batch_size=4", "eval.is_splits=2")
    assert code == 0, err
    assert "note: the Inception weights" in out and "not pytorch-fid's release file" in out
    _, run = _run(workdir, run_id)
    m = run.data.metrics
    assert m["eval/fid"] > 0 and m["eval/is"] >= 1 and 0 <= m["eval/precision"] <= 1 and 0 <= m["eval/recall"] <= 1
    assert "eval/fd_digits" in m  # digits metrics still come from the real digits
    # the reference's Inception statistics need weights: without them, the clear error
    monkeypatch.delenv(M.WEIGHTS_ENV, raising=False)
    code, _, err = run_cli("eval", uri, "--reference", str(tmp_path / "ref.npz"), f"workdir={workdir}")
    assert code == 2 and "needs the Inception weights, and none are configured" in err
    assert "RAYGEN_INCEPTION_WEIGHTS=PATH" in err


def test_report_prints_one_table_and_logs_it(workdir, registered, run_cli):
    run_id, _ = registered
    code, out, err = run_cli("eval", f"runs:/{run_id}", "--n", "20", f"workdir={workdir}", "eval.batch_size=10")
    assert code == 0, err
    code, out, err = run_cli("report", run_id, "--workdir", str(workdir))
    assert code == 0, err
    for row in ("family / size", "parameters", "samples/s", "data wait", "images/s", "peak memory", "class_acc",
                "fd_digits", "ar / debug"):
        assert row in out, row
    assert "one batch of 40" in out  # the run's sample.batch_size
    client, run = _run(workdir, run_id)
    assert "report.txt" in {a.path for a in client.list_artifacts(run_id)}
    assert run.data.metrics["perf/sample_images_per_s"] > 0


def _adm_batch(path, images, weights_state):
    """An ADM evaluator reference batch (its .npz layout) of `images` (N, H, W, 3) uint8, its statistics
    made with `weights_state` the way the ADM evaluator makes them with TF's Inception."""
    import numpy as np
    import torch

    from raygen.platform.evaluate import metrics as M

    f = M.Extractors(inception_state=weights_state)(torch.from_numpy(images))
    mu, sigma = M.feature_stats(f["inception_pool"])
    mu_s, sigma_s = M.feature_stats(f["inception_spatial"])
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return f


def test_eval_against_an_adm_reference_batch_records_what_made_the_numbers(workdir, registered, run_cli, tmp_path):
    """An ADM-layout reference scores FID, sFID, precision/recall exactly as a raygen reference holding the same
    statistics and features; the evaluator, extractor and reference (sha256) land in the run and the report."""
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from raygen.models.inception import FIDInceptionV3
    from raygen.platform.data.shards import sha256_file
    from raygen.platform.evaluate import metrics as M
    from raygen.platform.evaluate.digits import digits_split
    from raygen.platform.evaluate.scoring import latest_eval

    run_id, uri = registered
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)  # random weights: the wiring, not the numbers
    w = M.load_inception_weights(str(weights))
    grey = digits_split()["test_x"][:20]  # (20, 8, 8, 1) uint8
    adm = tmp_path / "VIRTUAL_digits8_labeled.npz"
    f = _adm_batch(adm, np.repeat(grey, 3, axis=-1), w.state)
    own = M.Reference(8, 1, {"name": "digits"})
    own.add(M.INCEPTION, w.fingerprint, f["inception_pool"], spatial=f["inception_spatial"])
    own.save(tmp_path / "own.npz")

    common = ["--n", "8", "--inception-weights", str(weights), f"workdir={workdir}", "eval.batch_size=4",
              "eval.is_splits=2"]
    # 20 reference images are more than 4 batches of eval.batch_size=4: the Ray Data actor pool featurises them
    code, out, err = run_cli("eval", uri, "--reference", str(adm), *common)
    assert code == 0, err
    assert "scored as RGB" in out and f"reference {adm.name} (sha256 {sha256_file(adm)[:16]})" in out
    client = MlflowClient(f"sqlite:///{workdir.resolve()}/mlflow.db")
    run = client.get_run(run_id)
    m_adm = {k: v for k, v in run.data.metrics.items() if k in ("eval/fid", "eval/sfid", "eval/precision", "eval/recall")}
    assert len(m_adm) == 4 and m_adm["eval/sfid"] > 0
    tags = run.data.tags
    assert tags["raygen.eval.reference"] == adm.name and tags["raygen.eval.reference_sha256"] == sha256_file(adm)
    assert tags["raygen.eval.evaluator"].startswith("raygen-adm/") and f"inception-v3-fid:{w.fingerprint}" in \
        tags["raygen.eval.extractors"]
    record = latest_eval(f"sqlite:///{workdir.resolve()}/mlflow.db", run_id)  # the eval JSON artifact
    assert record["identity"]["reference"]["kind"] == "adm" and record["identity"]["reference"]["sha256"] == \
        sha256_file(adm)

    code, out, err = run_cli("eval", uri, "--reference", str(tmp_path / "own.npz"), *common)
    assert code == 0, err
    m_own = client.get_run(run_id).data.metrics
    for k, v in m_adm.items():  # the same statistics and features: the same scores
        assert m_own[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k

    code, out, err = run_cli("report", run_id, "--workdir", str(workdir), "--no-sampling")
    assert code == 0, err
    assert "evaluator" in out and "raygen-adm/" in out and "own.npz (raygen" in out and "sfid" in out
    code, out, err = run_cli("report", run_id, f"runs:/{run_id}", "--workdir", str(workdir), "--no-sampling")
    assert code == 0, err
    head, *rows = out.strip().splitlines()
    assert head.split()[:6] == ["model", "params", "steps", "FID", "sFID", "IS"] and len(rows) == 2
    assert f"{m_own['eval/fid']:.2f}" in rows[0]

    # Refused with one line: another resolution; a paper protocol for a size no paper table has.
    _adm_batch(tmp_path / "adm16.npz", np.zeros((4, 16, 16, 3), np.uint8) + np.arange(4, dtype=np.uint8)[:, None, None, None],
               w.state)
    code, _, err = run_cli("eval", uri, "--reference", str(tmp_path / "adm16.npz"), *common)
    assert code == 2 and "holds 16x16x3 images but the model makes 8x8x1" in err
    code, _, err = run_cli("eval", uri, "--protocol", "paper", "--reference", str(adm), *common)
    assert code == 2 and "the paper's table has rows for sizes" in err

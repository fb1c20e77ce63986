"""eMIGM end to end on a real local Ray: the emigm-digits recipe (pixels latents) trained on 2
workers with ZeRO-2, registered, sampled from models:/ through its codec, and its sweep presets:
both pass --dry-run, and the sample-time one runs (fewer samples and trials than it ships with)."""

from __future__ import annotations

import pytest
import yaml

pytestmark = pytest.mark.e2e


def test_emigm_digits_trains_registers_samples_and_sweeps(ray_local, tmp_path, run_cli):
    data = tmp_path / "digits-pixels"
    code, out, err = run_cli("tokenize", "--preset", "emigm-digits", "--out", str(data), f"workdir={tmp_path}")
    assert code == 0 and "latents 64x1 float16" in out, err
    code, out, err = run_cli("train", "--preset", "emigm-digits", "--data", str(data), f"workdir={tmp_path}",
                             "train.steps=20", "train.log_every=10", "train.checkpoint_every=20",
                             "train.warmup_steps=5", "sample.per_label=2")
    assert code == 0, err
    run_id = next(ln for ln in out.splitlines() if ln.startswith("run ")).split()[1].rstrip(":")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    loss = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert len(loss) == 2 and loss[-1] < loss[0]
    code, _, err = run_cli("models", "--workdir", str(tmp_path), "register", run_id, "--name", "digits-emigm",
                           "--alias", "latest")
    assert code == 0, err
    code, out, err = run_cli("sample", "models:/digits-emigm@latest", f"workdir={tmp_path}", "--labels", "0-9",
                             "--per-label", "2", "--out", str(tmp_path / "grid.png"), "--eval")
    assert code == 0 and "20 samples" in out and "eval/class_acc" in out, err
    assert (tmp_path / "grid.png").is_file()

    code, out, err = run_cli("sweep", "emigm-sampling", "--dry-run", f"workdir={tmp_path}")
    assert code == 0 and "trials: 16 (16 sample(s)" in out, err
    code, out, err = run_cli("sweep", "emigm-masking", "--dry-run", "--data", str(data), f"workdir={tmp_path}")
    assert code == 0 and "trials: 9 (1 sample(s) x 9 grid point(s))" in out, err

    from raygen.platform.sweep.spec import load_spec

    shipped = yaml.safe_load(open(load_spec("emigm-sampling").source))
    small = {**shipped, "name": "emigm-sampling-small", "n": 10, "num_samples": 2, "overrides": ["eval.batch_size=10"]}
    spec = tmp_path / "emigm-sampling-small.yaml"
    spec.write_text(yaml.safe_dump(small))
    code, out, err = run_cli("sweep", str(spec), f"workdir={tmp_path}")
    assert code == 0, err
    assert "registered: models:/digits-emigm@best-fid" in out
    exp = client.get_experiment_by_name("raygen")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`raygen.sweep` = 'emigm-sampling-small'")
    trials = [c for c in children if "raygen.sweep.trial" in c.data.tags]
    assert len(trials) == 2 and all(c.info.status == "FINISHED" for c in trials)
    assert all("eval/fd_digits" in c.data.metrics and "sample.knobs.solver_steps" in c.data.params for c in trials)

"""Continuous latents end to end on a real local Ray: `pixels` shards, `data check`, and a
continuous family (tests/latent_family.py, registered from outside raygen) trained through Ray
Train + DeepSpeed on 2 workers, exported, sampled and decoded through the data set's codec."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e


def test_pixels_shards_check_and_a_continuous_family_trains_on_them(ray_local, tmp_path, run_cli):
    import latent_family  # noqa: F401 - registers `latent-mean` (Ray workers import it by module name)

    data = tmp_path / "digits-pixels"
    code, out, err = run_cli("tokenize", "--source", "digits", "--tokenizer", "pixels", "--out", str(data),
                             "data.image_size=8", "data.resize=false")
    assert code == 0, err
    assert "1797 rows" in out and "latents 64x1 float16" in out
    code, out, _ = run_cli("data", "check", str(data))
    assert code == 0 and "column       latents: latents 64x1 float16, scale 1" in out and "check        OK" in out

    code, out, err = run_cli("train", "--data", str(data), f"workdir={tmp_path}", "model.family=latent-mean",
                             "train.workers=2", "train.zero_stage=2", "train.global_batch=64", "train.steps=60",
                             "train.lr=0.05", "train.warmup_steps=5", "train.log_every=20", "train.checkpoint_every=30",
                             "train.weight_decay=0", "sample.per_label=10", "sample.temperature=0.3")
    assert code == 0, err
    run_id = next(ln for ln in out.splitlines() if ln.startswith("run ")).split()[1].rstrip(":")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    history = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert len(history) == 3 and history[-1] < history[0]
    acc = client.get_run(run_id).data.metrics["eval/class_acc"]
    assert acc >= 0.8  # per-class mean digits, decoded exactly by the pixels codec, read by the classifier
    export = client.download_artifacts(run_id, "model", str(tmp_path / "dl"))
    meta = json.loads((tmp_path / "dl" / "model" / "config.json").read_text())
    assert meta["data"]["column"]["kind"] == "latents" and meta["tokenizer"]["name"] == "pixels"
    code, out, err = run_cli("sample", export, f"workdir={tmp_path}", "--labels", "0-9", "--per-label", "3",
                             "--out", str(tmp_path / "grid.png"), "--eval")
    assert code == 0 and "30 samples" in out and "eval/class_acc" in out, err

    code, _, err = run_cli("train", "--data", str(data), f"workdir={tmp_path}", "model.family=ar", "--dry-run")
    assert code == 2 and "holds latents (latents); family ar trains on ids" in err

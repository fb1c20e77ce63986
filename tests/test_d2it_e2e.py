"""D2iT end to end on a real local Ray: the Dynamic VAE trained through the platform (2 workers,
ZeRO-2) and registered; the digits tokenized with it from models:/ (coarse latents, fine latents
and the entropy grain map as side columns, r_f honoured); both transformers trained in one run;
the pair sampled from models:/ with the grain maps written beside the samples, for each of the
paper's three grain-map sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

SHORT = ["train.steps=10", "train.log_every=5", "train.checkpoint_every=10", "train.warmup_steps=2",
         "train.global_batch=32"]


def test_dvae_then_d2it_train_register_tokenize_and_sample_with_grain_maps(ray_local, tmp_path, run_cli):
    images = tmp_path / "digits-images"
    code, out, err = run_cli("tokenize", "--preset", "dvae-digits", "--out", str(images), f"workdir={tmp_path}")
    assert code == 0, err
    code, out, err = run_cli("train", "--preset", "dvae-digits", "--data", str(images), f"workdir={tmp_path}",
                             *SHORT, "train.sample_every=null")
    assert code == 0 and "reconstruction PSNR" in out, err
    dvae_run = next(ln for ln in out.splitlines() if ln.startswith("run ")).split()[1].rstrip(":")
    code, _, err = run_cli("models", "--workdir", str(tmp_path), "register", dvae_run, "--name", "digits-dvae",
                           "--alias", "latest")
    assert code == 0, err

    data = tmp_path / "digits-dvae"
    code, out, err = run_cli("tokenize", "--preset", "d2it-digits", "--out", str(data), f"workdir={tmp_path}",
                             "tokenizer.dvae.fine_ratio=0.4")
    assert code == 0, err
    assert "grid 4x4, latents 16x4 float32" in out and "(models:/digits-dvae/1)" in out
    assert "side column fine: 64x4 float32" in out and "side column grain: 16 uint8" in out
    assert "grain map: fine where entropy >" in out and "(r_f = 0.4)" in out
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["columns"]["grain"] == {"kind": "side", "dtype": "uint8", "shape": [16], "vocab_size": 2}
    import pyarrow.parquet as pq

    grain = np.concatenate([np.stack(pq.read_table(data / s["file"], columns=["grain"]).column("grain")
                                     .to_numpy(zero_copy_only=False)) for s in manifest["shards"]])
    # fitted on 1024 of the 1797 digits: the whole set's fine fraction lands near r_f (flat regions tie at 0)
    assert abs(grain.mean() - 0.4) < 0.05, grain.mean()
    code, out, _ = run_cli("data", "check", str(data))
    assert code == 0 and "check        OK" in out

    code, out, err = run_cli("train", "--preset", "d2it-digits", "--data", str(data), f"workdir={tmp_path}",
                             *SHORT, "sample.per_label=1", "sample.steps=5")
    assert code == 0, err
    run_id = next(ln for ln in out.splitlines() if ln.startswith("run ")).split()[1].rstrip(":")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    assert {"train/loss_coarse", "train/loss_fine", "train/grain_loss", "train/grain_acc", "train/fine_frac"} <= set(
        metrics)
    assert 0.3 < metrics["train/fine_frac"] < 0.5
    grids = sorted(a.path for a in client.list_artifacts(run_id, "samples"))
    assert len(grids) == 2 and grids[0].endswith("-samples-grain.png") and grids[1].endswith("-samples.png")
    code, _, err = run_cli("models", "--workdir", str(tmp_path), "register", run_id, "--name", "digits-d2it",
                           "--alias", "latest")
    assert code == 0, err
    for source in ("predicted", "random", "data"):
        grid = tmp_path / f"{source}.png"
        code, out, err = run_cli("sample", "models:/digits-d2it@latest", f"workdir={tmp_path}", "--labels", "0-9",
                                 "--per-label", "1", "--steps", "5", "--out", str(grid),
                                 f"sample.knobs.grain_source={source}")
        assert code == 0 and "10 samples" in out, err
        assert grid.is_file() and (tmp_path / f"{source}-grain.png").is_file()
        assert f"beside them: {tmp_path / f'{source}-grain.png'}" in out
    code, _, err = run_cli("sample", "models:/digits-d2it@latest", f"workdir={tmp_path}", "--top-k", "5")
    assert code == 2 and "sample.top_k=5 / sample.top_p=1.0 filter token ids" in err and "Traceback" not in err

    # sweeps: r_f makes one data set per value (tokenized before the trials), RefineNet depth trains on one
    code, out, err = run_cli("sweep", "d2it-fine-ratio", "--dry-run", f"workdir={tmp_path}")
    assert code == 0 and "trials: 3 (1 sample(s) x 3 grid point(s))" in out, err
    assert "3 data sets, one per value of tokenizer.dvae.fine_ratio" in out and "(3 tokenized first)" in out
    code, out, err = run_cli("sweep", "d2it-fine-ratio", "--dry-run", "--data", str(data), f"workdir={tmp_path}")
    assert code == 2 and "searches tokenizer.dvae.fine_ratio" in err
    code, out, err = run_cli("sweep", "d2it-refine", "--dry-run", "--data", str(data), f"workdir={tmp_path}")
    assert code == 0 and "trials: 3 (1 sample(s) x 3 grid point(s))" in out, err

"""A tokenizer trained on the platform, end to end on a real local Ray: image shards, the vae family
on 2 workers with ZeRO-2 and its critic (restarted from a checkpoint mid-run), the reconstruction
metrics and grids, registration, and `raygen tokenize` encoding a data set from models:/."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e


def test_a_vae_trains_with_its_critic_restarts_registers_and_tokenizes_from_the_registry(ray_local, tmp_path,
                                                                                         run_cli):
    images = tmp_path / "digits-images"
    code, out, err = run_cli("tokenize", "--source", "digits", "--tokenizer", "images", "--out", str(images),
                             "data.image_size=16", "data.resize=true")
    assert code == 0, err
    assert "grid 16x16, images 16x16x1 uint8, 10 classes, codec images" in out
    code, out, _ = run_cli("data", "check", str(images))
    assert code == 0 and "column       images: images 16x16x1 uint8" in out and "check        OK" in out

    base = ["--data", str(images), f"workdir={tmp_path}", "model.family=vae"]
    code, _, err = run_cli("train", *base, f"vae.perceptual_weights={tmp_path / 'lpips.pt'}", "--dry-run")
    assert code == 2 and "vae.perceptual_weights: " in err and "lpips.pt" in err and "Traceback" not in err
    code, _, err = run_cli("train", *base, "model.arch.image_size=32", "--dry-run")
    assert code == 2 and "model.arch.image_size=32 does not match the data set" in err

    # The critic starts at step 20; a worker dies at step 25, after the step-20 checkpoint: the
    # restarted group restores the model's and the critic's engines and finishes.
    code, out, err = run_cli("train", *base, "train.workers=2", "train.zero_stage=2", "train.global_batch=32",
                             "train.steps=40", "train.lr=2e-3", "train.warmup_steps=5", "train.weight_decay=0",
                             "train.log_every=10", "train.checkpoint_every=20", "train.sample_every=20",
                             "train.fail_at_step=25", "train.max_failures=1", "model.arch.disc_weight=0.1",
                             "model.arch.disc_start=20", "model.arch.disc_ndf=16", "model.arch.disc_layers=2")
    assert code == 0, err
    assert "reconstruction PSNR" in out
    run_id = next(ln for ln in out.splitlines() if ln.startswith("run ")).split()[1].rstrip(":")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    l1 = {m.step: m.value for m in client.get_metric_history(run_id, "train/l1")}
    assert sorted(l1) == [10, 20, 30, 40] and l1[40] < 0.7 * l1[10]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/critic_loss")) == [30, 40]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/psnr"] > 15 and 0 <= metrics["eval/class_acc"] <= 1 and "eval/fd_digits" in metrics
    grids = [a.path for a in client.list_artifacts(run_id, "reconstructions")]
    assert grids == ["reconstructions/reconstructions_step00000020.png", "reconstructions/reconstructions_step00000040.png"]
    meta = json.loads(open(client.download_artifacts(run_id, "model/config.json", str(tmp_path / "dl"))).read())
    assert meta["family"] == "vae" and meta["arch"]["scale"] == meta["model_config"]["scale"] > 0

    code, _, err = run_cli("sample", f"runs:/{run_id}", f"workdir={tmp_path}")
    assert code == 2 and "is a codec: it reconstructs images and does not sample" in err and "Traceback" not in err
    code, out, err = run_cli("models", "--workdir", str(tmp_path), "register", run_id, "--name", "digits-vae",
                             "--alias", "latest")
    assert code == 0, err
    code, _, err = run_cli("tokenize", "--source", "digits", "--tokenizer", "kl", "--out", str(tmp_path / "x"),
                           f"workdir={tmp_path}", "tokenizer.kl.checkpoint=models:/digits-vae@latest",
                           "data.image_size=32")
    assert code == 2 and "was trained on 16 px images; set data.image_size=16" in err and "Traceback" not in err
    # Posterior moments of each digit and of its mirror image, as MAR caches them
    latents = tmp_path / "digits-latents"
    code, out, err = run_cli("tokenize", "--source", "digits", "--tokenizer", "kl", "--out", str(latents),
                             f"workdir={tmp_path}", "tokenizer.kl.checkpoint=models:/digits-vae@latest",
                             "tokenizer.posterior=moments+flip", "tokenizer.latent_dtype=float32")
    assert code == 0, err
    assert "grid 8x8, latents 64x4 float32" in out and "(models:/digits-vae/1)" in out  # 16 px: the vae's size
    manifest = json.loads((latents / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    assert tok["registry"] == {"reference": "models:/digits-vae@latest", "run_id": run_id, "name": "digits-vae",
                               "version": 1}
    assert tok["config"]["scale"] == meta["arch"]["scale"] and manifest["columns"]["latents"]["scale"] == tok["config"]["scale"]
    assert manifest["columns"]["latents"]["moments"] == 2
    code, out, _ = run_cli("data", "check", str(latents))
    assert code == 0 and "check        OK" in out and "posterior moments of 2 views" in out

    import pyarrow.parquet as pq
    import torch

    from raygen.models.tokenizers import from_spec
    from raygen.platform.data.shards import read_rows

    codec = from_spec(tok)
    row = pq.read_table(latents / manifest["shards"][0]["file"]).slice(0, 1).to_pylist()[0]
    stored = torch.tensor(row["latents"]).reshape(2, 2, 64, 4)  # (view, mean/logvar, L, D)
    image, _ = read_rows(images, json.loads((images / "manifest.json").read_text()), 1)
    image = torch.from_numpy(image)  # the same digit (row order is the source's)
    for view, x in enumerate([image, image.flip(2)]):
        mean, logvar = codec.encode_moments(x)
        torch.testing.assert_close(stored[view, 0], mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stored[view, 1], logvar[0], rtol=1e-4, atol=1e-5)

"""Declared shard schemas (ids, latents), the `pixels` codec, and bad data found before or at the
first bad batch: checksums at plan time, value checks per batch naming shard and row, and a
codec whose fingerprint no longer matches its manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raygen.errors import DataError
from raygen.models.tokenizers import PaletteConfig, PaletteTokenizer, PixelsCodec, PixelsConfig, from_spec
from raygen.platform.data import shards
from raygen.platform.evaluate.digits import digits_split
from raygen.platform.data.tokenize import column_of


def make_dataset(out: Path, codec: str = "palette", rows: int = 100, rows_per_shard: int = 40) -> Path:
    """A data set of real digits as `raygen tokenize` writes it (here without Ray)."""
    data = digits_split()
    images = torch.from_numpy(data["train_x"][:rows])  # (N, 8, 8, 1) uint8
    if codec == "palette":
        tok = PaletteTokenizer.fit(PaletteConfig(size=16), images, image_size=8, channels=1)
    else:
        tok = PixelsCodec(PixelsConfig(patch=2), image_size=8, channels=1)
    col = column_of(tok, "float16")
    writer = shards.ShardWriter(out, [col], rows_per_shard)
    encoded = tok.encode(images)
    writer.add({col.name: encoded.reshape(rows, -1).numpy()}, np.asarray(data["train_y"][:rows]), np.arange(rows))
    writer.finish({"schema_version": shards.SCHEMA_VERSION, "request": {}, "skipped": [],
                   "source": {"name": "digits", "path": None, "image_size": 8, "channels": 1, "rows": rows},
                   "tokenizer": {**tok.spec(), "fingerprint": tok.fingerprint()}, "grid": list(tok.grid),
                   **({"vocab_size": tok.vocab_size} if tok.kind == "ids" else {}), "num_classes": 10})
    return out


def rewrite_shard(root: Path, name: str, column: str, edit) -> None:
    """Change one shard's column values and update its checksum (a consistent but bad data set)."""
    path = root / name
    table = pq.read_table(path)
    values = np.stack(table.column(column).to_numpy(zero_copy_only=False)).copy()
    edit(values)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=table.schema.field(column).type.value_type),
                                            values.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, arr), path)
    manifest = json.loads((root / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["file"] == name:
            s["sha256"] = shards.sha256_file(path)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_pixels_round_trip_is_exact_through_float16():
    codec = PixelsCodec(PixelsConfig(patch=2), image_size=8, channels=3)
    images = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    z = codec.encode(images)
    assert z.shape == (5, 16, 12) and codec.latent_shape == (16, 12)
    assert float(z.min()) >= -1 and float(z.max()) <= 1
    assert torch.equal(codec.decode(z.half().float()), images)
    # patch (0, 0) of image 0, channel-last within the patch: pixels (0,0), (0,1), (1,0), (1,1)
    assert torch.allclose(z[0, 0], (images[0, :2, :2].reshape(-1).float() / 127.5 - 1))
    again = from_spec(codec.spec())
    assert isinstance(again, PixelsCodec) and again.fingerprint() == codec.fingerprint()


def test_a_latent_data_set_declares_its_columns_and_checks(tmp_path):
    root = make_dataset(tmp_path / "px", codec="pixels")
    manifest = shards.read_manifest(root)
    assert manifest["schema_version"] == 2 and "vocab_size" not in manifest
    col = shards.data_column(manifest)
    assert (col.name, col.kind, col.dtype, col.shape, col.scale) == ("latents", "latents", "float16", (16, 4), 1.0)
    info = shards.data_info(manifest)
    assert (info.kind, info.grid, info.token_dim, info.vocab_size) == ("latents", (4, 4), 4, None)
    assert pq.read_schema(root / "shard-00000.parquet").field("latents").type == pa.list_(pa.float16(), 64)
    report = shards.check_dataset(root)
    assert report.ok, report.problems
    v = report.values["latents"]
    assert -1 <= v["min"] < v["max"] <= 1 and 0 < v["std"] < 1
    text = shards.format_report(root, report)
    assert "column       latents: latents 16x4 float16, scale 1" in text and "check        OK" in text


def test_data_check_finds_non_finite_latents_and_ids_out_of_range(tmp_path):
    px = make_dataset(tmp_path / "px", codec="pixels")
    rewrite_shard(px, "shard-00001.parquet", "latents", lambda v: v.__setitem__((3, 5), np.nan))
    report = shards.check_dataset(px)
    assert report.problems == ["shard-00001.parquet has 1 non-finite latent values in column latents"]
    ids = make_dataset(tmp_path / "ids")
    rewrite_shard(ids, "shard-00002.parquet", "tokens", lambda v: v.__setitem__((7, 0), 99))
    report = shards.check_dataset(ids)
    assert report.problems == ["shard-00002.parquet has token ids in [0, 99], outside [0, 16) in column tokens"]


def test_data_check_rebuilds_the_codec_and_compares_its_fingerprint(tmp_path):
    root = make_dataset(tmp_path / "ids")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer"]["state"]["palette"][3][0] += 1  # the palette no longer matches its fingerprint
    (root / "manifest.json").write_text(json.dumps(manifest))
    report = shards.check_dataset(root)
    assert len(report.problems) == 1
    assert "the codec rebuilt from the manifest's spec and weights has fingerprint" in report.problems[0]


def test_training_plan_verifies_checksums(tmp_path):
    from raygen.config import load_config
    from raygen.errors import UserError
    from raygen.platform.train.driver import plan_training

    root = make_dataset(tmp_path / "ids")
    table = pq.read_table(root / "shard-00001.parquet")
    pq.write_table(table, root / "shard-00001.parquet", compression="gzip")  # same rows, other bytes
    cfg = load_config(None, ["model.arch.dim=32", "model.arch.n_layer=1", "model.arch.n_head=2", "train.workers=1",
                             "train.global_batch=8", f"workdir={tmp_path}"])
    with pytest.raises(UserError, match=r"is damaged: shard-00001.parquet checksum differs from the manifest"):
        plan_training(cfg, cluster_cpus=2, cluster_gpus=0, data_dir=str(root))


def test_a_bad_batch_is_refused_on_the_worker_naming_shard_and_row(tmp_path):
    from raygen.platform.train.loop import BatchChecker

    root = make_dataset(tmp_path / "ids")
    manifest = shards.read_manifest(root)
    column = {"name": "tokens", **shards.data_column(manifest).to_json()}
    check = BatchChecker.of(column, str(root), manifest)
    table = pq.read_table(root / "shard-00002.parquet")  # rows 80..99 of the source
    batch = {"tokens": torch.from_numpy(np.stack(table.column("tokens").to_numpy(zero_copy_only=False))).long(),
             "label": torch.from_numpy(table.column("label").to_numpy()).long(),
             "index": torch.from_numpy(table.column("index").to_numpy())}
    good = check(batch, torch.device("cpu"))
    assert good["tokens"].shape == (20, 64) and set(good) == {"tokens", "label"}
    batch["tokens"][6, 10] = 16
    with pytest.raises(DataError, match=r"shard-00002.parquet row 6 \(source row 86\) has token id 16 outside "
                                        r"\[0, 16\); the data set changed after it was written"):
        check(batch, torch.device("cpu"))


def test_a_latent_batch_is_reshaped_and_non_finite_values_refused(tmp_path):
    from raygen.platform.train.loop import BatchChecker

    root = make_dataset(tmp_path / "px", codec="pixels")
    manifest = shards.read_manifest(root)
    check = BatchChecker.of({"name": "latents", **shards.data_column(manifest).to_json()}, str(root), manifest)
    batch = {"latents": torch.zeros(4, 64), "label": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}
    assert check(batch, torch.device("cpu"))["latents"].shape == (4, 16, 4)
    batch["latents"][2, 0] = float("inf")
    with pytest.raises(DataError, match=r"shard-00000.parquet row 2 \(source row 2\) has a non-finite latent value"):
        check(batch, torch.device("cpu"))


def test_side_columns_reach_the_model_reshaped_and_out_of_range_values_are_refused(tmp_path):
    from raygen.platform.train.loop import BatchChecker

    root = make_dataset(tmp_path / "px", codec="pixels")
    manifest = shards.read_manifest(root)
    sides = [{"name": "fine", **shards.Column("fine", "side", "float16", (8, 2)).to_json()},
             {"name": "grain", **shards.Column("grain", "side", "uint8", (4,), vocab_size=2).to_json()}]
    check = BatchChecker.of({"name": "latents", **shards.data_column(manifest).to_json()}, str(root), manifest, sides)
    assert check.side_dtypes() == {"fine": torch.float32, "grain": torch.long}
    batch = {"latents": torch.zeros(3, 64), "fine": torch.randn(3, 16), "grain": torch.tensor([[0, 1, 1, 0]] * 3),
             "label": torch.zeros(3, dtype=torch.long), "index": torch.arange(3)}
    out = check(batch, torch.device("cpu"))
    assert out["fine"].shape == (3, 8, 2) and torch.equal(out["fine"].flatten(1), batch["fine"])
    assert out["grain"].shape == (3, 4) and set(out) == {"latents", "fine", "grain", "label"}
    batch["grain"][1, 2] = 2
    with pytest.raises(DataError, match=r"shard-00000.parquet row 1 \(source row 1\) has grain value 2 outside \[0, 2\)"):
        check(batch, torch.device("cpu"))
    batch["grain"][1, 2] = 1
    batch["fine"][0, 3] = float("nan")
    with pytest.raises(DataError, match=r"row 0 \(source row 0\) has a non-finite fine value"):
        check(batch, torch.device("cpu"))
    # `raygen data check` applies the same rules to side columns
    assert shards.check_values(shards.Column("grain", "side", "uint8", (4,), vocab_size=2),
                               np.array([0, 1, 3], np.uint8)) == "grain values in [0, 3], outside [0, 2)"
    assert "non-finite" in shards.check_values(shards.Column("fine", "side", "float32", (2,)),
                                               np.array([0.0, np.inf], np.float32))


def test_a_manifest_with_an_unknown_column_kind_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ids")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["columns"]["tokens"]["kind"] = "voxels"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"must declare exactly one data column \(ids or latents or images\)"):
        shards.read_manifest(root)


def test_rows_of_posterior_moments_become_one_drawn_latent_per_read():
    """A view is drawn uniformly; the latent is mean + exp(logvar / 2) * noise from the generator."""
    from raygen.platform.train.loop import draw_latents

    b, l, d = 4000, 3, 2
    mean = torch.stack([torch.full((b, l, d), 1.0), torch.full((b, l, d), -1.0)], 1)  # views 0, 1
    logvar = torch.stack([torch.full((b, l, d), math.log(0.25)), torch.full((b, l, d), -30.0)], 1)
    moments = torch.stack([mean, logvar], 2)  # (B, V, 2, L, D)
    z = draw_latents(moments, torch.Generator().manual_seed(0))
    assert z.shape == (b, l, d)
    mirror = (z + 1).abs().amax(dim=(1, 2)) < 1e-5  # view 1: variance e^-30, the mean itself
    assert 0.45 < mirror.float().mean() < 0.55  # each view about half the time
    own = z[~mirror]
    assert abs(float(own.mean()) - 1.0) < 0.02 and abs(float(own.std()) - 0.5) < 0.02
    again = draw_latents(moments, torch.Generator().manual_seed(0))
    assert torch.equal(z, again)  # the generator decides everything

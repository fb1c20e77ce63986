"""The tokenize job on a real local Ray: shards, manifest, idempotence, bad input, `data check`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import write_image_folder, write_image_parquet

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def digits_dir(ray_local, tmp_path_factory):
    from raygen.cli import main

    out = tmp_path_factory.mktemp("data") / "digits"
    assert main(["tokenize", "--source", "digits", "--tokenizer", "palette", "--out", str(out)]) == 0
    return out


def test_digits_palette_writes_1797_rows(digits_dir):
    m = json.loads((digits_dir / "manifest.json").read_text())
    assert m["rows"] == 1797 and m["source"]["rows"] == 1797
    assert m["grid"] == [16, 16] and m["vocab_size"] == 16 and m["num_classes"] == 10
    assert [s["rows"] for s in m["shards"]] == [512, 512, 512, 261]
    assert m["tokenizer"]["name"] == "palette" and len(m["tokenizer"]["fingerprint"]) == 16
    assert m["skipped"] == []
    table = pq.read_table(digits_dir / m["shards"][0]["file"])
    assert str(table.schema.field("tokens").type) == "fixed_size_list<element: int32>[256]"
    idx = np.concatenate([pq.read_table(digits_dir / s["file"]).column("index").to_numpy() for s in m["shards"]])
    assert sorted(idx.tolist()) == list(range(1797))
    assert not list(digits_dir.parent.glob(".digits.staging-*"))


def test_tokens_decode_back_to_the_quantized_digits(digits_dir):
    from raygen.models.tokenizers import from_spec
    from raygen.platform.data.sources import ImageDecoder, open_source

    import torch

    m = json.loads((digits_dir / "manifest.json").read_text())
    tok = from_spec(m["tokenizer"])
    row = pq.read_table(digits_dir / "shard-00000.parquet").slice(0, 4).to_pydict()
    tokens = torch.tensor(row["tokens"]).reshape(4, 16, 16)
    src = open_source("digits", None)
    dec = ImageDecoder("digits", image_size=16, channels=1, resize=True, on_bad_input="fail")
    items = [src.items[i] for i in row["index"]]
    images = dec({k: np.array([it[k] for it in items], dtype=object) for k in items[0]})["image"]
    # Palette decoding reproduces each pixel within half the gap between palette entries.
    err = (tok.decode(tokens).int() - torch.from_numpy(images).int()).abs().max()
    gaps = tok.palette[1:, 0] - tok.palette[:-1, 0]
    assert err <= gaps.max() / 2 + 1


def test_data_check_passes_and_summarises(digits_dir, run_cli):
    code, out, _ = run_cli("data", "check", str(digits_dir))
    assert code == 0
    assert "rows         1797 in 4 shards" in out and "check        OK" in out


def test_rerun_is_a_noop(digits_dir, run_cli):
    before = {p.name: p.stat().st_mtime_ns for p in digits_dir.iterdir()}
    code, out, _ = run_cli("tokenize", "--out", str(digits_dir))
    assert code == 0 and "already up to date" in out
    assert {p.name: p.stat().st_mtime_ns for p in digits_dir.iterdir()} == before


def test_other_settings_refuse_then_overwrite_replaces(digits_dir, tmp_path, run_cli):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digits_dir, out)
    code, _, err = run_cli("tokenize", "--out", str(out), "tokenizer.palette.size=8")
    assert code == 2 and "made with other settings" in err and "tokenizer.config.size: 16 there, 8 now" in err
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 16  # untouched
    code, _, _ = run_cli("tokenize", "--out", str(out), "tokenizer.palette.size=8", "--overwrite")
    assert code == 0
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 8
    assert run_cli("data", "check", str(out))[0] == 0


def test_data_check_catches_tampering(digits_dir, tmp_path, run_cli):
    import shutil

    out = tmp_path / "tampered"
    shutil.copytree(digits_dir, out)
    table = pq.read_table(out / "shard-00001.parquet")
    pq.write_table(table.slice(0, 100), out / "shard-00001.parquet")
    code, stdout, _ = run_cli("data", "check", str(out))
    assert code == 2
    assert "shard-00001.parquet has 100 rows, the manifest says 512" in stdout
    assert "checksum differs" in stdout
    # ... and a re-run refuses to call the damaged set up to date
    code, _, err = run_cli("tokenize", "--out", str(out))
    assert code == 2 and "damaged" in err


def test_foreign_directory_is_never_replaced(ray_local, tmp_path, run_cli):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, _, err = run_cli("tokenize", "--out", str(out), "--overwrite")
    assert code == 2 and "holds files raygen did not write (thesis.tex)" in err
    assert (out / "thesis.tex").read_text() == "precious"


def test_folder_corrupt_image_fails_with_path_and_writes_nothing(ray_local, tmp_path, run_cli):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    bad = root / "cat" / "zz-broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    code, _, err = run_cli("tokenize", "--source", "folder", "--path", str(root), "--out", str(out),
                           "data.image_size=8", "tokenizer.palette.fit_images=2")
    # Ray Data's own progress log shares stderr; raygen's part is one line at the end, no traceback
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("raygen: error: cannot read image") and str(bad) in last
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))


def test_folder_skip_records_bad_inputs(ray_local, tmp_path, run_cli):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "out"
    code, stdout, _ = run_cli("tokenize", "--source", "folder", "--path", str(root), "--out", str(out),
                              "data.image_size=8", "data.on_bad_input=skip", "tokenizer.palette.size=32")
    assert code == 0 and "1 skipped" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows"] == 8 and m["source"]["rows"] == 9 and m["num_classes"] == 2
    assert m["source"]["channels"] == 3
    assert [s["input"] for s in m["skipped"]] == [str(bad)]
    code, stdout, _ = run_cli("data", "check", str(out))
    assert code == 0 and "skipped      1" in stdout


def test_parquet_source_end_to_end(ray_local, tmp_path, run_cli):
    src = write_image_parquet(tmp_path / "src.parquet", n=7, size=(12, 12))
    out = tmp_path / "out"
    code, _, _ = run_cli("tokenize", "--source", "parquet", "--path", str(src), "--out", str(out),
                         "data.image_size=4", "data.rows_per_shard=3")
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["rows"], [s["rows"] for s in m["shards"]], m["num_classes"]) == (7, [3, 3, 1], 3)


def test_vq_tokenizer_through_ray(ray_local, tmp_path, run_cli):
    """A small random-init VQ (f=2) on digits: grid 16x16 at 32 px, codebook 64."""
    out = tmp_path / "vq"
    code, stdout, _ = run_cli("tokenize", "--tokenizer", "vq", "--out", str(out), "tokenizer.vq.ch=32",
                              "tokenizer.vq.ch_mult=[1,2]", "tokenizer.vq.z_channels=32",
                              "tokenizer.vq.codebook_size=64", "tokenizer.vq.embed_dim=4", "data.rows_per_shard=1000")
    assert code == 0 and "grid 16x16, vocab 64" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["image_size"] == 32 and m["rows"] == 1797
    assert run_cli("data", "check", str(out))[0] == 0


def test_kl_codec_through_ray_writes_latents_that_decode_with_the_manifests_codec(ray_local, tmp_path, run_cli):
    """The digits-size KL autoencoder (random weights from a seed) on digits at 16 px: 8x8x4 latents."""
    import torch

    from raygen.models.tokenizers import from_spec

    out = tmp_path / "kl"
    code, stdout, err = run_cli("tokenize", "--tokenizer", "kl", "--out", str(out), "tokenizer.kl.size=debug",
                                "data.image_size=16", "data.rows_per_shard=1000")
    assert code == 0, err
    assert "grid 8x8, latents 64x4 float16" in stdout and "codec kl" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["columns"]["latents"] == {"kind": "latents", "dtype": "float16", "shape": [64, 4], "scale": 1.0}
    assert m["tokenizer"]["weights"] == {"checkpoint": None, "seed": 0}
    assert run_cli("data", "check", str(out))[0] == 0
    codec = from_spec(m["tokenizer"])  # what `raygen sample` decodes a model's latents with
    latents = np.stack(pq.read_table(out / "shard-00000.parquet").column("latents").to_numpy(zero_copy_only=False))
    images = codec.decode(torch.from_numpy(latents[:3].astype(np.float32)).reshape(3, 64, 4))
    assert images.shape == (3, 16, 16, 1) and images.dtype == torch.uint8

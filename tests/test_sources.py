"""Image sources and decoding, in-process (the Ray path is covered in test_tokenize.py)."""

from __future__ import annotations

import numpy as np
import pytest

from raygen.errors import DataError
from raygen.platform.data.sources import ImageDecoder, open_source

from conftest import write_image_folder, write_image_parquet


def _decode_all(source, **kw):
    dec = ImageDecoder(source.name, **{"image_size": 8, "channels": 3, "resize": True, "on_bad_input": "fail", **kw})
    cols = {k: np.array([it[k] for it in source.items], dtype=object) for k in source.items[0]}
    return dec(cols)


def test_digits_source():
    s = open_source("digits", None)
    assert (s.rows, s.num_classes, s.native_channels) == (1797, 10, 1)
    out = _decode_all(s, image_size=16, channels=1)
    assert out["image"].shape == (1797, 16, 16, 1) and out["image"].dtype == np.uint8
    assert sorted(set(out["label"].tolist())) == list(range(10))
    assert out["index"].tolist() == list(range(1797))
    assert out["image"].max() == 255 and out["image"].min() == 0


def test_digits_native_size_keeps_pixels():
    s = open_source("digits", None)
    out = _decode_all(s, image_size=8, channels=1, resize=False)
    from sklearn.datasets import load_digits

    expected = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    assert np.array_equal(out["image"][..., 0], expected)


def test_folder_source_resizes_and_centre_crops(tmp_path):
    root = write_image_folder(tmp_path / "imgs", size=(20, 12))
    s = open_source("folder", str(root))
    assert (s.rows, s.num_classes, s.class_names) == (6, 2, ["cat", "dog"])
    out = _decode_all(s, image_size=8)
    assert out["image"].shape == (6, 8, 8, 3)
    assert out["label"].tolist() == [0, 0, 0, 1, 1, 1]
    gray = _decode_all(s, image_size=8, channels=1)
    assert gray["image"].shape == (6, 8, 8, 1)


def test_folder_crop_without_resize(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=1, size=(20, 12))
    out = _decode_all(open_source("folder", str(root)), image_size=10, resize=False)
    assert out["image"].shape == (2, 10, 10, 3)


def test_parquet_source(tmp_path):
    path = write_image_parquet(tmp_path / "x.parquet", n=5, size=(10, 10))
    s = open_source("parquet", str(path))
    assert (s.rows, s.num_classes, len(s.items)) == (5, 3, 3)  # row groups of 2
    out = _decode_all(s, image_size=4)
    assert out["image"].shape == (5, 4, 4, 3)
    assert out["index"].tolist() == [0, 1, 2, 3, 4] and out["label"].tolist() == [0, 1, 2, 0, 1]
    assert out["image"][3].mean() == pytest.approx(60, abs=1)


# --- bad input: one clear message naming the thing --------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="data.path '.*nope' does not exist"):
        open_source("folder", str(tmp_path / "nope"))


def test_source_needs_a_path():
    with pytest.raises(DataError, match="data.source=folder needs data.path"):
        open_source("folder", None)


def test_empty_folder(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty source: no images"):
        open_source("folder", str(tmp_path))


def test_folder_without_class_subfolders(tmp_path):
    write_image_folder(tmp_path / "a")
    with pytest.raises(DataError, match="no class subfolders"):
        open_source("folder", str(tmp_path / "a" / "cat"))


def test_empty_parquet_dir(tmp_path):
    with pytest.raises(DataError, match="empty source: no .parquet files"):
        open_source("parquet", str(tmp_path))


def test_wrong_label_type(tmp_path):
    path = write_image_parquet(tmp_path / "x.parquet", label_type="string")
    with pytest.raises(DataError, match="column 'label' has type string; expected integers"):
        open_source("parquet", str(path))


def test_image_smaller_than_target_without_resize(tmp_path):
    with pytest.raises(DataError, match=r"'digits\[0\]' is 8x8, smaller than data.image_size=16 with data.resize=false"):
        _decode_all(open_source("digits", None), image_size=16, channels=1, resize=False)


def test_corrupt_image_fails_with_its_path(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=f"cannot read image '{bad}'.*data.on_bad_input=skip"):
        _decode_all(open_source("folder", str(root)))


def test_corrupt_image_is_skipped_and_reported(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"garbage")
    out = _decode_all(open_source("folder", str(root)), on_bad_input="skip")
    errors = [(i, e) for i, e in zip(out["input"], out["error"]) if e]
    assert len(errors) == 1 and errors[0][0].endswith("broken.png")
    assert len(out["image"]) == 7


def test_corrupt_parquet_row_names_file_and_row(tmp_path):
    path = write_image_parquet(tmp_path / "x.parquet", corrupt_row=3)
    with pytest.raises(DataError, match=r"x.parquet row 3"):
        _decode_all(open_source("parquet", str(path)))

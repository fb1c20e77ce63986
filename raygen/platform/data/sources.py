"""Image sources: each becomes a Ray Dataset of {image: uint8 HxWxC, label, index, input, error}.

The driver lists cheap work items (digits arrays, file paths, Parquet row groups) and checks
what it can up front (missing directory, empty source, label column type). Decoding, resizing
and centre-cropping run in Ray tasks. A row that cannot be decoded either raises a DataError
naming its input (`data.on_bad_input=fail`) or comes through with `error` set and a blank
image (`skip`), so the writer can record it in the manifest.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raygen.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Source:
    """What the driver knows about a source before anything is decoded."""

    name: str
    items: list[dict[str, Any]]  # work items; each decodes to one or more rows
    rows: int  # rows the source will yield, skipped inputs included
    num_classes: int
    class_names: list[str]
    native_channels: int
    decode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None


# --------------------------------------------------------------------------------------
# Listing (driver side)
# --------------------------------------------------------------------------------------


def open_source(name: str, path: str | None) -> Source:
    if name == "digits":
        return _digits()
    if path is None:
        raise DataError(f"data.source={name} needs data.path (a {'directory' if name == 'folder' else 'Parquet file or directory'})")
    if name == "folder":
        return _folder(Path(path))
    if name == "parquet":
        return _parquet(Path(path))
    raise DataError(f"unknown data.source '{name}'; allowed: digits, folder, parquet")


def _digits() -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Values are 0..16; spread them over 0..255 so every level stays distinct.
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    items = [
        {"pixels": pixels[i], "label": int(d.target[i]), "index": i, "input": f"digits[{i}]"}
        for i in range(len(pixels))
    ]
    return Source("digits", items, len(items), 10, [str(c) for c in range(10)], 1)


def _folder(root: Path) -> Source:
    if not root.exists():
        raise DataError(f"data.path '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"data.path '{root}' is not a directory (the folder source wants one subfolder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data.path '{root}' has no class subfolders (the folder source wants <path>/<class>/<image>)")
    items = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    items.append({"path": os.path.join(dirpath, fn), "label": label})
    if not items:
        raise DataError(
            f"empty source: no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of '{root}'"
        )
    for i, it in enumerate(items):
        it["index"] = i
        it["input"] = it["path"]
    return Source("folder", items, len(items), len(classes), classes, 3)


def parquet_files(root: Path) -> list[Path]:
    if not root.exists():
        raise DataError(f"data.path '{root}' does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"empty source: no .parquet files under '{root}'")
    return files


def _parquet(root: Path) -> Source:
    files = parquet_files(root)
    items, offset, max_label = [], 0, -1
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - any read failure is a bad input
            raise DataError(f"cannot read Parquet file '{f}': {e}") from None
        schema = meta.schema_arrow
        for col in ("image", "label"):
            if col not in schema.names:
                raise DataError(f"Parquet file '{f}' has no '{col}' column; columns: {', '.join(schema.names)}")
        if not pa.types.is_integer(schema.field("label").type):
            raise DataError(
                f"Parquet file '{f}': column 'label' has type {schema.field('label').type}; expected integers (class ids)"
            )
        if not (pa.types.is_binary(schema.field("image").type) or pa.types.is_large_binary(schema.field("image").type)):
            raise DataError(
                f"Parquet file '{f}': column 'image' has type {schema.field('image').type}; expected encoded image bytes"
            )
        labels = meta.read(columns=["label"]).column("label")
        if labels.null_count:
            raise DataError(f"Parquet file '{f}': column 'label' has {labels.null_count} null values")
        if len(labels):
            lo, hi = pa.compute.min(labels).as_py(), pa.compute.max(labels).as_py()
            if lo < 0:
                raise DataError(f"Parquet file '{f}': labels must be >= 0, found {lo}")
            max_label = max(max_label, hi)
        file_row = 0
        for rg in range(meta.num_row_groups):
            n = meta.metadata.row_group(rg).num_rows
            if n:
                items.append(
                    {"file": str(f), "row_group": rg, "offset": offset, "file_row": file_row, "input": f"{f}#rg{rg}"}
                )
                offset += n
                file_row += n
    if offset == 0:
        raise DataError(f"empty source: the Parquet data under '{root}' has no rows")
    n_classes = max_label + 1
    return Source("parquet", items, offset, n_classes, [str(c) for c in range(n_classes)], 3)


# --------------------------------------------------------------------------------------
# Decoding (Ray tasks)
# --------------------------------------------------------------------------------------


class ImageDecoder:
    """Turns a batch of work items into rows of fixed-size uint8 images."""

    def __init__(self, source: str, *, image_size: int, channels: int, resize: bool, on_bad_input: str):
        self.source = source
        self.size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.channels = channels
        self.resize = resize
        self.skip = on_bad_input == "skip"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[tuple[np.ndarray, int, int, str, str]] = []
        n = len(batch["input"])
        for i in range(n):
            item = {k: batch[k][i] for k in batch}
            if self.source == "digits":
                img = Image.fromarray(np.asarray(item["pixels"], dtype=np.uint8), mode="L")
                rows.append(self._row(lambda img=img: img, int(item["label"]), int(item["index"]), str(item["input"])))
            elif self.source == "folder":
                path = str(item["path"])
                rows.append(self._row(lambda p=path: _open(p), int(item["label"]), int(item["index"]), path))
            else:
                table = pq.ParquetFile(str(item["file"])).read_row_group(int(item["row_group"]), columns=["image", "label"])
                images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
                for j, (data, label) in enumerate(zip(images, labels)):
                    where = f"{item['file']} row {int(item['file_row']) + j}"
                    rows.append(self._row(lambda d=data: _open_bytes(d), int(label), int(item["offset"]) + j, where))
        return {
            "image": np.stack([r[0] for r in rows]) if rows else np.zeros((0, self.size, self.size, self.channels), np.uint8),
            "label": np.array([r[1] for r in rows], dtype=np.int64),
            "index": np.array([r[2] for r in rows], dtype=np.int64),
            "input": np.array([r[3] for r in rows], dtype=object),
            "error": np.array([r[4] for r in rows], dtype=object),
        }

    def _row(self, opener: Callable[[], Image.Image], label: int, index: int, where: str):
        try:
            img = fit_image(opener(), self.size, self.mode, self.resize, where)
            return img, label, index, where, ""
        except DataError as e:
            if self.skip:
                return self._blank(), label, index, where, e.message
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds on a corrupt file
            msg = f"cannot read image '{where}': {type(e).__name__}: {e}"
            if self.skip:
                return self._blank(), label, index, where, msg
            raise DataError(msg + " (set data.on_bad_input=skip to skip unreadable images)") from None

    def _blank(self) -> np.ndarray:
        return np.zeros((self.size, self.size, self.channels), np.uint8)


def _open(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _open_bytes(data: bytes | None) -> Image.Image:
    if data is None:
        raise ValueError("image bytes are null")
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.copy()


def fit_image(img: Image.Image, size: int, mode: str, resize: bool, where: str = "image") -> np.ndarray:
    """Convert to L/RGB, resize the shorter side to `size` (if resize), centre-crop to size x size."""
    img = img.convert(mode)
    w, h = img.size
    if resize:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    elif min(w, h) < size:
        raise DataError(
            f"image too small: '{where}' is {w}x{h}, smaller than data.image_size={size} with data.resize=false "
            f"(set data.resize=true or a smaller data.image_size)"
        )
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr

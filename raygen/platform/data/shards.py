"""Tokenized Parquet shards and their manifest: writing atomically, reading, checking.

A data set directory holds `shard-NNNNN.parquet` files and `manifest.json`. It is built in a
hidden staging directory beside its destination and renamed into place only when complete,
so a reader sees the whole data set or nothing; each shard is itself written to a temporary
name first. The manifest is the contract with training: source, codec spec and fingerprint,
grid, classes, row counts and checksums, skipped inputs, and the declared columns:

    "columns": {"tokens":  {"kind": "ids", "dtype": "int32", "shape": [256], "vocab_size": 16384}}
    "columns": {"latents": {"kind": "latents", "dtype": "float16", "shape": [256, 16], "scale": 0.2325}}

    "columns": {"images":  {"kind": "images", "dtype": "uint8", "shape": [16, 16, 1]}}
    "columns": {"latents": {"kind": "latents", ..., "shape": [256, 16], "moments": 2}}

A latents column with `moments` V holds a codec's posterior per row instead of one latent: for V
views (the image, and with V = 2 its horizontal flip) the mean and log-variance of each latent,
(V, 2, L, D) values; training draws a view and a latent from them each time it reads the row.

plus optional side columns ({"kind": "side", ...}, e.g. a grain map). Every row also has
`label` (int32) and `index` (int64, the source row). Each data column is a fixed-size list
of its dtype holding prod(shape) values in row-major order. Schema version 1 (ids only, no
"columns") is read as the equivalent version 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raygen.errors import DataError
from raygen.families.base import DATA_KINDS, DataInfo

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2
READS = (1, 2)  # schema versions this raygen reads
SHARD_GLOB = "shard-*.parquet"
COLUMN_KINDS = (*DATA_KINDS, "side")
DTYPES = {"int32": pa.int32(), "int8": pa.int8(), "uint8": pa.uint8(), "float16": pa.float16(),
          "float32": pa.float32()}


@dataclass(frozen=True)
class Column:
    """One declared data column: its kind, storage dtype and per-row shape (+ vocab or scale)."""

    name: str
    kind: str  # ids | latents | images | side
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]  # per row; ids: (h*w,), latents: (L, D), images: (H, W, C)
    vocab_size: int | None = None  # ids
    scale: float | None = None  # latents: the codec's latent scale
    moments: int | None = None  # latents: posterior moments of this many views per row, not one latent

    @property
    def size(self) -> int:
        """Values stored per row."""
        return int(np.prod(self.shape)) * (2 * self.moments if self.moments else 1)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """A row's values as an array: `shape`, or (views, mean/logvar, *shape) for moments."""
        return (self.moments, 2, *self.shape) if self.moments else self.shape

    def arrow_type(self) -> pa.DataType:
        return pa.list_(DTYPES[self.dtype], self.size)

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}
        if self.vocab_size is not None:
            out["vocab_size"] = self.vocab_size
        if self.scale is not None:
            out["scale"] = self.scale
        if self.moments is not None:
            out["moments"] = self.moments
        return out

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "Column":
        if d.get("kind") not in COLUMN_KINDS or d.get("dtype") not in DTYPES:
            raise DataError(f"column '{name}' declares kind {d.get('kind')!r} / dtype {d.get('dtype')!r}; "
                            f"known kinds: {', '.join(COLUMN_KINDS)}; dtypes: {', '.join(DTYPES)}")
        return cls(name, d["kind"], d["dtype"], tuple(int(v) for v in d["shape"]), d.get("vocab_size"), d.get("scale"),
                   d.get("moments"))


def columns(manifest: dict[str, Any]) -> list[Column]:
    """The data columns a manifest declares, data column first."""
    return [Column.from_json(n, d) for n, d in manifest["columns"].items()]


def data_column(manifest: dict[str, Any]) -> Column:
    """The one ids, latents or images column of a data set."""
    return next(c for c in columns(manifest) if c.kind != "side")


def shard_schema(cols: list[Column]) -> pa.Schema:
    return pa.schema([*(pa.field(c.name, c.arrow_type()) for c in cols),
                      pa.field("label", pa.int32()),
                      pa.field("index", pa.int64())])  # row of the source this came from


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"'{root}' is not a tokenized data set: it has no {MANIFEST} (make one with `raygen tokenize`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read '{path}': {e}") from None
    version = manifest.get("schema_version")
    if version not in READS:
        raise DataError(f"'{path}' has schema version {version!r}; this raygen reads versions "
                        f"{', '.join(map(str, READS))}")
    if version == 1:  # ids only, before columns were declared
        n = int(np.prod(manifest["grid"]))
        manifest["columns"] = {"tokens": Column("tokens", "ids", "int32", (n,), manifest["vocab_size"]).to_json()}
    data = [c for c in manifest.get("columns", {}).values() if c.get("kind") in DATA_KINDS]
    if len(data) != 1:
        raise DataError(f"'{path}' must declare exactly one data column ({' or '.join(DATA_KINDS)}), got {len(data)}")
    return manifest


def data_info(manifest: dict[str, Any]) -> DataInfo:
    """The manifest in the terms a family plugin reads (kind, grid, classes, vocab or width)."""
    col = data_column(manifest)
    return DataInfo(kind=col.kind, column=col.name, grid=tuple(manifest["grid"]), num_classes=manifest["num_classes"],
                    vocab_size=col.vocab_size, token_dim=col.shape[-1] if col.kind != "ids" else None,
                    side_columns=tuple(c.name for c in columns(manifest) if c.kind == "side"))


def shard_paths(root: str | Path, manifest: dict[str, Any]) -> list[str]:
    return [str(Path(root) / s["file"]) for s in manifest["shards"]]


def class_view(root: str | Path, manifest: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The manifest of the rows of `classes` only (`data.classes`), relabelled 0..k-1 in the order
    given: num_classes, class_names and rows are the subset's; `class_subset.ids` are the classes'
    ids in the shards (what `keep_classes` reads). Unknown or repeated names are a ConfigError."""
    from raygen.errors import ConfigError

    names = manifest.get("class_names") or [str(i) for i in range(manifest["num_classes"])]
    classes = [str(c) for c in classes]
    unknown = [c for c in classes if c not in names]
    if unknown:
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise ConfigError(f"data.classes: '{unknown[0]}' is not a class of the data set '{root}'; its classes: {shown}")
    if len(set(classes)) != len(classes) or not classes:
        raise ConfigError(f"data.classes must name distinct classes, got {classes}")
    ids = [names.index(c) for c in classes]
    labels = np.concatenate([pq.read_table(p, columns=["label"]).column("label").to_numpy()
                             for p in shard_paths(root, manifest)])
    return {**manifest, "num_classes": len(ids), "class_names": classes, "rows": int(np.isin(labels, ids).sum()),
            "class_subset": {"ids": ids, "class_names": names}}


def keep_classes(batch: pa.Table, ids: list[int]) -> pa.Table:
    """Ray Data map: the rows whose label is one of `ids`, relabelled to its position in `ids`."""
    labels = batch.column("label").to_numpy()
    lookup = np.full(max(max(ids), int(labels.max(initial=0))) + 1, -1, dtype=labels.dtype)
    lookup[ids] = np.arange(len(ids), dtype=labels.dtype)
    keep = np.isin(labels, ids)
    kept = batch.filter(pa.array(keep))
    return kept.set_column(kept.schema.get_field_index("label"), "label", pa.array(lookup[labels[keep]]))


def read_rows(root: str | Path, manifest: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n rows of the data column (n, *shape) in its stored dtype (for posterior moments,
    the means of the first view), and their labels (n,)."""
    col = data_column(manifest)
    values, labels, have = [], [], 0
    for s in manifest["shards"]:
        if have >= n:
            break
        table = pq.read_table(Path(root) / s["file"], columns=[col.name, "label"]).slice(0, n - have)
        values.append(table.column(col.name).combine_chunks().flatten().to_numpy(zero_copy_only=False))
        labels.append(table.column("label").to_numpy())
        have += table.num_rows
    flat = np.concatenate(values) if values else np.zeros(0, np.dtype(col.dtype))
    rows = flat.reshape(-1, *col.stored_shape)
    return rows[:, 0, 0] if col.moments else rows, np.concatenate(labels) if labels else np.zeros(0, np.int32)


# --------------------------------------------------------------------------------------
# Destination state
# --------------------------------------------------------------------------------------


def _ours(name: str) -> bool:
    return name == MANIFEST or (name.startswith("shard-") and (name.endswith(".parquet") or name.endswith(".tmp")))


def prepare_destination(out: Path, request: dict[str, Any], overwrite: bool) -> bool:
    """Decide what to do with the output directory. Returns True when it is already complete.

    - missing or empty: build it;
    - a complete data set made from the same request: nothing to do;
    - a data set from another request, or a partial one: refuse unless overwrite;
    - files raygen did not write: refuse, even with overwrite (never delete a user's files).
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return False
    foreign = [n for n in names if not _ours(n)]
    if foreign:
        raise DataError(
            f"output '{out}' holds files raygen did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "choose an empty or new directory"
        )
    if MANIFEST in names:
        try:
            manifest = read_manifest(out)
        except DataError:
            manifest = None
        if manifest is not None and _same_request(manifest.get("request", {}), request):
            problems = check_files(out, manifest, checksums=False)
            if not problems:
                return True
            if not overwrite:
                raise DataError(
                    f"output '{out}' holds this data set but it is damaged ({problems[0]}); pass --overwrite to rebuild it"
                )
            return False
        if not overwrite:
            if manifest is None:
                raise DataError(f"output '{out}' has an unreadable manifest; pass --overwrite to replace it")
            diff = _diff(manifest.get("request", {}), request)
            raise DataError(
                f"output '{out}' holds a data set made with other settings ({diff}); "
                "pass --overwrite to replace it, or choose another output directory"
            )
        return False
    if not overwrite:
        raise DataError(f"output '{out}' holds a partial data set (shards but no manifest); pass --overwrite to replace it")
    return False


def _same_request(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """The same settings; the schema version does not count (older versions are still read)."""
    def strip(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k != "schema_version"}

    return strip(old) == strip(new)


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{k}.")
            if sub:
                diffs.append(sub)
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return "; ".join(diffs[:3])


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


@dataclass
class ShardWriter:
    """Buffers rows and writes fixed-size shards of the declared columns into a staging directory beside `out`."""

    out: Path
    cols: list[Column]
    rows_per_shard: int
    staging: Path = field(init=False)
    shards: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    _buf: list[dict[str, np.ndarray]] = field(default_factory=list)
    _buffered: int = 0

    def __post_init__(self) -> None:
        self.out = self.out.resolve()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}.staging-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.schema = shard_schema(self.cols)

    def add(self, data: dict[str, np.ndarray], labels: np.ndarray, index: np.ndarray) -> None:
        """data: {column name: (n, *shape) array} for every declared column; labels, index: (n,)."""
        if len(labels) == 0:
            return
        rows = {c.name: np.asarray(data[c.name]).reshape(len(labels), c.size) for c in self.cols}
        self._buf.append({**rows, "label": labels, "index": index})
        self._buffered += len(labels)
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        names = [c.name for c in self.cols] + ["label", "index"]
        cat = {k: np.concatenate([b[k] for b in self._buf]) for k in names}
        take = {k: v[:n] for k, v in cat.items()}
        rest = {k: v[n:] for k, v in cat.items()}
        self._buf = [rest] if len(rest["label"]) else []
        self._buffered = len(rest["label"])
        arrays = []
        for c in self.cols:
            values = np.ascontiguousarray(take[c.name], dtype=np.dtype(c.dtype)).reshape(-1)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values, type=DTYPES[c.dtype]), c.size))
        arrays += [pa.array(take["label"].astype(np.int32)), pa.array(take["index"].astype(np.int64))]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        name = f"shard-{len(self.shards):05d}.parquet"
        tmp = self.staging / (name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.staging / name)
        self.shards.append({"file": name, "rows": n, "sha256": sha256_file(self.staging / name)})
        self.rows += n

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Flush the rest, write the manifest, and move the data set into place."""
        if self._buffered:
            self._flush(self._buffered)
        if self.rows == 0:
            raise DataError("no rows to write: every input was skipped")
        manifest = {**manifest, "columns": {c.name: c.to_json() for c in self.cols}, "rows": self.rows,
                    "shards": self.shards}
        tmp = self.staging / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.staging / MANIFEST)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------


def check_files(root: Path, manifest: dict[str, Any], *, checksums: bool = True) -> list[str]:
    """Cheap structural check (existence, row counts), plus sha256 when asked."""
    problems = []
    listed = {s["file"] for s in manifest.get("shards", [])}
    for extra in sorted(p.name for p in root.glob(SHARD_GLOB) if p.name not in listed):
        problems.append(f"{extra} is not listed in the manifest")
    total = 0
    for s in manifest.get("shards", []):
        path = root / s["file"]
        if not path.is_file():
            problems.append(f"{s['file']} is missing")
            continue
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # noqa: BLE001
            problems.append(f"{s['file']} is not readable Parquet: {e}")
            continue
        if rows != s["rows"]:
            problems.append(f"{s['file']} has {rows} rows, the manifest says {s['rows']}")
        total += rows
        if checksums and sha256_file(path) != s["sha256"]:
            problems.append(f"{s['file']} checksum differs from the manifest")
    if total != manifest.get("rows"):
        problems.append(f"shards hold {total} rows, the manifest says {manifest.get('rows')}")
    return problems


@dataclass
class CheckReport:
    manifest: dict[str, Any]
    problems: list[str]
    label_counts: list[int]
    values: dict[str, dict[str, Any]]  # per column: ids {min, max, used}; latents {min, max, mean, std}

    @property
    def ok(self) -> bool:
        return not self.problems


def check_values(col: Column, values: np.ndarray) -> str | None:
    """What is wrong with a column's values (None if nothing): ids in range, latents finite."""
    if values.size == 0:
        return None
    if col.kind == "ids" or (col.kind == "side" and col.vocab_size is not None):
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= col.vocab_size:
            what = "token ids" if col.kind == "ids" else f"{col.name} values"
            return f"{what} in [{lo}, {hi}], outside [0, {col.vocab_size})"
    elif col.kind == "latents" or col.dtype.startswith("float"):
        bad = ~np.isfinite(values)
        if bad.any():
            return f"{int(bad.sum())} non-finite latent values"
    return None


def check_codec(manifest: dict[str, Any]) -> str | None:
    """Rebuild the codec from the manifest's spec (and weights) and compare its fingerprint."""
    from raygen.models.tokenizers import from_spec

    spec = {k: v for k, v in manifest["tokenizer"].items() if k != "fingerprint"}
    try:
        got = from_spec(spec).fingerprint()
    except Exception as e:  # noqa: BLE001 - a missing weights file, an unknown codec: a finding, not a crash
        return f"the {spec.get('name')} codec cannot be rebuilt from the manifest: {str(e).splitlines()[0]}"
    want = manifest["tokenizer"].get("fingerprint")
    if got != want:
        return (f"the codec rebuilt from the manifest's spec and weights has fingerprint {got}, the manifest says "
                f"{want} (its weights or spec changed since tokenizing)")
    return None


def check_dataset(root: str | Path) -> CheckReport:
    """Verify a data set against its manifest: files, counts, checksums, schema, values, codec."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data set directory '{root}' does not exist")
    manifest = read_manifest(root)
    problems = check_files(root, manifest, checksums=True)
    codec = check_codec(manifest)
    if codec:
        problems.append(codec)
    cols = columns(manifest)
    expected = shard_schema(cols)
    n_classes = manifest["num_classes"]
    labels = np.zeros(n_classes, dtype=np.int64)
    stats = {c.name: _Stats(c) for c in cols}
    seen_index: set[int] = set()
    for s in manifest["shards"]:
        path = root / s["file"]
        if not path.is_file():
            continue
        try:
            table = pq.read_table(path)
        except Exception:  # noqa: BLE001 - already reported by check_files
            continue
        if not table.schema.equals(expected):
            problems.append(f"{s['file']} has schema {table.schema.to_string(show_schema_metadata=False)!r}, expected {expected}")
            continue
        for c in cols:
            values = table.column(c.name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            bad = check_values(c, values)
            if bad:
                problems.append(f"{s['file']} has {bad} in column {c.name}")
            else:
                stats[c.name].add(values)
        lab = table.column("label").to_numpy()
        bad = (lab < 0) | (lab >= n_classes)
        if bad.any():
            problems.append(f"{s['file']} has {int(bad.sum())} labels outside [0, {n_classes})")
        labels += np.bincount(lab[~bad], minlength=n_classes)[:n_classes]
        idx = table.column("index").to_pylist()
        dup = seen_index.intersection(idx)
        if dup or len(set(idx)) != len(idx):
            problems.append(f"{s['file']} repeats source indices")
        seen_index.update(idx)
    return CheckReport(manifest, problems, labels.tolist(), {n: st.summary() for n, st in stats.items()})


class _Stats:
    """Running summary of one column's values over the shards."""

    def __init__(self, col: Column):
        self.col, self.n, self.sum, self.sq = col, 0, 0.0, 0.0
        self.lo: float | None = None
        self.hi: float | None = None
        self.used = np.zeros(col.vocab_size or 0, dtype=bool)

    def add(self, values: np.ndarray) -> None:
        if not values.size:
            return
        if self.col.moments:  # summarise the means (the latents' centres), not the log-variances
            values = values.reshape(-1, self.col.moments, 2, int(np.prod(self.col.shape)))[:, :, 0]
        lo, hi = values.min().item(), values.max().item()
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        if self.col.kind == "ids":
            self.used[np.unique(values)] = True
        else:
            v = values.astype(np.float64)
            self.n, self.sum, self.sq = self.n + v.size, self.sum + v.sum(), self.sq + (v * v).sum()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"min": self.lo, "max": self.hi}
        if self.col.kind == "ids":
            out["used"] = int(self.used.sum())
        elif self.n:
            mean = self.sum / self.n
            out.update(mean=mean, std=max(0.0, self.sq / self.n - mean * mean) ** 0.5)
        return out


def _describe_column(c: Column, v: dict[str, Any]) -> str:
    shape = "x".join(map(str, c.shape))
    if c.kind == "ids":
        used = f"ids used: {v['used']}" + (f", range [{v['min']}, {v['max']}]" if v["min"] is not None else "")
        return f"{c.name}: ids {shape} {c.dtype}, vocab {c.vocab_size}  ({used})"
    text = f"{c.name}: {c.kind} {shape} {c.dtype}" + (f", scale {c.scale:g}" if c.scale is not None else "")
    if c.moments:
        text += f", posterior moments of {c.moments} view{'s' if c.moments > 1 else ''}"
    if v.get("mean") is not None:
        text += f"  ({'means: ' if c.moments else ''}range [{v['min']:.3g}, {v['max']:.3g}], mean {v['mean']:.3g}, std {v['std']:.3g})"
    return text


def format_report(root: str | Path, r: CheckReport) -> str:
    m = r.manifest
    tok = m["tokenizer"]
    lines = [
        f"data set     {root}",
        f"source       {m['source']['name']}" + (f" ({m['source']['path']})" if m["source"].get("path") else ""),
        f"images       {m['source']['image_size']}x{m['source']['image_size']}x{m['source']['channels']}",
        f"codec        {tok['name']}  fingerprint {tok['fingerprint']}",
        f"grid         {m['grid'][0]}x{m['grid'][1]}",
        *(f"column       {_describe_column(c, r.values[c.name])}" for c in columns(m)),
        f"classes      {m['num_classes']}  rows per class: {r.label_counts if len(r.label_counts) <= 20 else str(r.label_counts[:20])[:-1] + ', ...]'}",
        f"rows         {m['rows']} in {len(m['shards'])} shards",
        f"skipped      {len(m['skipped'])}" + "".join(f"\n  - {s['input']}: {s['error']}" for s in m["skipped"][:5]),
    ]
    if len(m["skipped"]) > 5:
        lines.append(f"  ... and {len(m['skipped']) - 5} more (see manifest.json)")
    lines.append("check        OK" if r.ok else "check        FAILED")
    lines += [f"  - {p}" for p in r.problems[:10]]
    if len(r.problems) > 10:
        lines.append(f"  ... and {len(r.problems) - 10} more problems")
    return "\n".join(lines)

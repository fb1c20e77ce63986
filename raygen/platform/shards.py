"""Tokenized Parquet shards and their manifest: writing atomically, reading, checking.

A data set directory holds `shard-NNNNN.parquet` files and `manifest.json`. It is built in a
hidden staging directory beside its destination and renamed into place only when complete,
so a reader sees the whole data set or nothing; each shard is itself written to a temporary
name first. The manifest is the contract with training: source, tokenizer spec and
fingerprint, grid, vocabulary, classes, row counts and checksums, skipped inputs.
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

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
SHARD_GLOB = "shard-*.parquet"


def shard_schema(tokens_per_row: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("tokens", pa.list_(pa.int32(), tokens_per_row)),  # raster order, h*w ids
            pa.field("label", pa.int32()),
            pa.field("index", pa.int64()),  # row of the source this came from
        ]
    )


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
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"'{path}' has schema version {manifest.get('schema_version')!r}; this raygen reads version {SCHEMA_VERSION}"
        )
    return manifest


def shard_paths(root: str | Path, manifest: dict[str, Any]) -> list[str]:
    return [str(Path(root) / s["file"]) for s in manifest["shards"]]


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
        if manifest is not None and manifest.get("request") == request:
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
    """Buffers rows and writes fixed-size shards into a staging directory beside `out`."""

    out: Path
    tokens_per_row: int
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

    def add(self, tokens: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
        if len(tokens) == 0:
            return
        self._buf.append({"tokens": tokens, "label": labels, "index": index})
        self._buffered += len(tokens)
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        cols = {k: np.concatenate([b[k] for b in self._buf]) for k in ("tokens", "label", "index")}
        take = {k: v[:n] for k, v in cols.items()}
        rest = {k: v[n:] for k, v in cols.items()}
        self._buf = [rest] if len(rest["label"]) else []
        self._buffered = len(rest["label"])
        tokens = np.ascontiguousarray(take["tokens"], dtype=np.int32)
        table = pa.Table.from_arrays(
            [
                pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), self.tokens_per_row),
                pa.array(take["label"].astype(np.int32)),
                pa.array(take["index"].astype(np.int64)),
            ],
            schema=shard_schema(self.tokens_per_row),
        )
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
        manifest = {**manifest, "rows": self.rows, "shards": self.shards}
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
    token_min: int | None
    token_max: int | None
    tokens_used: int

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(root: str | Path) -> CheckReport:
    """Verify a data set against its manifest: files, counts, checksums, schema, value ranges."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data set directory '{root}' does not exist")
    manifest = read_manifest(root)
    problems = check_files(root, manifest, checksums=True)
    n_tokens = int(np.prod(manifest["grid"]))
    expected = shard_schema(n_tokens)
    vocab, n_classes = manifest["vocab_size"], manifest["num_classes"]
    labels = np.zeros(n_classes, dtype=np.int64)
    used = np.zeros(vocab, dtype=bool)
    tmin, tmax = None, None
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
        tokens = table.column("tokens").combine_chunks().flatten().to_numpy()
        if tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            tmin = lo if tmin is None else min(tmin, lo)
            tmax = hi if tmax is None else max(tmax, hi)
            if lo < 0 or hi >= vocab:
                problems.append(f"{s['file']} has token ids in [{lo}, {hi}], outside [0, {vocab})")
            else:
                used[np.unique(tokens)] = True
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
    return CheckReport(manifest, problems, labels.tolist(), tmin, tmax, int(used.sum()))


def format_report(root: str | Path, r: CheckReport) -> str:
    m = r.manifest
    tok = m["tokenizer"]
    lines = [
        f"data set     {root}",
        f"source       {m['source']['name']}" + (f" ({m['source']['path']})" if m["source"].get("path") else ""),
        f"images       {m['source']['image_size']}x{m['source']['image_size']}x{m['source']['channels']}",
        f"tokenizer    {tok['name']}  fingerprint {tok['fingerprint']}",
        f"grid         {m['grid'][0]}x{m['grid'][1]}  vocab {m['vocab_size']}  (ids used: {r.tokens_used}"
        + (f", range [{r.token_min}, {r.token_max}])" if r.token_min is not None else ")"),
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

"""`train.init_from`: start a run from a registered model's weights, adapted to this run's data.

The architecture must be the parent's, except the parts the data decides:

- **classes** (another count, a subset, another order): every per-class table the model
  declares (`TrainableModel.class_tables`) is rebuilt row by row. A class takes the parent's row
  of the class with the same name when both data sets name their classes (a folder source's
  names are its sorted subfolders; `data.classes` picks and orders a subset), else the row with
  the same index. A class the parent never saw keeps this run's fresh initialisation. Rows
  before the class block (image ids sharing the table) and after it (the null class of CFG,
  kept last) are the parent's.
- **vocabulary** (another codec's ids): refused unless `train.init_reset=head`; then every tensor
  whose shape the vocabulary changes (the token embedding, the output head, the image-id rows
  of a shared table) keeps this run's fresh initialisation and the rest comes from the parent.

Everything is decided on the driver before any worker starts (`resolve_init` -> `InitPlan`);
each worker builds its model as usual (seeded init) and `adapt_state` fills it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raygen.errors import ConfigError
from raygen.models.registry import build_model

# model config fields that may differ from the parent's: always / with train.init_reset=head
CLASS_FIELDS = ("num_classes",)
VOCAB_FIELDS = ("vocab_size",)


@dataclass
class InitPlan:
    """Where a run's weights come from and how they are adapted (shipped to every worker)."""

    weights: str  # a local model.pt (the parent's state dict)
    lineage: str  # e.g. "models:/NAME/3 (run R)"
    class_map: list[int | None] | None = None  # per class of this run: the parent's class row, None = new
    tables: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=dict)  # key -> (parent, ours)
    fresh: list[str] = field(default_factory=list)  # keys that keep this run's initialisation
    notes: list[str] = field(default_factory=list)  # lines for the console and the run's params

    @property
    def adapted(self) -> bool:
        return self.class_map is not None or bool(self.fresh)


def class_mapping(parent_names: list[str] | None, names: list[str] | None, n_parent: int, n: int
                  ) -> tuple[list[int | None], str]:
    """Per class of this run, the parent's class index (None: new), and how they were matched."""
    if parent_names and names and len(parent_names) == n_parent and len(names) == n:
        where = {name: i for i, name in enumerate(parent_names)}
        mapping = [where.get(name) for name in names]
        matched = sum(i is not None for i in mapping)
        return mapping, f"{matched} of {n} classes matched by name"
    mapping = [j if j < n_parent else None for j in range(n)]
    return mapping, f"{min(n, n_parent)} of {n} classes matched by index (a side has no class names)"


def remap_rows(parent: torch.Tensor, fresh: torch.Tensor, parent_rows: tuple[int, int], rows: tuple[int, int],
               class_map: list[int | None]) -> torch.Tensor:
    """A per-class table for this run: `fresh` (this run's init) with the parent's rows copied in.

    parent_rows / rows = (first class row, classes) of each table. Class j takes the parent's
    row class_map[j]; the rows before the class block come from the parent when that block
    starts at the same row (same vocabulary), the rows after it (null class, ...) when there are
    as many.
    """
    (p0, pc), (f0, fc) = parent_rows, rows
    out = fresh.clone()
    if p0 == f0:
        out[:f0] = parent[:p0]
    for j, i in enumerate(class_map):
        if i is not None:
            out[f0 + j] = parent[p0 + i]
    if parent.shape[0] - (p0 + pc) == fresh.shape[0] - (f0 + fc):
        out[f0 + fc:] = parent[p0 + pc:]
    return out


def adapt_state(parent: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], plan: InitPlan
                ) -> dict[str, torch.Tensor]:
    """The state dict a worker loads: the parent's, with class tables remapped and `plan.fresh`
    tensors kept from `fresh` (the freshly built model's own state dict)."""
    if not plan.adapted:
        return parent
    out = {}
    for key, mine in fresh.items():
        if key in plan.fresh:
            out[key] = mine
        elif key in plan.tables and plan.class_map is not None:
            out[key] = remap_rows(parent[key], mine, *plan.tables[key], plan.class_map)
        else:
            out[key] = parent[key]
    return out


def resolve_init(cfg: Any, plan: Any, uri: str) -> InitPlan | None:
    """train.init_from -> an InitPlan (None without init_from). Another family, a composite
    export, another architecture, or another vocabulary without train.init_reset=head is one
    ConfigError naming what differs, before any worker starts."""
    ref = cfg.train.init_from
    if not ref:
        return None
    from raygen.platform import tracking
    from raygen.platform.evaluate.sampling import read_export_meta

    version = tracking.model_version(uri, ref) if ref.startswith("models:/") else None
    cache = Path(cfg.workdir) / "cache" / "models" / (
        f"{version[0]}-v{version[1]}" if version else ref.rstrip("/").split("/")[-1])
    local, run_id = tracking.resolve_model(uri, ref, dst=cache if ":/" in ref else None)
    meta = read_export_meta(local)
    if meta.get("family") != plan.family:
        what = f"a {meta['family']} model" if "family" in meta else f"an imported {meta.get('codec')} tokenizer"
        raise ConfigError(f"train.init_from={ref} is {what}; this run trains {plan.family}")
    if not (Path(local) / "model.pt").is_file():
        raise ConfigError(f"train.init_from={ref} is a composite export (no model.pt); start from one of its runs")
    lineage = (f"models:/{version[0]}/{version[1]}" if version else ref) + (f" (run {run_id})" if run_id else "")

    ours, theirs = plan.model_config, meta.get("model_config", {})
    allowed = CLASS_FIELDS + (VOCAB_FIELDS if cfg.train.init_reset == "head" else ())
    differ = [k for k in ours if k in theirs and ours[k] != theirs[k] and k not in allowed]
    if differ:
        fields = ", ".join(f"{k}={theirs[k]!r} (this run: {ours[k]!r})" for k in differ[:4])
        hint = ("; another vocabulary (another codec): set train.init_reset=head to start the token embedding and "
                "output head afresh" if set(differ) <= set(VOCAB_FIELDS) else
                "; fine-tuning needs the same architecture (classes may differ; the vocabulary with "
                "train.init_reset=head)")
        raise ConfigError(f"train.init_from={ref} has another architecture: {fields}{hint}")

    state = torch.load(Path(local) / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    with torch.device("meta"):
        mine = build_model(plan.family, cfg.model.size, **plan.arch)
        parent = build_model(plan.family, meta["size"], **meta["arch"])
    want, tables, parent_tables = mine.state_dict(), mine.class_tables(), parent.class_tables()
    if set(want) != set(state):
        odd = sorted(set(want) ^ set(state))
        raise ConfigError(f"train.init_from={ref} has another state-dict layout: {len(odd)} keys differ, e.g. {odd[0]}")
    init = InitPlan(str(Path(local) / "model.pt"), lineage)
    n_parent, n = int(theirs.get("num_classes", 0)), int(ours.get("num_classes", 0))
    mapping, how = class_mapping(meta.get("data", {}).get("class_names"), plan.manifest.get("class_names"),
                                 n_parent, n)
    reshaped = any(tuple(want[k].shape) != tuple(state[k].shape) for k in tables)  # e.g. a shared table's ids
    if tables and (mapping != list(range(n_parent)) or reshaped):
        init.class_map = mapping
        init.tables = {k: (parent_tables[k], rows) for k, rows in tables.items()}
    if mapping != list(range(n_parent)):
        new = n - sum(i is not None for i in mapping)
        init.notes.append(f"classes: {how}" + (f"; {new} new (fresh rows)" if new else "")
                          + f"; the parent has {n_parent}")
    shaped = [k for k in want if tuple(want[k].shape) != tuple(state[k].shape) and k not in tables]
    if shaped and cfg.train.init_reset != "head":
        raise ConfigError(f"train.init_from={ref}: {shaped[0]} is {tuple(state[shaped[0]].shape)}, this run's "
                          f"{tuple(want[shaped[0]].shape)}, and it is not a per-class table")
    init.fresh = shaped
    if shaped:
        init.notes.append(f"init_reset=head: {', '.join(shaped)} start afresh")
    fingerprint = meta.get("data", {}).get("tokenizer_fingerprint")
    if fingerprint and fingerprint != plan.manifest["tokenizer"]["fingerprint"] and not shaped:
        init.notes.append(f"the parent's data came from codec {fingerprint}, this data set's from "
                          f"{plan.manifest['tokenizer']['fingerprint']}: the same ids may mean other things")
    return init

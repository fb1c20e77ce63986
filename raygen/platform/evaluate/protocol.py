"""Evaluation presets from the papers' tables: `raygen eval MODEL --protocol paper[:KEY]`.

A family plugin declares the rows of its paper's results table that a model of one of its sizes
reproduces (`Family.paper_rows`, `raygen.families.base.PaperRow`): the sampling settings the paper
evaluated with and the paper's own scores. `--protocol paper` takes the first row of the model's
size, `--protocol paper:KEY` another one. The protocol sets, on top of the model's own sampling
defaults (and instead of the knobs a sweep tagged on its alias):

- eval.n = the paper's sample count (FID-50K: 50,000), labels cycling over every class (50 per
  class for ImageNet), seeds per batch (independent of the worker count, as always);
- every sample.* setting the row names (CFG scale and schedule, steps, temperatures, the family's
  knobs).

Flags and key=value overrides still win; each setting that then differs from the row's is
reported (`departures`), and the evaluation is recorded as the protocol "with changes".
"""

from __future__ import annotations

from typing import Any

from raygen.errors import ConfigError, UserError
from raygen.families.base import PaperRow

PAPER = "paper"


def _rows_of(meta: dict[str, Any]) -> tuple[Any, tuple[PaperRow, ...]]:
    from raygen.platform.evaluate.sampling import family_of

    family = family_of(meta)
    return family, tuple(family.paper_rows)


def protocol_row(meta: dict[str, Any], protocol: str) -> PaperRow:
    """The paper row `protocol` ("paper" or "paper:KEY") names for an export, or one clear error."""
    name, _, key = str(protocol).partition(":")
    if name != PAPER:
        raise ConfigError(f"eval.protocol={protocol!r}: the protocols are 'paper' (the paper's table row for the model's "
                          f"size) and 'paper:KEY' (another row of that size)")
    family, rows = _rows_of(meta)
    size = family.paper_size(meta)
    if not rows:
        raise UserError(f"family {family.name} declares no paper table rows, so --protocol paper has nothing to reproduce")
    mine = [r for r in rows if r.size == size]
    if not mine:
        sizes = ", ".join(dict.fromkeys(r.size for r in rows))
        raise UserError(f"the model is {family.name} size {size}; the paper's table has rows for sizes {sizes} only "
                        f"(--protocol paper evaluates a model of one of those sizes)")
    if key:
        picked = [r for r in mine if r.key == key]
        if not picked:
            raise UserError(f"--protocol paper:{key}: {family.name} {size} has rows "
                            f"{', '.join(r.key for r in mine)} (the first is the default)")
        row = picked[0]
    else:
        row = mine[0]
    image_size = int(meta["tokenizer"]["image_size"])
    if image_size != row.resolution:
        raise UserError(f"the paper row {describe(row)} is at {row.resolution}x{row.resolution}; the model makes "
                        f"{image_size}x{image_size} images")
    return row


def settings(row: PaperRow) -> dict[str, Any]:
    """The row as config flags: eval.n, all classes, and every sample.* setting it names."""
    out: dict[str, Any] = {"eval.n": row.n, "sample.labels": "all"}
    for k, v in row.sample.items():
        if k == "knobs":
            out.update({f"sample.knobs.{kk}": vv for kk, vv in v.items()})
        else:
            out[f"sample.{k}"] = v
    return out


def departures(cfg, row: PaperRow) -> list[str]:
    """Settings of the final config that differ from the row's: 'sample.cfg_scale=3.0 (the paper: 5.0)'."""
    out = []
    for key, want in settings(row).items():
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        same = (float(node) == float(want)) if isinstance(want, (int, float)) and not isinstance(want, bool) \
            and isinstance(node, (int, float)) else node == want
        if not same:
            out.append(f"{key}={node} (the paper: {want})")
    return out


def describe(row: PaperRow) -> str:
    """'<model>, <key> (<paper>, <table>)': the row as a reader finds it in the paper."""
    return f"{row.model}, {row.key} ({row.paper})"


def record(row: PaperRow, changed: list[str]) -> dict[str, Any]:
    """What an evaluation records about its protocol (eval JSON, MLflow tag, report)."""
    return {"name": f"{PAPER}:{row.key}", "paper": row.paper, "model": row.model, "size": row.size,
            "params": row.params, "sample": row.sample, "n": row.n, "changed": changed,
            "scores": {"fid": row.fid, "is": row.inception_score, "precision": row.precision, "recall": row.recall,
                       "images_per_s": row.images_per_s, "throughput_setup": row.throughput_setup}}

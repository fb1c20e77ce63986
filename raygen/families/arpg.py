"""Family `arpg`: randomized parallel AR over token ids (raygen/models/arpg.py), with editing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from raygen.families import register
from raygen.families.base import Family, PaperRow
from raygen.options import option


@dataclass
class ARPGKnobs:
    order: Literal["random", "raster", "spiral-in", "spiral-out", "z-curve", "alternate"] = option(
        "random", help="generation order: random draws one permutation per sample, the others scan the grid")
    schedule: Literal["arccos", "cosine"] = option("arccos", help="how many tokens each decoding step reveals")
    cfg_schedule: Literal["linear", "constant"] = option("linear", help="guidance ramp over the decoding steps")


# --- the paper's rows ------------------------------------------------------------------------
# v5 (docs/models.md: "v5 Table 2, 256px; 1xA800, batch 64, bf16, token generation only"): FID and
# throughput only (IS/P/R of v5 are not in the sources). Sampling: arccos steps, linear CFG, temperature
# 1, no top-k/top-p (the paper's setting, models.md); the CFG scale of each row is the best-FID scale that
# v5 Table 8 lists for its size and step count (an inference: v1's Table 2 FIDs are its Table 6 best-CFG
# FIDs). v1 (papers/ARPG.md, the numbers models.md gives for arXiv v1 and the README): Table 2 with
# IS/P/R, Table 6 the CFG of each row and the other step counts; cosine steps, as the README zoo that
# reports the same FIDs. Left out: 512 px rows (no 512 px size), v5 Table 8's 16/256-step scales (no FID in
# the sources), Table 7's generation orders (the caption says they were "tuned on" the random-order model;
# no CFG given) and Table 5's ablation models.
V5 = "ARPG (arXiv 2503.10568 v5), Table 2"
V5_SETUP = "1xA800-80GB, batch 64, bf16, token generation only"
V5_NOTE = ("FID and images/s from v5 Table 2 (docs/models.md); CFG = v5 Table 8's best-FID scale for this size "
           "and step count (inferred to be the scale behind Table 2); linear CFG, arccos, temperature 1, no "
           "top-k/top-p as models.md gives the paper's setting.")
V1_SETUP = "1xA800-80GB, batch 64, bf16"
V1_NOTE = ("arXiv v1 numbers (papers/ARPG.md; models.md: v1 and the README report these FIDs with the cosine "
           "schedule); CFG from v1 Table 6 (the best-FID scale). Assumed: linear CFG (the official sampler's "
           "default; v1's CFG schedule is not in the sources), temperature 1, no top-k/top-p.")


def _sample(steps: int, cfg: float, schedule: str) -> dict:
    return {"cfg_scale": cfg, "steps": steps, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "knobs": {"order": "random", "schedule": schedule, "cfg_schedule": "linear"}}


def _v5(size: str, params: str, steps: int, cfg: float, fid: float, images_per_s: float) -> PaperRow:
    return PaperRow(key=f"{steps}-steps", size=size, paper=V5, model=f"ARPG-{size}", params=params,
                    sample=_sample(steps, cfg, "arccos"), fid=fid, images_per_s=images_per_s,
                    throughput_setup=V5_SETUP, note=V5_NOTE)


def _v1(size: str, params: str, steps: int, cfg: float, fid: float, images_per_s: float,
        scores: tuple[float, float, float] | None = None) -> PaperRow:
    """scores: (IS, precision, recall) for the rows of v1 Table 2; None: a Table 6 row (FID only)."""
    inception_score, precision, recall = scores or (None, None, None)
    paper = "ARPG (arXiv 2503.10568 v1), " + ("Table 2 (CFG: Table 6)" if scores else "Table 6")
    return PaperRow(key=f"v1-{steps}-steps", size=size, paper=paper, model=f"ARPG-{size}", params=params,
                    sample=_sample(steps, cfg, "cosine"), fid=fid, inception_score=inception_score,
                    precision=precision, recall=recall, images_per_s=images_per_s, throughput_setup=V1_SETUP,
                    note=V1_NOTE)


ARPG_PAPER_ROWS: tuple[PaperRow, ...] = (
    _v5("L", "320M", 64, 5.1, 2.37, 67.5),
    _v5("L", "320M", 32, 5.4, 2.30, 130.1),
    _v1("L", "320M", 64, 4.5, 2.44, 62.12, (287.1, 0.82, 0.55)),
    _v1("L", "320M", 32, 5.5, 2.44, 113.01, (291.7, 0.82, 0.55)),
    _v1("L", "320M", 128, 4.5, 2.46, 32.28),
    _v1("L", "320M", 256, 4.5, 2.41, 16.32),
    _v5("XL", "719M", 64, 5.3, 1.99, 45.1),
    _v5("XL", "719M", 32, 6.6, 1.93, 80.6),
    _v1("XL", "719M", 64, 6.0, 2.10, 35.89, (331.0, 0.79, 0.61)),
    _v1("XL", "719M", 32, 8.0, 2.21, 67.87),
    _v1("XL", "719M", 128, 6.0, 2.09, 20.36),
    _v1("XL", "719M", 256, 6.0, 2.07, 10.52),
    _v5("XXL", "1.3B", 64, 6.3, 1.86, 31.7),
    _v5("XXL", "1.3B", 32, 6.5, 1.83, 55.3),
    _v1("XXL", "1.3B", 64, 7.5, 1.94, 25.39, (339.7, 0.81, 0.59)),
    _v1("XXL", "1.3B", 32, 10.0, 2.08, 44.17),
    _v1("XXL", "1.3B", 128, 7.5, 1.97, 14.63),
    _v1("XXL", "1.3B", 256, 7.5, 1.95, 7.25),
)


class ARPG(Family):
    name = "arpg"
    knobs = ARPGKnobs
    paper_rows = ARPG_PAPER_ROWS

    def can_edit(self, meta: dict[str, Any]) -> bool:
        return True


register(ARPG())

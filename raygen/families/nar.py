"""Family `nar`: next-neighbour AR over token ids (raygen/models/nar.py)."""

from __future__ import annotations

from dataclasses import dataclass

from raygen.families import register
from raygen.families.base import Family, PaperRow
from raygen.options import option


@dataclass
class NARKnobs:
    cfg_interval: int = option(-1, min=-1, help="guide only the first N decoding passes (-1 = every pass)")


# NAR's Table 1 (ImageNet 256): every size at 31 passes (2 x 16 - 1) and CFG 2 (the caption); temperature
# 1 and no top-k/top-p are the official FID script's (docs/models.md), with CFG on every pass.
TABLE_1 = "NAR (arXiv 2503.10696), Table 1"
SETUP = "1xA100-80GB, the largest batch that fits"
SAMPLE = {"cfg_scale": 2.0, "steps": 31, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "knobs": {"cfg_interval": -1}}
NOTE = ("CFG 2 from the caption; temperature 1, top-k 0, top-p 1 and CFG on every pass (cfg_interval -1) are the "
        "official sample_c2i.sh FID setting (docs/models.md).")


def _row(size: str, params: str, fid: float, inception_score: float, precision: float, recall: float,
         images_per_s: float) -> PaperRow:
    return PaperRow(key="31-steps", size=size, paper=TABLE_1, model=f"NAR-{size}", params=params,
                    sample={**SAMPLE, "knobs": dict(SAMPLE["knobs"])}, fid=fid, inception_score=inception_score,
                    precision=precision, recall=recall, images_per_s=images_per_s, throughput_setup=SETUP, note=NOTE)


NAR_PAPER_ROWS: tuple[PaperRow, ...] = (
    _row("B", "130M", 4.65, 212.3, 0.83, 0.47, 419.7),
    _row("M", "290M", 3.27, 257.5, 0.82, 0.53, 248.5),
    _row("L", "372M", 3.06, 263.9, 0.81, 0.53, 195.4),
    _row("XL", "816M", 2.70, 277.5, 0.81, 0.58, 98.1),
    _row("XXL", "1.46B", 2.58, 293.5, 0.82, 0.57, 56.9),
)


class NAR(Family):
    name = "nar"
    knobs = NARKnobs
    paper_rows = NAR_PAPER_ROWS


register(NAR())

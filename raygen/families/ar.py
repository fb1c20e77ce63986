"""Family `ar`: LlamaGen's raster-order GPT over token ids (raygen/models/ar.py). Nothing beyond
the defaults: ids in, ids out, no knobs.

Its paper rows are LlamaGen's 256 px numbers as the comparison tables of NAR (Table 1, every size)
and CTF (Tables 1 and 2, B/L/XL) print them; the rows marked with a dagger there (LlamaGen trained
at 384 px, 24x24 tokens) are not models of these sizes and are left out.
"""

from __future__ import annotations

from raygen.families import register
from raygen.families.base import Family, PaperRow

# The sources (docs/models.md, papers/*.md) give no LlamaGen sampling settings: CFG 2.0 is the
# scale NAR's FID script and CTF use on the same LlamaGen substrate; temperature 1 and no top-k /
# top-p are NAR's FID setting. One token per step: 256 steps, as both tables print.
LLAMAGEN_SAMPLE = {"cfg_scale": 2.0, "steps": 256, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
ASSUMED = ("Sampling settings assumed: the sources give none of LlamaGen's; CFG 2.0, temperature 1, "
           "no top-k/top-p is the FID setting NAR and CTF use on the same LlamaGen code.")


def _row(key: str, size: str, paper: str, params: str, fid: float, inception_score: float, precision: float,
         recall: float, images_per_s: float, throughput_setup: str, note: str) -> PaperRow:
    return PaperRow(key=key, size=size, paper=paper, model=f"LlamaGen-{size}", params=params,
                    sample=dict(LLAMAGEN_SAMPLE), fid=fid, inception_score=inception_score, precision=precision,
                    recall=recall, images_per_s=images_per_s, throughput_setup=throughput_setup,
                    note=f"{note} {ASSUMED}")


NAR_TABLE = "NAR (arXiv 2503.10696), Table 1 (LlamaGen baseline)"
NAR_SETUP = "1xA100, the largest batch that fits"
CTF_TABLE = "CTF (arXiv 2503.16194), Tables 1 and 2 (LlamaGen baseline)"
CTF_SETUP = "1xA100, batch 64"
CTF_NOTE = "FID/IS/P/R from Table 1, images/s from Table 2."

AR_PAPER_ROWS: tuple[PaperRow, ...] = (
    _row("nar-t1", "B", NAR_TABLE, "111M", 5.46, 193.6, 0.84, 0.46, 117.9, NAR_SETUP, "As NAR prints it."),
    _row("ctf-t1", "B", CTF_TABLE, "111M", 5.46, 193.61, 0.83, 0.45, 13.75, CTF_SETUP, CTF_NOTE),
    _row("nar-t1", "L", NAR_TABLE, "343M", 3.80, 248.3, 0.83, 0.52, 47.1, NAR_SETUP, "As NAR prints it."),
    _row("ctf-t1", "L", CTF_TABLE, "343M", 3.80, 248.28, 0.83, 0.52, 7.50, CTF_SETUP, CTF_NOTE),
    _row("nar-t1", "XL", NAR_TABLE, "775M", 3.39, 227.1, 0.81, 0.54, 23.7, NAR_SETUP, "As NAR prints it."),
    _row("ctf-t1", "XL", CTF_TABLE, "775M", 3.39, 227.08, 0.81, 0.54, 5.32, CTF_SETUP, CTF_NOTE),
    _row("nar-t1", "XXL", NAR_TABLE, "1.4B", 3.09, 253.6, 0.83, 0.53, 14.1, NAR_SETUP, "As NAR prints it."),
)


class AR(Family):
    name = "ar"
    paper_rows = AR_PAPER_ROWS


register(AR())

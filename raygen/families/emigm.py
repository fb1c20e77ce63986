"""Family `emigm`: masked generation on continuous latents with a per-token diffusion head
(raygen/models/emigm.py). Trains on `latents` columns (the `pixels` or `kl` codecs); the
platform decodes its samples with the data set's codec.

Training-time choices (mask schedule, t_min, diffusion_batch_mul) are model config fields
(`model.arch.mask_schedule=cosine`); the sampling knobs below are the ones the paper ablates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from raygen.errors import ConfigError
from raygen.families import register
from raygen.families.base import Family, PaperRow
from raygen.options import option


@dataclass
class EMIGMKnobs:
    mask_schedule: Literal["exp", "cosine", "linear", "log", "poly-0.5"] = option(
        "exp", help="how many masked tokens each mask-prediction step reveals: 1 - gamma(s)/gamma(t)")
    sampler: Literal["dpm-solver", "ddpm"] = option(
        "dpm-solver", help="the head's sampler: DPM-Solver++ (an ODE; temperature must stay 1) or DDPM "
                           "(sample.temperature scales its noise)")
    solver_steps: int = option(8, min=1, help="head evaluations per token (DPM-Solver++ NFE, or DDPM steps)")
    solver_order: int = option(3, min=1, max=3, help="DPM-Solver++ order (singlestep, steps uniform in logSNR)")
    cfg_schedule: Literal["constant", "linear"] = option(
        "constant", help="guidance weight: constant, or linear 1 + (w - 1) * fraction of tokens known")
    cfg_t_min: float = option(0.1, min=0, max=1,
                              help="guide only the steps whose time s lies in (cfg_t_min, cfg_t_max]")
    cfg_t_max: float = option(0.3, min=0, max=1, help="upper end of the guidance interval (1 = from the first step)")


# eMIGM's Table 2 (ImageNet 256, FID-50K; the summary's extraction splits the table in two and prints the
# 512 px caption under its second half). Settings from the official bash/evaluate scripts (docs/models.md):
# CFG 4.0 constant, exp mask schedule, DPM-Solver++ order 3, temperature 1; 16 mask steps x 8 solver steps
# or 128 x 14, with the CFG interval of each size. The NFE setting names the row (16x1.2 is the first:
# the presets' sampling, and 8x cheaper than 128x1.4). Left out: the 512 px rows (Table 3, DC-AE
# latents and wider heads: no raygen size).
TABLE_2 = "eMIGM (arXiv 2503.07197, ICML'25), Table 2"
NOTE = ("Sampling: the official bash/evaluate settings for this size and NFE (docs/models.md): CFG 4.0 constant, "
        "guided only for s in (cfg_t_min, cfg_t_max], exp mask schedule, DPM-Solver++ (order 3), temperature 1.")


def _row(size: str, params: str, nfe: str, steps: int, solver_steps: int, interval: tuple[float, float],
         fid: float) -> PaperRow:
    knobs = {"mask_schedule": "exp", "sampler": "dpm-solver", "solver_steps": solver_steps, "solver_order": 3,
             "cfg_schedule": "constant", "cfg_t_min": interval[0], "cfg_t_max": interval[1]}
    return PaperRow(key=nfe, size=size, paper=TABLE_2, model=f"eMIGM-{size}", params=params,
                    sample={"cfg_scale": 4.0, "steps": steps, "temperature": 1.0, "knobs": knobs}, fid=fid, note=NOTE)


EMIGM_PAPER_ROWS: tuple[PaperRow, ...] = (
    _row("XS", "69M", "16x1.2", 16, 8, (0.1, 0.3), 4.23),
    _row("XS", "69M", "128x1.4", 128, 14, (0.18, 0.6), 3.62),
    _row("S", "97M", "16x1.2", 16, 8, (0.1, 0.3), 3.44),
    _row("S", "97M", "128x1.4", 128, 14, (0.18, 0.6), 2.87),
    _row("B", "208M", "16x1.2", 16, 8, (0.1, 0.3), 2.79),
    _row("B", "208M", "128x1.35", 128, 14, (0.05, 0.4), 2.32),
    _row("L", "478M", "16x1.2", 16, 8, (0.1, 0.3), 2.22),
    _row("L", "478M", "128x1.4", 128, 14, (0.18, 0.6), 1.72),
    _row("H", "942M", "16x1.2", 16, 8, (0.2, 0.4), 2.02),
    _row("H", "942M", "128x1.4", 128, 14, (0.3, 0.7), 1.57),
)


class EMIGM(Family):
    name = "emigm"
    data_kind = "latents"
    knobs = EMIGMKnobs
    paper_rows = EMIGM_PAPER_ROWS

    def check_knobs(self, knobs: dict[str, Any], meta: dict[str, Any] | None = None) -> EMIGMKnobs:
        checked = super().check_knobs(knobs, meta)
        if not checked.cfg_t_min < checked.cfg_t_max:
            raise ConfigError(f"sample.knobs.cfg_t_min={checked.cfg_t_min} must be below "
                              f"sample.knobs.cfg_t_max={checked.cfg_t_max}")
        if checked.sampler == "dpm-solver" and checked.solver_steps < checked.solver_order:
            raise ConfigError(f"sample.knobs.solver_steps={checked.solver_steps} must be at least "
                              f"sample.knobs.solver_order={checked.solver_order}")
        return checked

    def can_sample(self, meta: dict[str, Any]) -> bool:
        return True


register(EMIGM())

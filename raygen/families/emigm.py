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
from raygen.families.base import Family
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


class EMIGM(Family):
    name = "emigm"
    data_kind = "latents"
    knobs = EMIGMKnobs

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

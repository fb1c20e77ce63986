"""Ancestral DDPM (with MAR's temperature) and DDIM (with eta) on a (respaced) discrete schedule.

Both walk the kept steps k = K-1, ..., 0 of `schedule` (respace it first: "250", "ddim50"),
call the denoiser at the original label `schedule.labels[k]`, and form x0_hat = (x_k -
sqrt(1 - abar_k) eps) / sqrt(abar_k) (no clipping: latents are not in [-1, 1]; MAR and DiT
sample with clip_denoised=False as well).

DDPM (Ho et al.; IDDPM's p_sample):
    x_{k-1} = mu(x0_hat, x_k) + [k > 0] * temperature * exp(0.5 log var) * z,
with mu the posterior mean and log var learned (if the net returns v) or fixed. MAR's
temperature multiplies the noise only (its `p_sample(temperature=...)`); temperature 1 is
plain DDPM.

DDIM (Song et al., eq. 12):
    sigma_k = eta sqrt((1 - abar_{k-1}) / (1 - abar_k)) sqrt(1 - abar_k / abar_{k-1}),
    x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1} - sigma_k^2) eps + [k > 0] sigma_k z.
eta = 0 is the deterministic DDIM; eta = 1 has DDPM's "small" variance.

Both end at abar_{-1} = 1, i.e. return x0_hat of the last step. Noise z comes from `generator`
(on x_T's device); nothing else is random. NFE = K network calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raygen.models.diffusion.guidance import Denoiser
from raygen.models.diffusion.schedule import Schedule


@dataclass
class SampleOut:
    """A sampler's result: x (B, C, ...), network calls `nfe`, B-sized forward passes `passes`."""

    x: torch.Tensor
    nfe: int
    passes: int


class _Counted:
    """Reads a denoiser's counters at entry so a sampler reports only its own evaluations."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser, self.nfe0, self.passes0 = denoiser, denoiser.nfe, denoiser.passes

    def done(self, x: torch.Tensor) -> SampleOut:
        d = self.denoiser
        return SampleOut(x=x, nfe=d.nfe - self.nfe0, passes=d.passes - self.passes0)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _x0_hat(schedule: Schedule, x: torch.Tensor, k: int, eps: torch.Tensor) -> torch.Tensor:
    abar = float(schedule.alphas_cumprod[k])
    return (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


@torch.no_grad()
def ddpm_sample(schedule: Schedule, denoiser: Denoiser, x_T: torch.Tensor, *, temperature: float = 1.0,
                fixed_variance: str = "small", generator: torch.Generator | None = None) -> SampleOut:
    """Ancestral sampling from x_T (B, C, ...) over all kept steps of `schedule`.

    fixed_variance ("small" = bt, "large" = b) is used only when the net has no learned variance.
    """
    count, x = _Counted(denoiser), x_T
    for k in reversed(range(len(schedule))):
        eps, v = denoiser(x, int(schedule.labels[k]))  # (B, C, ...), (B, C, ...) or None
        x0 = _x0_hat(schedule, x, k, eps)
        mean = float(schedule.posterior_mean_coef1[k]) * x0 + float(schedule.posterior_mean_coef2[k]) * x
        if k == 0:
            x = mean
            continue
        log_var = schedule.step_log_variance(k, v, fixed=fixed_variance)  # float, or (B, C, ...) with v
        std = math.exp(0.5 * log_var) if v is None else torch.exp(0.5 * log_var)
        x = mean + temperature * std * _noise(x, generator)
    return count.done(x)


@torch.no_grad()
def ddim_sample(schedule: Schedule, denoiser: Denoiser, x_T: torch.Tensor, *, eta: float = 0.0,
                generator: torch.Generator | None = None) -> SampleOut:
    """DDIM from x_T (B, C, ...) over all kept steps of `schedule`; eta > 0 needs `generator`'s noise."""
    count, x = _Counted(denoiser), x_T
    for k in reversed(range(len(schedule))):
        eps, _ = denoiser(x, int(schedule.labels[k]))  # (B, C, ...)
        x0 = _x0_hat(schedule, x, k, eps)
        abar, abar_prev = float(schedule.alphas_cumprod[k]), float(schedule.alphas_cumprod_prev[k])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if k > 0 and sigma > 0:
            x = x + sigma * _noise(x, generator)
    return count.done(x)

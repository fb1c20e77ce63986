"""The network as the samplers see it: conditioning, classifier-free guidance, and counting.

Network contract. `net(x, t, c)` (or `net(x, t)` when there is no condition) maps x (B, C, ...)
and the original step labels t (B,) to eps (B, C, ...) or, with learned variance, [eps, v]
(B, 2C, ...) on dim 1. Labels are int64 for DDPM/DDIM and fractional (float) for DPM-Solver;
MAR's and DiT's sinusoidal timestep embeddings take either.

Guidance (Ho & Salimans). Inside the guidance interval the network is called once on the
doubled batch [x; x] with conditions [cond; uncond] and returns both halves; the sampler uses

    eps = eps_u + w (eps_c - eps_u)

on ALL eps channels (DiT's `forward_with_cfg` guides only 3 of 4 "for exact reproducibility";
raygen does not). With learned variance only eps is guided; v is the conditional half's (DiT
samples both halves with the same noise and keeps the conditional one, which is the same).

Interval and schedule. Guidance time is u = (label + 1) / N in (0, 1] (1 = pure noise, the
continuous time of DPM-Solver's discrete wrapper). Guidance is on when w != 1 and
lo < u <= hi (eMIGM's `s <= cfg_t_max and s > cfg_t_min`, there applied to the mask-schedule
time of the outer loop; the same `Guidance` works there through `weight`/`active`). Outside
the interval only the conditional half runs. Schedules:
    constant: w_u = w;
    linear:   w_u = 1 + (w - 1) (1 - u).
[I] MAR's "linear" ramps 1 + (w - 1) * (tokens known after the step) / (tokens), i.e. over the
fraction of the generation done; inside one diffusion sampler the fraction done is 1 - u, so
the ramp goes from 1 at pure noise to w at the data. A masked-generation family that ramps
over its outer loop calls `weight(1 - fraction_known)` itself and passes a constant guidance.

Counting. `nfe` counts network calls (one call per solver evaluation, whatever its batch);
`passes` counts B-sized forward passes: a guided call on the doubled batch counts 2, a
conditional-only call 1. passes / nfe is eMIGM's "x 1.2" factor in "NFE 16 x 1.2".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from raygen.models.sampling import cfg_mix

Net = Callable[..., torch.Tensor]
GUIDANCE_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: scale w, a named schedule over time u, an interval (lo, hi]."""

    scale: float = 1.0
    schedule: str = "constant"  # "constant" | "linear" (see the module docstring)
    interval: tuple[float, float] = (0.0, 1.0)  # guided when lo < u <= hi; (0, 1) = always

    def __post_init__(self):
        if self.schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"unknown guidance schedule {self.schedule!r}; expected one of {GUIDANCE_SCHEDULES}")
        lo, hi = self.interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= lo < hi <= 1, got {self.interval}")

    def weight(self, u: float) -> float:
        """w_u at guidance time u in (0, 1]."""
        if self.schedule == "linear":
            return 1.0 + (self.scale - 1.0) * (1.0 - u)
        return self.scale

    def active(self, u: float) -> bool:
        """Whether the unconditional half runs at time u."""
        lo, hi = self.interval
        return self.scale != 1.0 and lo < u <= hi


class Denoiser:
    """net + condition + guidance, called by the samplers at a step label; counts its evaluations.

    cond: a batch-first tensor (B, ...) or None (unconditional net); uncond: the null condition
    with cond's shape (needed for guidance); learned_variance: the net returns [eps, v] (2C).
    """

    def __init__(self, net: Net, *, cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                 guidance: Guidance | None = None, learned_variance: bool = False,
                 num_train_steps: int = 1000):
        self.net, self.cond, self.uncond = net, cond, uncond
        self.guidance = guidance or Guidance()
        if self.guidance.scale != 1.0 and (cond is None or uncond is None):
            raise ValueError("guidance needs both cond and uncond")
        self.learned_variance = learned_variance
        self.num_train_steps = num_train_steps
        self._cond2: torch.Tensor | None = None  # [cond; uncond], built on the first guided call
        self.nfe = 0  # network calls
        self.passes = 0  # B-sized forward passes (a doubled call counts 2)

    def time(self, label: float) -> float:
        """Guidance time u = (label + 1) / N."""
        return (float(label) + 1.0) / self.num_train_steps

    def _call(self, x: torch.Tensor, t: torch.Tensor, c: Any) -> torch.Tensor:
        return self.net(x, t) if c is None else self.net(x, t, c)

    def __call__(self, x: torch.Tensor, label: float | int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps (B, C, ...), v (B, C, ...) or None) at one label shared by the batch x (B, C, ...)."""
        b, ch = x.shape[:2]
        if isinstance(label, int):
            t = torch.full((b,), label, dtype=torch.long, device=x.device)  # (B,)
        else:
            t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            t = torch.full((b,), float(label), dtype=t_dtype, device=x.device)  # (B,)
        u = self.time(label)
        self.nfe += 1
        if self.guidance.active(u):
            if self._cond2 is None:
                self._cond2 = torch.cat([self.cond, self.uncond])  # (2B, ...)
            out = self._call(torch.cat([x, x]), torch.cat([t, t]), self._cond2)  # (2B, C', ...)
            self.passes += 2
            out_c, out_u = out.chunk(2)  # (B, C', ...) each
            eps = cfg_mix(out_c[:, :ch], out_u[:, :ch], self.guidance.weight(u))  # (B, C, ...)
            rest = out_c[:, ch:]
        else:
            out = self._call(x, t, self.cond)  # (B, C', ...)
            self.passes += 1
            eps, rest = out[:, :ch], out[:, ch:]
        if self.learned_variance:
            if rest.shape[1] != ch:
                raise ValueError(f"learned variance needs 2C = {2 * ch} output channels, got {ch + rest.shape[1]}")
            return eps, rest
        if rest.shape[1] != 0:
            raise ValueError(f"net returned {ch + rest.shape[1]} channels for C = {ch}; set learned_variance=True?")
        return eps, None

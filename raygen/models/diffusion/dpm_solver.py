"""DPM-Solver++ (Lu et al. 2022): the data-prediction probability-flow ODE solver, orders 2 and 3.

The ODE. With alpha, sigma, lambda = log(alpha / sigma) of `Schedule` read in continuous time
(log alpha interpolated between step labels, as DPM-Solver's `NoiseScheduleVP('discrete')`),
and the data prediction D(x, lambda) = (x - sigma eps_hat) / alpha, the exact solution from s to t is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D(x_lambda, lambda) dlambda.

Expanding D in lambda around lambda_s with h = lambda_t - lambda_s, phi_1 = expm1(-h),
phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2:

    x_t ~ (sigma_t / sigma_s) x_s - alpha_t phi_1 D_s + alpha_t h phi_2 D'_s - alpha_t h^2 phi_3 D''_s ...

- order 1 (= DDIM): the first two terms.
- singlestep 2 ("2S"): one extra evaluation at lambda_s + h/2, D' from the difference, with the
  official "dpmsolver" form -(0.5 / r1) alpha_t phi_1 (D_s1 - D_s).
- singlestep 3 ("3S"): evaluations at r1 = 1/3, r2 = 2/3 of the step (the second built with a
  second-order predictor), then + (1 / r2) alpha_t phi_2 (D_s2 - D_s).
- multistep 2/3 ("2M"/"3M"): D' and D'' from the previous steps' evaluations (backward
  differences scaled by the lambda step ratios); the first steps warm up with lower orders.
  [I] 3M: with history at lambda_0 - h_0 - h_1, lambda_0 - h_0, lambda_0, the divided
  differences give D1 ~ h D' and (D1_0 - D1_1) / (r0 + r1) ~ h^2 D'' / 2, so the h^2 phi_3 D''
  term needs twice the latter. The official `multistep_dpm_solver_third_update` (and
  diffusers') uses it once, which leaves 3M second order (on the Gaussian test problem the
  official 3M's error falls at order ~2.0, raygen's at >= 3). raygen uses the factor 2 and
  tests that a 3M step is exact for a quadratic D(lambda); eMIGM samples with singlestep
  order 3, which this does not touch.

Checked against the official `dpm_solver.py` (out of tree, Gaussian data, float64): 3S at 8
and 14 steps, 2S at 8 and 2M at 8 and 14 steps agree to < 1e-11.

Steps (as the official `DPM_Solver.sample`, skip_type="logSNR"; `steps` is the NFE):
- singlestep order 3: K = steps // 3 + 1 outer intervals, uniform in lambda; orders
  [3]*(K-2)+[2,1] if steps % 3 == 0, [3]*(K-1)+[1] if 1, [3]*(K-1)+[2] if 2 (eMIGM's head:
  order 3 singlestep, 8 or 14 steps). Order 2: [2]*(steps // 2), plus [1] if steps is odd.
  Inner points are uniform in lambda inside each interval.
- multistep: `steps` intervals uniform in lambda; with lower_order_final and steps < 10 the
  last steps drop to order min(order, steps_left) (the official stabilisation).

Time range. It runs from the noisiest step label down to label 0 (t_0 = 1/N, not t = 0: no
final denoising step, official default). The official wrapper first drops the noisiest steps
whose lambda < -5.1 (cosine: 4 of 1000) and then re-grids t = (i+1)/N' over the N' = 996 left,
which feeds the network labels i * 1000/996 instead of i. [I] raygen keeps the labels exact and
starts at the noisiest label with lambda >= lambda_min instead (the same noise level up to
that relabelling; the differences are at most 4 labels near pure noise).

NFE = `steps` network calls (counted by the `Denoiser`). Deterministic: no generator.
"""

from __future__ import annotations

import math

import torch

from raygen.models.diffusion.guidance import Denoiser
from raygen.models.diffusion.samplers import SampleOut, _Counted
from raygen.models.diffusion.schedule import Schedule

METHODS = ("singlestep", "multistep")


def singlestep_orders(steps: int, order: int) -> list[int]:
    """Per-interval orders of the singlestep solver for a budget of `steps` evaluations."""
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 1:
        return [1] * steps
    raise ValueError(f"order must be 1, 2 or 3, got {order}")


class _Ode:
    """The solver's view of the schedule: (alpha, sigma, lambda) at labels, and x -> D(x)."""

    def __init__(self, schedule: Schedule, denoiser: Denoiser):
        self.schedule, self.denoiser = schedule, denoiser

    def point(self, lam: float) -> tuple[float, float, float, float]:
        """(label, alpha, sigma, lambda) at half-logSNR lam."""
        label = float(self.schedule.label_at(torch.tensor(lam)))
        alpha = 1 / math.sqrt(1 + math.exp(-2 * lam))  # alpha^2 = sigmoid(2 lambda)
        return label, alpha, math.sqrt(1 - alpha**2), lam

    def data(self, x: torch.Tensor, p: tuple[float, float, float, float]) -> torch.Tensor:
        """D(x) = (x - sigma eps_hat) / alpha at point p; x (B, C, ...)."""
        label, alpha, sigma, _ = p
        eps, _ = self.denoiser(x, label)  # (B, C, ...)
        return (x - sigma * eps) / alpha


def _first(x, d_s, ps, pt):
    """Order 1: x_t = (sigma_t / sigma_s) x - alpha_t phi_1 D_s."""
    h = pt[3] - ps[3]
    return (pt[2] / ps[2]) * x - pt[1] * math.expm1(-h) * d_s


def _singlestep(ode: _Ode, x: torch.Tensor, ps, pt, order: int) -> torch.Tensor:
    """One singlestep update of `order` from point ps to pt (order evaluations)."""
    d_s = ode.data(x, ps)
    if order == 1:
        return _first(x, d_s, ps, pt)
    h = pt[3] - ps[3]
    phi_1 = math.expm1(-h)
    if order == 2:
        r1 = 0.5
        p1 = ode.point(ps[3] + r1 * h)
        d_1 = ode.data(_first(x, d_s, ps, p1), p1)
        return _first(x, d_s, ps, pt) - (0.5 / r1) * pt[1] * phi_1 * (d_1 - d_s)
    r1, r2 = 1 / 3, 2 / 3
    p1, p2 = ode.point(ps[3] + r1 * h), ode.point(ps[3] + r2 * h)
    d_1 = ode.data(_first(x, d_s, ps, p1), p1)
    phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1
    x_2 = _first(x, d_s, ps, p2) + (r2 / r1) * p2[1] * phi_22 * (d_1 - d_s)
    d_2 = ode.data(x_2, p2)
    phi_2 = phi_1 / h + 1
    return _first(x, d_s, ps, pt) + (1 / r2) * pt[1] * phi_2 * (d_2 - d_s)


def _multistep(x: torch.Tensor, hist: list, pt, order: int) -> torch.Tensor:
    """One multistep update from the last history point using `order` stored evaluations.

    hist: [(point, D), ...] oldest first; the step starts at hist[-1].
    """
    p0, m0 = hist[-1]
    h = pt[3] - p0[3]
    phi_1 = math.expm1(-h)
    x_t = _first(x, m0, p0, pt)
    if order == 1:
        return x_t
    p1, m1 = hist[-2]
    r0 = (p0[3] - p1[3]) / h
    d1_0 = (m0 - m1) / r0
    if order == 2:
        return x_t - 0.5 * pt[1] * phi_1 * d1_0
    p2, m2 = hist[-3]
    r1 = (p1[3] - p2[3]) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = 2 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 D'' ([I] the official code omits the 2; see the module doc)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return x_t + pt[1] * phi_2 * d1 - pt[1] * phi_3 * d2


def start_label(schedule: Schedule, lambda_min: float = -5.1) -> float:
    """The noisiest kept label whose half-logSNR is >= lambda_min (the solver's start)."""
    lam = schedule.half_log_snr(schedule.labels.to(torch.float64))  # (K,) decreasing
    ok = (lam >= lambda_min).nonzero()
    if len(ok) == 0:
        raise ValueError(f"no step has half-logSNR >= {lambda_min}")
    return float(schedule.labels[int(ok.max())])


@torch.no_grad()
def dpm_solver_pp_sample(schedule: Schedule, denoiser: Denoiser, x_T: torch.Tensor, *, steps: int,
                         order: int = 3, method: str = "singlestep", lower_order_final: bool = True,
                         lambda_min: float = -5.1) -> SampleOut:
    """Solve the PF-ODE from x_T (B, C, ...) at the start label down to label 0 in `steps` NFE."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if order not in (1, 2, 3) or steps < order:
        raise ValueError(f"need order in 1..3 and steps >= order, got order={order}, steps={steps}")
    count, ode = _Counted(denoiser), _Ode(schedule, denoiser)
    lam_T = float(schedule.half_log_snr(torch.tensor(start_label(schedule, lambda_min))))
    lam_0 = float(schedule.half_log_snr(schedule.labels[:1].to(torch.float64)))
    x = x_T
    if method == "singlestep":
        orders = singlestep_orders(steps, order)
        lams = torch.linspace(lam_T, lam_0, len(orders) + 1, dtype=torch.float64).tolist()
        for k, step_order in enumerate(orders):
            x = _singlestep(ode, x, ode.point(lams[k]), ode.point(lams[k + 1]), step_order)
        return count.done(x)
    lams = torch.linspace(lam_T, lam_0, steps + 1, dtype=torch.float64).tolist()
    p = ode.point(lams[0])
    hist = [(p, ode.data(x, p))]
    for i in range(1, steps + 1):
        step_order = min(order, i)
        if lower_order_final and steps < 10:
            step_order = min(step_order, steps + 1 - i)
        p = ode.point(lams[i])
        x = _multistep(x, hist, p, step_order)
        if i < steps:  # the last evaluation would be unused
            hist = (hist + [(p, ode.data(x, p))])[-order:]
    return count.done(x)

"""Discrete variance-preserving noise schedules, respacing, and their continuous-time reading.

Forward process (DDPM). With betas b_n over n = 0..N-1 and abar_n = prod_{m<=n} (1 - b_m):

    q(x_n | x_0) = N(sqrt(abar_n) x_0, (1 - abar_n) I),   x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps.

The reverse posterior is Gaussian:

    q(x_{n-1} | x_n, x_0) = N(c1_n x_0 + c2_n x_n, bt_n),
    c1_n = b_n sqrt(abar_{n-1}) / (1 - abar_n),   c2_n = (1 - abar_{n-1}) sqrt(1 - b_n) / (1 - abar_n),
    bt_n = b_n (1 - abar_{n-1}) / (1 - abar_n)    with abar_{-1} = 1, so bt_0 = 0.

Its log is "clipped" as in IDDPM: log bt_0 is replaced by log bt_1 (bt_0 = 0 would give -inf).

Respacing (IDDPM `space_timesteps`). A respaced schedule keeps a subset S of the N steps and
rebuilds its betas from the kept abar: b'_k = 1 - abar_{S_k} / abar_{S_{k-1}}. So it has
exactly the original abar at the kept steps, and the network is still called with the
original step labels S_k (`Schedule.labels`).

Continuous time (DPM-Solver's `NoiseScheduleVP('discrete')`). Step label n sits at continuous
time t = (n + 1) / N, and log alpha_t = 0.5 log abar is interpolated piecewise linearly in t
between the kept labels (alpha_t = sqrt(abar), sigma_t^2 = 1 - alpha_t^2,
lambda_t = log(alpha_t / sigma_t), the half-logSNR). Here the interpolation is written in the
label n itself, which is the same function since t is affine in n; the solver passes the
(fractional) label straight to the network, as the official wrapper's (t - 1/N) * 1000 does.

All tables are float64 on the CPU; samplers read scalars as Python floats and training gathers
per-sample values onto the data's device (cached per device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange

MAX_BETA = 0.999  # IDDPM's cap for the cosine schedule (its last step would otherwise be beta = 1)


def linear_betas(num_steps: int = 1000) -> torch.Tensor:
    """DDPM/DiT linear betas from 1e-4 to 0.02, rescaled by 1000 / num_steps (IDDPM's "linear")."""
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int = 1000, s: float = 0.008) -> torch.Tensor:
    """IDDPM's cosine schedule (MAR/diffusers `squaredcos_cap_v2`): abar(u) = cos^2((u + s)/(1 + s) pi/2).

    b_n = min(1 - abar((n+1)/N) / abar(n/N), 0.999).
    """
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=MAX_BETA)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def space_timesteps(num_steps: int, spec: str | Sequence[int] | None) -> list[int]:
    """The kept step labels (sorted) for a respacing spec, with IDDPM's `space_timesteps` semantics.

    - None, "" : all steps.
    - "ddimK"  : range(0, N, stride) for the smallest integer stride giving exactly K steps.
    - "a,b,c" or [a, b, c] : split the N steps into len(counts) near-equal sections (the first
      N % len sections one step longer) and take `count` evenly spaced steps in each, endpoints
      included (positions rounded with Python's round, as IDDPM does).
    """
    if spec is None or spec == "":
        return list(range(num_steps))
    if isinstance(spec, str) and spec.startswith("ddim"):
        want = int(spec[len("ddim"):])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == want:
                return list(range(0, num_steps, stride))
        raise ValueError(f"cannot make exactly {want} steps out of {num_steps} with an integer stride")
    counts = [int(c) for c in spec.split(",")] if isinstance(spec, str) else [int(c) for c in spec]
    size, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if not 0 < count <= length:
            raise ValueError(f"cannot take {count} steps from a section of {length} steps (spec {spec!r})")
        stride = (length - 1) / (count - 1) if count > 1 else 1.0
        kept += [start + round(j * stride) for j in range(count)]
        start += length
    return sorted(set(kept))


def interp(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through increasing knots (xp, yp); linear extrapolation past the ends."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], yp[i - 1], yp[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def learned_range(var_values, min_log, max_log):
    """IDDPM's learned range: v in [-1, 1] -> frac = (v + 1)/2, log var = frac max_log + (1 - frac) min_log."""
    frac = (var_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


class Schedule:
    """A discrete VP schedule over the kept steps k = 0..K-1 (K = N unless respaced).

    `labels[k]` is the original step label fed to the network (0..num_train_steps-1).
    """

    def __init__(self, betas: torch.Tensor, *, labels: torch.Tensor | None = None,
                 num_train_steps: int | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas  # (K,)
        self.labels = torch.arange(len(betas)) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.num_train_steps = num_train_steps or len(betas)
        abar = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        prev = self.alphas_cumprod_prev
        self.posterior_variance = betas * (1 - prev) / (1 - abar)
        # log bt clipped: bt_0 = 0, so step 0 borrows bt_1 (IDDPM); a 1-step schedule keeps log(0).
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else pv)
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1 - abar)
        self.posterior_mean_coef2 = (1 - prev) * (1 - betas).sqrt() / (1 - abar)
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def named(cls, name: str, num_steps: int = 1000) -> "Schedule":
        """"linear" (DiT, D2iT) or "cosine" (MAR, eMIGM) over num_steps steps."""
        if name not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {name!r}; expected one of {sorted(BETA_SCHEDULES)}")
        return cls(BETA_SCHEDULES[name](num_steps))

    def __len__(self) -> int:
        return len(self.betas)

    def respace(self, spec: str | Sequence[int] | None) -> "Schedule":
        """Keep the steps chosen by `space_timesteps(len(self), spec)`; betas from the kept abar."""
        kept = torch.tensor(space_timesteps(len(self), spec))
        abar = self.alphas_cumprod[kept]
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return Schedule(betas, labels=self.labels[kept], num_train_steps=self.num_train_steps)

    # -- per-sample coefficients (training) -------------------------------------------------
    def gather(self, name: str, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at step indices k (B,), cast to like's dtype and shaped (B, 1, ..., 1)."""
        key = (name, k.device)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(k.device)
        vals = self._on_device[key][k].to(like.dtype)  # (B,)
        return rearrange(vals, "b -> b" + " 1" * (like.dim() - 1))

    def q_sample(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise; x0, noise (B, ...), k (B,)."""
        abar = self.gather("alphas_cumprod", k, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, k: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_k - sqrt(1 - abar_k) eps) / sqrt(abar_k)."""
        abar = self.gather("alphas_cumprod", k, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{k-1} | x_k, x0) = c1_k x0 + c2_k x_k."""
        return self.gather("posterior_mean_coef1", k, x_t) * x0 + self.gather("posterior_mean_coef2", k, x_t) * x_t

    def model_log_variance(self, k: torch.Tensor, like: torch.Tensor, var_values: torch.Tensor | None = None,
                           *, fixed: str = "small") -> torch.Tensor:
        """log of the reverse-step variance, broadcastable to `like`.

        Learned range (IDDPM): v in [-1, 1] (the network's second C channels), frac = (v + 1)/2,
        log var = frac log b_k + (1 - frac) log bt_k (clipped). Without v: fixed "small" = log bt_k
        (clipped) or fixed "large" = log b_k with step 0 using bt_1 (IDDPM's FIXED_LARGE).
        """
        min_log = self.gather("posterior_log_variance_clipped", k, like)
        if var_values is not None:
            return learned_range(var_values, min_log, self.gather("betas", k, like).log())
        if fixed == "small":
            return min_log
        if fixed == "large":
            large = self.gather("betas", k, like).log()
            return torch.where(rearrange(k, "b -> b" + " 1" * (like.dim() - 1)) == 0, min_log, large)
        raise ValueError(f"fixed variance must be 'small' or 'large', got {fixed!r}")

    def step_log_variance(self, k: int, var_values: torch.Tensor | None = None, *, fixed: str = "small"):
        """`model_log_variance` at one step index k shared by the batch (a float without v)."""
        min_log, max_log = float(self.posterior_log_variance_clipped[k]), math.log(float(self.betas[k]))
        if var_values is not None:
            return learned_range(var_values, min_log, max_log)
        if fixed not in ("small", "large"):
            raise ValueError(f"fixed variance must be 'small' or 'large', got {fixed!r}")
        return max_log if fixed == "large" and k > 0 else min_log

    def sample_steps(self, n: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """n step indices uniform on 0..K-1 (int64), drawn from `generator` (which lives on `device`)."""
        return torch.randint(0, len(self), (n,), generator=generator, device=device)

    # -- continuous-time reading (DPM-Solver) -------------------------------------------------
    def log_alpha(self, label: torch.Tensor) -> torch.Tensor:
        """log alpha at a (fractional) label: 0.5 log abar interpolated linearly between kept labels."""
        knots = self.labels.to(torch.float64)
        return interp(label.to(torch.float64), knots, 0.5 * self.alphas_cumprod.log())

    def alpha_bar(self, label: torch.Tensor) -> torch.Tensor:
        """abar at a (fractional) label; equals `alphas_cumprod` at the kept labels."""
        return torch.exp(2 * self.log_alpha(label))

    def half_log_snr(self, label: torch.Tensor) -> torch.Tensor:
        """lambda = log alpha - log sigma = log alpha - 0.5 log(1 - alpha^2)."""
        log_a = self.log_alpha(label)
        return log_a - 0.5 * torch.log(-torch.expm1(2 * log_a))

    def label_at(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of `half_log_snr`: alpha^2 = sigmoid(2 lambda), then invert the interpolation."""
        log_a = -0.5 * torch.nn.functional.softplus(-2 * lam.to(torch.float64))
        knots = 0.5 * self.alphas_cumprod.log()  # decreasing in the label
        return interp(log_a, knots.flip(0), self.labels.to(torch.float64).flip(0))

"""Training objectives: epsilon-prediction MSE and IDDPM's hybrid loss (MSE + VLB) for learned variance.

Epsilon prediction (DDPM): the network sees x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps and
predicts eps; the loss is (eps_hat - eps)^2.

Learned-range variance (IDDPM, used by DiT, MAR and eMIGM): the network outputs 2C channels
on dim 1, [eps_hat, v]. The reverse step p(x_{k-1} | x_k) = N(mu_hat, exp(log var)) has
    mu_hat  = posterior mean of q(x_{k-1} | x_k, x0_hat),  x0_hat from eps_hat,
    log var = frac log b_k + (1 - frac) log bt_k,  frac = (v + 1) / 2.
The VLB term for step k > 0 is KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k)); at k = 0 it is
the decoder's negative log-likelihood of x0 under N(mu_hat, var). Both are in bits (nats /
log 2), as IDDPM reports them. The hybrid loss is MSE + VLB where the VLB sees eps_hat with
its gradient stopped ("frozen_out"), so the VLB only trains the variance (lambda = 1, i.e.
IDDPM's plain MSE loss type, which DiT and MAR use; not the RESCALED_MSE 1/1000 weighting).

Decoder at k = 0. IDDPM scores x0 under a Gaussian discretised to 256 bins of width 2/255 on
[-1, 1], with the edge bins open (x < -0.999 or x > 0.999), using the tanh approximation of
the normal CDF. MAR and eMIGM keep exactly this for their continuous latent tokens (their
`diffusion_utils.py` is IDDPM's), so it is the default here. [I] `decoder="gaussian"` scores x0
with the continuous Gaussian density instead, which is the natural choice for continuous
tokens; it is an option, not the default, so that loss values match MAR's.

Reduction. [I] Everything is returned per element, with x0's shape (B, C, ...): a family
weights or masks it and reduces itself. The mean over the non-batch dims is exactly
IDDPM's per-sample `loss` (mean_flat(mse) + mean_flat(vb)); for MAR/eMIGM, whose head sees
tokens as (N, C) rows, that mean is the per-token loss they mask and average.
"""

from __future__ import annotations

import math

import torch

from raygen.models.diffusion.schedule import Schedule

LOG2 = math.log(2.0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats.

    = 0.5 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2) - 1).
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Phi(x) IDDPM uses: 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, mean: torch.Tensor, log_scale: torch.Tensor,
                                        half_bin: float = 1 / 255) -> torch.Tensor:
    """log P(bin of x) under N(mean, e^(2 log_scale)), per element in nats (IDDPM's decoder).

    The bin is [x - half_bin, x + half_bin]; for x < -0.999 it is (-inf, x + half_bin], for
    x > 0.999 it is [x - half_bin, inf). Probabilities are clamped at 1e-12 before the log.
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - mean + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - mean - half_bin))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def gaussian_log_likelihood(x: torch.Tensor, *, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, e^(2 log_scale)) per element in nats (the continuous decoder, [I])."""
    return -0.5 * (math.log(2 * math.pi) + 2 * log_scale + (x - mean) ** 2 * torch.exp(-2 * log_scale))


DECODERS = {"discretized": discretized_gaussian_log_likelihood, "gaussian": gaussian_log_likelihood}


def vlb_terms(schedule: Schedule, *, x0: torch.Tensor, x_t: torch.Tensor, k: torch.Tensor, eps: torch.Tensor,
              var_values: torch.Tensor | None, decoder: str = "discretized", fixed: str = "small") -> torch.Tensor:
    """The VLB term of step k per element, in bits: KL for k > 0, decoder NLL for k = 0.

    x0, x_t, eps (B, C, ...); k (B,) step indices of `schedule`; var_values (B, C, ...) or None
    (then the fixed variance `fixed` is used). Pass eps detached for IDDPM's hybrid loss.
    """
    true_mean = schedule.posterior_mean(x0, x_t, k)  # (B, C, ...)
    true_logvar = schedule.gather("posterior_log_variance_clipped", k, x_t)  # (B, 1, ...)
    mean = schedule.posterior_mean(schedule.predict_x0(x_t, k, eps), x_t, k)  # (B, C, ...)
    logvar = schedule.model_log_variance(k, x_t, var_values, fixed=fixed)  # (B, C or 1, ...)
    kl = normal_kl(true_mean, true_logvar, mean, logvar) / LOG2
    nll = -DECODERS[decoder](x0, mean=mean, log_scale=0.5 * logvar) / LOG2
    first = (k == 0).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, ...)
    return torch.where(first, nll, kl)


def diffusion_loss(schedule: Schedule, model_out: torch.Tensor, *, x0: torch.Tensor, x_t: torch.Tensor,
                   k: torch.Tensor, noise: torch.Tensor, decoder: str = "discretized") -> dict[str, torch.Tensor]:
    """Per-element losses for an eps-predicting network's output at x_t = q_sample(x0, k, noise).

    model_out (B, C, ...) -> eps MSE only; (B, 2C, ...) -> learned range, hybrid MSE + VLB.
    Returns {"mse", "loss"} and, with learned variance, "vb"; each (B, C, ...) like x0.
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {sorted(DECODERS)}")
    c = x0.shape[1]
    if model_out.shape[1] not in (c, 2 * c) or model_out.shape[2:] != x0.shape[2:]:
        raise ValueError(f"model output {tuple(model_out.shape)} must be x0's shape {tuple(x0.shape)} "
                         f"with C or 2C channels on dim 1")
    eps, var_values = (model_out, None) if model_out.shape[1] == c else model_out.split(c, dim=1)
    out = {"mse": (eps - noise) ** 2}  # (B, C, ...)
    if var_values is None:
        out["loss"] = out["mse"]
        return out
    out["vb"] = vlb_terms(schedule, x0=x0, x_t=x_t, k=k, eps=eps.detach(), var_values=var_values, decoder=decoder)
    out["loss"] = out["mse"] + out["vb"]
    return out

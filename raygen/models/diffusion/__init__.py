"""Gaussian diffusion for the continuous families (eMIGM's per-token head, D2iT's DiT).

One package, pure PyTorch, device taken from the tensors, randomness only from the
`torch.Generator`s passed in:

- `schedule`   : linear / cosine betas over T = 1000 steps, IDDPM respacing ("250", "ddim50"),
                 and the continuous-time reading (log alpha interpolated) DPM-Solver uses.
- `losses`     : eps MSE and IDDPM's hybrid loss (MSE + VLB in bits) for learned-range
                 variance, returned per element for the family to mask and reduce.
- `guidance`   : the `Denoiser` the samplers call (condition, classifier-free guidance on
                 all eps channels, a guidance interval and constant/linear schedules, NFE
                 and pass counting).
- `samplers`   : ancestral DDPM (MAR's temperature) and DDIM (eta).
- `dpm_solver` : DPM-Solver++ (data prediction), orders 2 and 3, singlestep and multistep,
                 steps uniform in logSNR.

Typical use (eMIGM's head: cosine, DPM-Solver++ 3S at 8 steps, guidance in an interval):

    sched = Schedule.named("cosine")
    den = Denoiser(head, cond=z_c, uncond=z_u, guidance=Guidance(4.0, interval=(0.1, 0.3)),
                   learned_variance=True)
    out = dpm_solver_pp_sample(sched, den, torch.randn(shape, generator=g), steps=8, order=3)
    out.x, out.nfe, out.passes
"""

from raygen.models.diffusion.dpm_solver import dpm_solver_pp_sample, singlestep_orders, start_label
from raygen.models.diffusion.guidance import Denoiser, Guidance
from raygen.models.diffusion.losses import (
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
    vlb_terms,
)
from raygen.models.diffusion.samplers import SampleOut, ddim_sample, ddpm_sample
from raygen.models.diffusion.schedule import Schedule, cosine_betas, linear_betas, space_timesteps

__all__ = [
    "Denoiser", "Guidance", "SampleOut", "Schedule", "cosine_betas", "ddim_sample", "ddpm_sample",
    "diffusion_loss", "discretized_gaussian_log_likelihood", "dpm_solver_pp_sample", "gaussian_log_likelihood",
    "linear_betas", "normal_kl", "singlestep_orders", "space_timesteps", "start_label", "vlb_terms",
]

"""Known answers for raygen.models.diffusion.

Gaussian data x0 ~ N(mu, s^2) per channel has everything in closed form. With a = sqrt(abar),
sigma^2 = 1 - abar and x_t = a x0 + sigma eps:
  - x_t ~ N(a mu, v_t), v_t = a^2 s^2 + sigma^2;
  - the exact eps predictor is E[eps | x_t] = Cov(eps, x_t) / v_t (x_t - a mu) = sigma (x_t - a mu) / v_t;
  - Var(x0 | x_t) = s^2 sigma^2 / v_t, so the exact reverse step of a (respaced) DDPM is
    N(c1 E[x0 | x_t] + c2 x_t, bt + c1^2 Var(x0 | x_t)), which the learned-range output v encodes;
  - the probability-flow ODE keeps (x_t - a_t mu) / sqrt(v_t) constant, so it maps x_T at label T
    to x_t = a_t mu + sqrt(v_t / v_T) (x_T - a_T mu), for any x_T (deterministic comparison).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raygen.models.diffusion import (
    Denoiser,
    Guidance,
    Schedule,
    ddim_sample,
    ddpm_sample,
    diffusion_loss,
    dpm_solver_pp_sample,
    singlestep_orders,
    space_timesteps,
    start_label,
)
from raygen.models.diffusion.dpm_solver import _multistep

MU = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 0.2, 1.5], dtype=torch.float64)
SCHEDULES = ("cosine", "linear")


def gaussian_net(base: Schedule, spaced: Schedule | None = None):
    """The exact eps predictor for N(MU, S^2) data; with `spaced`, also the exact learned-range v."""

    def net(x, t):  # the samplers call with one label for the whole batch
        abar = base.alpha_bar(t[:1].double())[:, None]  # (1, 1), exact at integer and fractional labels
        sig2 = 1 - abar
        v_t = abar * S**2 + sig2
        eps = (x - abar.sqrt() * MU) * sig2.sqrt() / v_t  # (B, C)
        if spaced is None:
            return eps
        k = torch.searchsorted(spaced.labels, t[:1])  # step index of the respaced schedule
        log_b, log_bt = spaced.betas[k].log()[:, None], spaced.posterior_log_variance_clipped[k][:, None]
        var = spaced.posterior_variance[k][:, None] + spaced.posterior_mean_coef1[k][:, None] ** 2 * S**2 * sig2 / v_t
        frac = (var.log() - log_bt) / (log_b - log_bt)
        return torch.cat([eps, (2 * frac - 1).expand_as(eps)], dim=1)  # (B, 2C)

    return net


def ode_map(base: Schedule, x_T, label_T, label_0=None):
    """The exact PF-ODE flow from label_T to label_0 (None: to the data, abar = 1)."""

    def marginal(label):
        if label is None:
            return 1.0, S**2
        abar = base.alpha_bar(torch.tensor(float(label), dtype=torch.float64))
        return abar.sqrt(), abar * S**2 + 1 - abar

    (a_T, v_T), (a_0, v_0) = marginal(label_T), marginal(label_0)
    return a_0 * MU + (v_0 / v_T).sqrt() * (x_T - a_T * MU)


def x_T(n=20000, seed=0):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def stats_error(x):
    """(max |mean - mu| / s, max |var / s^2 - 1|) over channels."""
    return float(((x.mean(0) - MU) / S).abs().max()), float((x.var(0) / S**2 - 1).abs().max())


# -- schedules ----------------------------------------------------------------------------------

def test_named_schedules_match_their_formulas():
    lin = Schedule.named("linear").betas.numpy()
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02) and len(lin) == 1000
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    cos = Schedule.named("cosine")
    u = np.arange(1001) / 1000
    expect = np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999)
    np.testing.assert_allclose(cos.betas.numpy(), expect, rtol=1e-12)
    # uncapped steps telescope: abar_n = f((n+1)/N) / f(0)
    np.testing.assert_allclose(cos.alphas_cumprod.numpy()[:990], (f(u[1:]) / f(0))[:990], rtol=1e-10)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        Schedule.named("quad")


def test_space_timesteps_semantics():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    # three sections of 100: 10, 15 and 20 evenly spaced steps each, endpoints included
    three = space_timesteps(300, "10,15,20")
    assert len(three) == 45 and three[:2] == [0, 11] and 99 in three and 100 in three and three[-1] == 299
    assert space_timesteps(10, "") == list(range(10))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("spec", ["250", "ddim50", "50", "10,20,5"])
def test_respacing_keeps_alphas_cumprod_at_kept_steps(name, spec):
    base = Schedule.named(name)
    spaced = base.respace(spec)
    kept = space_timesteps(1000, spec)
    assert spaced.labels.tolist() == kept
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10, atol=1e-15)
    twice = spaced.respace("5")  # respacing composes: still the original abar and labels
    torch.testing.assert_close(twice.alphas_cumprod, base.alphas_cumprod[twice.labels], rtol=1e-10, atol=1e-15)
    # continuous time: abar at kept labels is the table, lambda inverts
    torch.testing.assert_close(spaced.alpha_bar(spaced.labels.double()), spaced.alphas_cumprod, rtol=1e-12, atol=0)
    frac = torch.tensor([3.25, 100.5, 777.75], dtype=torch.float64)
    torch.testing.assert_close(base.label_at(base.half_log_snr(frac)), frac, rtol=0, atol=1e-8)


# -- losses ---------------------------------------------------------------------------------------

def numpy_hybrid_loss(betas, x0, k, noise, out):
    """IDDPM's hybrid loss per element, written independently in numpy float64 (bits)."""
    abar = np.cumprod(1 - betas)
    prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - prev) / (1 - abar)
    log_pv = np.log(np.append(post_var[1], post_var[1:]))
    c1, c2 = betas * np.sqrt(prev) / (1 - abar), (1 - prev) * np.sqrt(1 - betas) / (1 - abar)
    col = lambda a: a[k][:, None]  # noqa: E731
    x_t = np.sqrt(col(abar)) * x0 + np.sqrt(1 - col(abar)) * noise
    C = x0.shape[1]
    eps, v = out[:, :C], out[:, C:]
    x0_hat = (x_t - np.sqrt(1 - col(abar)) * eps) / np.sqrt(col(abar))
    mean, true_mean = col(c1) * x0_hat + col(c2) * x_t, col(c1) * x0 + col(c2) * x_t
    frac = (v + 1) / 2
    logvar = frac * np.log(col(betas)) + (1 - frac) * col(log_pv)
    kl = 0.5 * (-1 + logvar - col(log_pv) + np.exp(col(log_pv) - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar))
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    inv = np.exp(-0.5 * logvar)
    hi, lo = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(np.maximum(hi, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))))
    vb = np.where(k[:, None] == 0, -logp, kl) / np.log(2)
    mse = (eps - noise) ** 2
    return mse, vb


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("init", [True, False])
def test_hybrid_loss_matches_numpy(name, init):
    sched = Schedule.named(name)
    g = torch.Generator().manual_seed(1)
    B, C = 12, 3
    x0 = torch.randn(B, C, generator=g, dtype=torch.float64) * 0.7
    x0[0, 0], x0[1, 1] = -1.5, 1.2  # the open edge bins of the discretized decoder
    k = torch.randint(0, 1000, (B,), generator=g)
    k[:3] = 0  # decoder NLL rows
    noise = torch.randn(B, C, generator=g, dtype=torch.float64)
    # at initialisation MAR's head (zeroed final layer) outputs eps = 0 and v = 0 (frac 1/2)
    out = torch.randn(B, 2 * C, generator=g, dtype=torch.float64) * 0.5
    if init:
        out = torch.zeros_like(out)
    out.requires_grad_(True)
    got = diffusion_loss(sched, out, x0=x0, x_t=sched.q_sample(x0, k, noise), k=k, noise=noise)
    mse, vb = numpy_hybrid_loss(sched.betas.numpy(), x0.numpy(), k.numpy(), noise.numpy(), out.detach().numpy())
    np.testing.assert_allclose(got["mse"].detach().numpy(), mse, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["vb"].detach().numpy(), vb, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got["loss"].detach().numpy(), mse + vb, rtol=1e-8, atol=1e-10)
    assert got["loss"].shape == (B, C)  # per element; mean over dim 1 = IDDPM's per-sample loss
    # the VLB trains only the variance half (stopped gradient on the mean), the MSE only eps
    (grad_vb,) = torch.autograd.grad(got["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(got["mse"].sum(), out)
    assert grad_vb[:, :C].abs().max() == 0 and grad_vb[:, C:].abs().max() > 0
    assert grad_mse[:, C:].abs().max() == 0


def test_eps_only_loss_and_gaussian_decoder():
    sched = Schedule.named("cosine")
    x0, noise = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    k = torch.tensor([0, 1, 500, 999])
    out = diffusion_loss(sched, torch.zeros_like(x0), x0=x0, x_t=sched.q_sample(x0, k, noise), k=k, noise=noise)
    assert set(out) == {"mse", "loss"} and torch.equal(out["loss"], noise**2)
    # the continuous decoder at k = 0: -log N(x0; mean, var) / log 2 with mean = x0_hat = x0 when eps_hat = noise
    zero = torch.zeros(4, dtype=torch.long)
    x_t = sched.q_sample(x0, zero, noise)
    got = diffusion_loss(sched, torch.cat([noise, torch.zeros_like(x0)], 1), x0=x0, x_t=x_t, k=zero, noise=noise,
                         decoder="gaussian")
    logvar = 0.5 * math.log(sched.betas[0]) + 0.5 * float(sched.posterior_log_variance_clipped[0])
    expect = 0.5 * (math.log(2 * math.pi) + logvar) / math.log(2)
    torch.testing.assert_close(got["vb"], torch.full_like(x0, expect), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="channels"):
        diffusion_loss(sched, torch.zeros(4, 3, 3, 3), x0=x0, x_t=x0, k=k, noise=noise)


# -- samplers on Gaussian data ---------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULES)
def test_ddpm_250_with_the_exact_learned_variance_samples_the_data(name):
    base = Schedule.named(name)
    spaced = base.respace("250")
    den = Denoiser(gaussian_net(base, spaced), learned_variance=True)
    out = ddpm_sample(spaced, den, x_T(), generator=torch.Generator().manual_seed(1))
    assert (out.nfe, out.passes) == (250, 250)
    mean_err, var_err = stats_error(out.x)
    # exact reverse kernels: only Monte Carlo error (20k samples: 1 s.e. = 0.007 s, 1% variance)
    assert mean_err < 0.03 and var_err < 0.04, (mean_err, var_err)
    # fixed variances are not optimal for s != 1 but stay within ~12%
    fixed = ddpm_sample(spaced, Denoiser(gaussian_net(base)), x_T(), fixed_variance="large",
                        generator=torch.Generator().manual_seed(1))
    assert stats_error(fixed.x)[0] < 0.03 and stats_error(fixed.x)[1] < 0.07


def test_ddpm_randomness_and_temperature():
    base = Schedule.named("cosine")
    spaced = base.respace("20")
    den = Denoiser(gaussian_net(base))
    run = lambda seed, temp: ddpm_sample(spaced, den, x_T(64), temperature=temp,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed)).x
    assert torch.equal(run(3, 1.0), run(3, 1.0)) and not torch.equal(run(3, 1.0), run(4, 1.0))
    assert torch.equal(run(3, 0.0), run(4, 0.0))  # MAR's temperature scales only the noise
    cold, hot = run(3, 0.5), run(3, 1.0)
    assert cold.var(0).mean() < hot.var(0).mean()


@pytest.mark.parametrize("name", SCHEDULES)
def test_ddim_50_follows_the_ode(name):
    base = Schedule.named(name)
    spaced = base.respace("50")
    xs = x_T()
    out = ddim_sample(spaced, Denoiser(gaussian_net(base)), xs)
    assert out.nfe == 50
    exact = ode_map(base, xs, 999)
    assert float((out.x - exact).abs().max()) < 0.25  # first order: ~0.2 at 50 steps
    mean_err, var_err = stats_error(out.x)
    assert mean_err < 0.03 and var_err < 0.25, (mean_err, var_err)  # the s = 0.2 channel loses ~11-22%
    finer = ddim_sample(base.respace("100"), Denoiser(gaussian_net(base)), xs)
    ratio = float((out.x - exact).abs().max() / (finer.x - exact).abs().max())
    assert 1.8 < ratio < 2.2  # DDIM is first order


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps, ode_tol, var_tol", [(8, 0.3, 0.45), (14, 0.04, 0.04)])
def test_dpm_solver_pp_3s_at_emigm_steps(name, steps, ode_tol, var_tol):
    base = Schedule.named(name)
    xs = x_T()
    den = Denoiser(gaussian_net(base))
    out = dpm_solver_pp_sample(base, den, xs, steps=steps, order=3, method="singlestep")
    assert out.nfe == steps == den.nfe and sum(singlestep_orders(steps, 3)) == steps
    exact = ode_map(base, xs, start_label(base), 0)
    assert float((out.x - exact).abs().max()) < ode_tol
    mean_err, var_err = stats_error(out.x)
    # 8 steps (3 intervals of ~3.4 in lambda) shrink the s = 0.2 channel's variance by ~40%; 14 do not
    assert mean_err < 0.03 and var_err < var_tol, (mean_err, var_err)


@pytest.mark.parametrize("method, order, steps, lo, hi", [
    ("singlestep", 2, [30, 60, 120, 240], 1.85, 2.2),
    ("multistep", 2, [30, 60, 120, 240], 1.85, 2.2),
    ("singlestep", 3, [29, 59, 119, 239], 2.6, 3.6),  # steps = 2 mod 3: no first-order final step
    ("multistep", 3, [30, 60, 120, 240], 2.8, 5.5),  # measured ~4 on this problem
])
def test_dpm_solver_pp_convergence_order(method, order, steps, lo, hi):
    base = Schedule.named("cosine")
    xs = x_T(512)
    exact = ode_map(base, xs, start_label(base), 0)
    errs = [float((dpm_solver_pp_sample(base, Denoiser(gaussian_net(base)), xs, steps=n, order=order,
                                        method=method).x - exact).abs().max()) for n in steps]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    slope = math.log(errs[-2] / errs[-1]) / math.log(steps[-1] / steps[-2])
    assert lo < slope < hi, (errs, slope)


def test_multistep_3_is_exact_for_a_quadratic_data_prediction():
    """With D(lambda) = lambda^2 (x-independent) a third-order multistep step has no error."""

    def point(lam):
        alpha = 1 / math.sqrt(1 + math.exp(-2 * lam))
        return (0.0, alpha, math.sqrt(1 - alpha**2), lam)

    lams = [-1.0, -0.6, -0.3, 0.2]
    hist = [(point(lam), torch.tensor([lam**2], dtype=torch.float64)) for lam in lams[:3]]
    got = _multistep(torch.zeros(1, dtype=torch.float64), hist, point(lams[3]), 3)
    antider = lambda lam: math.exp(lam) * (lam * lam - 2 * lam + 2)  # noqa: E731  integral of e^l l^2
    expect = point(lams[3])[2] * (antider(lams[3]) - antider(lams[2]))  # sigma_t * integral
    assert float(got) == pytest.approx(expect, rel=1e-12)


# -- guidance --------------------------------------------------------------------------------------

class Recorder:
    """A conditional net eps = x * 0 + c (so cond/uncond halves differ), recording its calls."""

    def __init__(self, channels=4, learned=False):
        self.calls, self.channels, self.learned = [], channels, learned

    def __call__(self, x, t, c):
        self.calls.append((x.shape[0], float(t[0])))
        eps = x * 0 + c  # (B, C)
        return torch.cat([eps, -c], dim=1) if self.learned else eps


def test_guidance_mix_and_w1_equals_conditional():
    B, C = 6, 4
    cond, uncond = torch.full((B, C), 2.0), torch.full((B, C), -1.0)
    x = torch.randn(B, C)
    plain = Denoiser(Recorder(), cond=cond)
    eps_c, _ = plain(x, 500)
    for guidance, calls in ((Guidance(1.0), [B]), (Guidance(3.0, "linear"), [2 * B])):
        net = Recorder()
        den = Denoiser(net, cond=cond, uncond=uncond, guidance=guidance)
        eps, v = den(x, 999)  # u = 1: w = 1 off (one pass) or the linear ramp's w_1 = 1 (guided pass)
        torch.testing.assert_close(eps, eps_c)
        assert v is None and [n for n, _ in net.calls] == calls
    # constant w on all channels: eps_u + w (eps_c - eps_u); learned variance keeps the conditional v
    den = Denoiser(Recorder(learned=True), cond=cond, uncond=uncond, guidance=Guidance(4.0), learned_variance=True)
    eps, v = den(x, 10)
    torch.testing.assert_close(eps, torch.full((B, C), -1.0 + 4.0 * 3.0))
    torch.testing.assert_close(v, -cond)
    assert (den.nfe, den.passes) == (1, 2)


def test_linear_guidance_schedule_values_and_validation():
    g = Guidance(4.0, "linear")
    assert [g.weight(u) for u in (1.0, 0.5, 0.25, 0.0)] == [1.0, 2.5, 3.25, 4.0]
    assert Guidance(4.0).weight(0.3) == 4.0
    inside = Guidance(2.0, interval=(0.1, 0.3))
    assert [inside.active(u) for u in (0.1, 0.1001, 0.3, 0.31)] == [False, True, True, False]
    assert not Guidance(1.0).active(0.5)
    with pytest.raises(ValueError, match="schedule"):
        Guidance(2.0, "cosine")
    with pytest.raises(ValueError, match="interval"):
        Guidance(2.0, interval=(0.5, 0.2))
    with pytest.raises(ValueError, match="uncond"):
        Denoiser(Recorder(), cond=torch.zeros(1, 4), guidance=Guidance(2.0))


@pytest.mark.parametrize("sampler", ["dpm8", "dpm14", "ddpm250", "ddim50"])
def test_guidance_interval_runs_one_pass_outside(sampler):
    base = Schedule.named("cosine")
    B, C = 5, 4
    net = Recorder()
    den = Denoiser(net, cond=torch.ones(B, C), uncond=torch.zeros(B, C),
                   guidance=Guidance(4.0, interval=(0.1, 0.3)))
    xs = torch.randn(B, C)
    if sampler.startswith("dpm"):
        out = dpm_solver_pp_sample(base, den, xs, steps=int(sampler[3:]), order=3)
    elif sampler == "ddpm250":
        out = ddpm_sample(base.respace("250"), den, xs, generator=torch.Generator().manual_seed(0))
    else:
        out = ddim_sample(base.respace("50"), den, xs)
    guided = [(label + 1) / 1000 for n, label in net.calls if n == 2 * B]
    single = [(label + 1) / 1000 for n, label in net.calls if n == B]
    assert len(net.calls) == out.nfe and len(guided) + len(single) == out.nfe
    assert all(0.1 < u <= 0.3 for u in guided) and not any(0.1 < u <= 0.3 for u in single)
    assert out.passes == out.nfe + len(guided) and 0 < len(guided) < out.nfe

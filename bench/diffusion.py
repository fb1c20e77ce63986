"""Per-step cost and NFE of each diffusion sampler at eMIGM's head shape and at DiT-B's shape.

    python bench/diffusion.py                         # CPU: nets timed at --net-batch, see below
    python bench/diffusion.py --device cuda --net-batch 64

Prints one JSON object. For each shape and sampler it reports:
  - nfe, passes: network calls and B-sized forward passes (a guided call on [cond; uncond]
    counts 2), counted by raygen's `Denoiser` on a real run of the sampler;
  - overhead_ms_per_step: the sampler's own arithmetic per network call at the full batch,
    measured with a zero-cost net (it returns zeros of the right shape), best of 2 runs;
  - est_ms_per_step = net_ms * passes / nfe + overhead_ms_per_step, and est_ms_total.
net_ms is one B-sized forward of the stand-in net (best of 3), timed at --net-batch samples and scaled
linearly to --batch when the two differ (`net_ms_scaled_from` says so).

The nets are STAND-INS with the papers' sizes, not raygen models:
  - emigm-head: MAR's SimpleMLPAdaLN layout (input Linear, sinusoidal-t MLP, Linear(z), `depth`
    adaLN residual MLP blocks, adaLN final layer -> 2C for eps and v) over batch x 256 token rows
    of C = 16 channels; eMIGM-L at 256px is depth 8, width 1280, z 1024 (docs/models.md sec. 4;
    eMIGM-XS/S use 3 x 1024). All 256 tokens are sampled in one head call here; eMIGM spreads
    them over its mask steps.
  - dit-b: DiT-B/2's shape on 4 x 32 x 32 latents: patchify 2 -> 256 tokens, 12 pre-LN
    transformer blocks of width 768 with 12 heads, the timestep/condition embedding added to
    the tokens, output 8 channels. It has 87M parameters against DiT-B/2's 130M: the missing
    ones are DiT's adaLN modulation Linears, which act on one vector per image, so the
    per-token FLOPs are nearly DiT-B's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raygen.models.diffusion import (  # noqa: E402
    Denoiser, Guidance, Schedule, ddim_sample, ddpm_sample, dpm_solver_pp_sample,
)


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal features of (fractional) step labels (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class HeadStandIn(nn.Module):
    """MAR-style adaLN MLP head (stand-in): x (N, C), t (N,), z (N, Z) -> (N, 2C)."""

    def __init__(self, channels: int, width: int, depth: int, z_dim: int):
        super().__init__()
        self.inp, self.cond = nn.Linear(channels, width), nn.Linear(z_dim, width)
        self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(width, eps=1e-6), "mod": nn.Linear(width, 3 * width),
                           "mlp": nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))})
            for _ in range(depth))
        self.final_ln = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_mod, self.out = nn.Linear(width, 2 * width), nn.Linear(width, 2 * channels)

    def forward(self, x, t, z):
        h = self.inp(x)  # (N, W)
        y = nn.functional.silu(self.time(timestep_features(t)) + self.cond(z))  # (N, W)
        for blk in self.blocks:
            shift, scale, gate = blk["mod"](y).chunk(3, dim=-1)  # (N, W) each
            h = h + gate * blk["mlp"](blk["ln"](h) * (1 + scale) + shift)
        shift, scale = self.final_mod(y).chunk(2, dim=-1)
        return self.out(self.final_ln(h) * (1 + scale) + shift)  # (N, 2C)


class DiTStandIn(nn.Module):
    """DiT-B/2-sized transformer (stand-in): x (B, 4, 32, 32), t (B,), y (B,) -> (B, 8, 32, 32)."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12, patch: int = 2, channels: int = 4):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(channels * patch * patch, width)
        self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(1001, width)  # 1000 classes + the null class
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, activation="gelu", batch_first=True,
                                           norm_first=True, dropout=0.0)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, 2 * channels * patch * patch)

    def forward(self, x, t, y):
        p, side = self.patch, x.shape[-1] // self.patch
        tokens = self.embed(rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p))  # (B, L, D)
        tokens = tokens + (self.time(timestep_features(t)) + self.label(y))[:, None]
        out = self.out(self.blocks(tokens))  # (B, L, 2C p q)
        return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=side, p=p, q=p)


SAMPLERS = {  # name -> (sampler, guidance interval or None); guided runs use w = 4
    "ddpm250": ("ddpm", "250", None), "ddpm100": ("ddpm", "100", None), "ddim50": ("ddim", "50", None),
    "dpm++3s-8": ("3s", 8, None), "dpm++3s-14": ("3s", 14, None), "dpm++2m-14": ("2m", 14, None),
    "dpm++3m-14": ("3m", 14, None), "dpm++3s-8-cfg": ("3s", 8, (0.0, 1.0)),
    "dpm++3s-8-cfg(0.1,0.3)": ("3s", 8, (0.1, 0.3)), "ddpm250-cfg(0.1,0.3)": ("ddpm", "250", (0.1, 0.3)),
}


def run_sampler(name, schedule, den, x):
    kind, steps, _ = SAMPLERS[name]
    if kind == "ddpm":
        return ddpm_sample(schedule.respace(steps), den, x, generator=torch.Generator(x.device).manual_seed(0))
    if kind == "ddim":
        return ddim_sample(schedule.respace(steps), den, x)
    order, method = int(kind[0]), {"s": "singlestep", "m": "multistep"}[kind[1]]
    return dpm_solver_pp_sample(schedule, den, x, steps=steps, order=order, method=method)


def timed(fn, device, repeat=3, warmup=True):
    """Best-of-`repeat` wall time of fn() in ms (the minimum is the least disturbed by other load)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def bench_shape(shape_name, net, x_shape, make_cond, args, device):
    """Net time at --net-batch, then every sampler with a zero-cost net at the full batch."""
    schedule = Schedule.named(args.schedule)
    rows = lambda b: b if shape_name == "dit-b" else 256 * b  # noqa: E731  eMIGM: one row per token
    net = net.to(device).eval()
    xb = torch.randn(rows(args.net_batch), *x_shape[1:], device=device)
    cond_b, _ = make_cond(rows(args.net_batch))
    with torch.no_grad():
        net_ms = timed(lambda: net(xb, torch.full((len(xb),), 500.0, device=device), cond_b), device)
    net_ms_full = net_ms * args.batch / args.net_batch
    x = torch.randn(rows(args.batch), *x_shape[1:], device=device)
    cond, uncond = make_cond(rows(args.batch))
    out_ch = 2 * x_shape[1]
    free = lambda xx, t, c: xx.new_zeros(xx.shape[0], out_ch, *xx.shape[2:])  # noqa: E731  zero-cost net
    rows_out = {}
    for name, (_, _, interval) in SAMPLERS.items():
        guidance = Guidance(4.0, interval=interval) if interval else Guidance()

        def one():
            den = Denoiser(free, cond=cond, uncond=uncond, guidance=guidance, learned_variance=True)
            return run_sampler(name, schedule, den, x)

        result = one()  # also the warm-up
        overhead = timed(one, device, repeat=2, warmup=False) / result.nfe
        est = net_ms_full * result.passes / result.nfe + overhead
        rows_out[name] = {"nfe": result.nfe, "passes": result.passes, "overhead_ms_per_step": round(overhead, 3),
                          "est_ms_per_step": round(est, 2), "est_ms_total": round(est * result.nfe, 1)}
    params = sum(p.numel() for p in net.parameters())
    return {"x_shape": [rows(args.batch), *x_shape[1:]], "stand_in_params": params, "net_ms": round(net_ms_full, 2),
            "net_ms_scaled_from": None if args.net_batch == args.batch else
            {"net_batch": args.net_batch, "measured_ms": round(net_ms, 2)},
            "samplers": rows_out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=64, help="images per sampler call (eMIGM: x 256 token rows)")
    ap.add_argument("--net-batch", type=int, default=None, help="images per timed net call (default: 1 on CPU)")
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "linear"])
    ap.add_argument("--head", default="8x1280", help="eMIGM head depth x width (L: 8x1280, XS/S: 3x1024)")
    ap.add_argument("--z-dim", type=int, default=1024, help="eMIGM backbone width (L: 1024)")
    ap.add_argument("--shapes", default="emigm-head,dit-b")
    args = ap.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    args.net_batch = args.net_batch or (args.batch if device.type == "cuda" else 1)
    torch.manual_seed(0)
    depth, width = (int(v) for v in args.head.split("x"))
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch": args.batch, "schedule": args.schedule, "guidance_scale_when_guided": 4.0}
    for shape in args.shapes.split(","):
        if shape == "emigm-head":
            net = HeadStandIn(16, width, depth, args.z_dim)
            z = lambda n: (torch.randn(n, args.z_dim, device=device),  # noqa: E731  (cond, null cond)
                           torch.zeros(n, args.z_dim, device=device))
            report[f"emigm-head-{args.head}"] = bench_shape(shape, net, (None, 16), z, args, device)
        elif shape == "dit-b":
            labels = lambda n: (torch.randint(0, 1000, (n,), device=device),  # noqa: E731
                                torch.full((n,), 1000, device=device))
            report["dit-b"] = bench_shape(shape, DiTStandIn(), (None, 4, 32, 32), labels, args, device)
        else:
            raise SystemExit(f"unknown shape {shape!r}; expected emigm-head or dit-b")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

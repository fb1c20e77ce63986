r"""Decode-loop time with and without the static-shape step / CUDA graphs (the `graphs` sampling option).

    python bench/decode_graphs.py                                   # ar, nar, arpg at width 512, 12 layers, batch 16
    python bench/decode_graphs.py --width 256 --layers 4 --batch 8 --rounds 2    # a CPU-sized shape
    python bench/decode_graphs.py --families ar,arpg --batch 64 --precision bf16  # the issue's H100 setting

For each family, one model (random weights, the shape rules and knobs of bench/sampling.py: arpg
at --arpg-steps, CFG at --cfg so the batch doubles inside) samples a batch with graphs="off" (the
dynamic path) and graphs="on" (on CUDA: captured graphs; on a CPU: the static path, eagerly),
alternating the two over --rounds after one warm-up each (the warm-up of "on" captures the graphs).
It reports the median seconds per batch of each mode, their ratio, whether the two drew the same
ids from the same seed (and the fraction that agree: the two paths' logits differ by float32
rounding, which can move a draw near a CDF boundary, most often with near-uniform logits over a
large vocabulary as random weights give; one changed token then changes the rest of an AR
sample), and the graphs captured. On CUDA (unless --no-profile) one more run of
each mode under torch.profiler counts kernel launches (cudaLaunchKernel and friends) and graph
launches, and the GPU-busy fraction (kernel time / wall time). Prints one JSON document only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raygen.models import graphs  # noqa: E402


def _bench_sampling():
    """bench/sampling.py as a module (by path: the bench folder also holds a `codecs.py`, so it stays off sys.path)."""
    spec = importlib.util.spec_from_file_location("bench_sampling", Path(__file__).resolve().parent / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sampling = _bench_sampling()
arch_for, build, knobs_for = _sampling.arch_for, _sampling.build, _sampling.knobs_for  # shapes, models, knobs

MODES = ("off", "on")
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def model_for(family: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """bench/sampling.py's model for `family` with no all-zero weight matrix, on device, eval."""
    torch.manual_seed(0)
    args.one = family  # build() reads the family from args.one
    model = build(args, arch_for(family, args))
    with torch.no_grad():  # a zero-initialised head would make every logit equal
        for p in model.parameters():
            if p.ndim >= 2 and float(p.abs().sum()) == 0.0:
                p.normal_(0, 0.02)
    model = model.to(device).eval()
    return model.to(torch.bfloat16) if args.precision == "bf16" else model


def run_family(family: str, args: argparse.Namespace, device: torch.device) -> dict:
    model = model_for(family, args, device)
    labels = torch.arange(args.batch, device=device) % 1000
    knobs = knobs_for(family, args)

    def once(mode: str) -> tuple[float, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = model.generate(labels, cfg_scale=args.cfg, temperature=1.0, generator=g, graphs=mode, **knobs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, ids

    warm = {mode: once(mode) for mode in MODES}  # "on" captures here
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            times[mode].append(once(mode)[0])
    sec = {mode: statistics.median(t) for mode, t in times.items()}
    stage1 = getattr(model, "stage1", model)  # ctf: the pair's stage 1 decodes
    kept = graphs._KEPT.get(stage1)
    out = {
        "arch": arch_for(family, args),
        "knobs": knobs,
        "seconds_per_batch": sec,
        "seconds_all_rounds": times,
        "warmup_seconds": {mode: w[0] for mode, w in warm.items()},
        "on_over_off": sec["on"] / sec["off"],
        "same_ids": bool(torch.equal(warm["off"][1], warm["on"][1])),
        "same_ids_fraction": float((warm["off"][1] == warm["on"][1]).float().mean()),
        "forward_passes": getattr(stage1, "last_forward_passes", args.grid * args.grid),
        "graphs_captured": len(kept[2][1]) if kept is not None and kept[2][1].capture else 0,
    }
    if device.type == "cuda" and not args.no_profile:
        out["profile"] = {mode: profile(lambda mode=mode: once(mode)) for mode in MODES}
    graphs.release(stage1)
    return out


def profile(fn) -> dict:
    """Kernel and graph launches of one call of fn, and the GPU-busy fraction of its wall time."""
    from torch.profiler import ProfilerActivity

    try:
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
        graph_launches = sum(e.count for e in events if e.key.startswith("cudaGraphLaunch"))
        kernel_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                        for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        return {"kernel_launches": launches, "graph_launches": graph_launches, "wall_s": wall,
                "gpu_busy_fraction": kernel_us / 1e6 / wall}
    except Exception as e:  # the timing above stands without the profile
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="ar,nar,arpg", help="of ar, nar, arpg, ctf (ctf: the pair; stage 1 decodes)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--arpg-steps", type=int, default=64)
    p.add_argument("--ctf-clusters", type=int, default=512)
    p.add_argument("--ctf-aux-width", type=int, default=0)
    p.add_argument("--ctf-aux-layers", type=int, default=0)
    p.add_argument("--ctf-aux-heads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each mode, alternating off/on")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-profile", action="store_true", help="CUDA: skip the torch.profiler runs")
    args = p.parse_args()
    fams = args.families.split(",")
    unknown = [f for f in fams if f not in ("ar", "nar", "arpg", "ctf")]
    if unknown:
        raise SystemExit(f"bench/decode_graphs.py: no static decode path for {unknown} (ar, nar, arpg, ctf)")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out = {"device": str(device), "batch": args.batch, "width": args.width, "layers": args.layers,
           "heads": args.heads, "grid": args.grid, "vocab": args.vocab, "cfg": args.cfg,
           "precision": args.precision, "rounds": args.rounds,
           "threads": args.threads if device.type == "cpu" else None, "families": {}}
    for fam in fams:
        out["families"][fam] = run_family(fam, args, device)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

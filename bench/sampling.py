"""Sampling speed per family at the same width, total depth and batch on a 16x16 grid.

    python bench/sampling.py --families ar,arpg,nar --batch 64            # width 512, 12 layers
    python bench/sampling.py --families ar,arpg --width 1024 --layers 24  # ARPG-L vs LlamaGen-L shape

Each family runs in its own process (so peak memory is its own) with random weights, CFG on
(the batch doubles inside), and reports images/s, the model forward passes per image batch
and peak memory (GPU: max allocated; CPU: the process's peak RSS). Prints one JSON object.

Same shape per family: `ar` has `--layers` blocks; `arpg` splits them evenly between its
two passes; `nar` has `--layers` backbone blocks plus its one vertical-head block (as in the
paper's NAR-L vs LlamaGen-L comparison). `ctf` is the whole two-stage generator: a stage-1
AR of the same shape over `--ctf-clusters` coarse labels, then one pass of a stage-2 model
(`--ctf-aux-width`/`--ctf-aux-layers`, default: the same shape; the paper's Table 2 pairs
every stage 1 with a 343M aux, i.e. width 1024 and 24 layers), both included in the timing.

    python bench/sampling.py --families ar,ctf --width 768 --layers 12 --heads 12 \
        --ctf-aux-width 1024 --ctf-aux-layers 24 --ctf-aux-heads 16   # Table 2's B row
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def arch_for(family: str, width: int, layers: int, heads: int) -> dict:
    if family == "ar":
        return {"dim": width, "n_layer": layers, "n_head": heads}
    if family == "arpg":
        return {"dim": width, "n_layer": layers, "n_head": heads}
    if family in ("nar", "ctf"):
        return {"dim": width, "n_layer": layers, "n_head": heads}
    raise SystemExit(f"bench/sampling.py: no shape rule for family '{family}'")


def knobs_for(family: str, args) -> dict:
    if family == "arpg":
        return {"steps": args.arpg_steps}
    return {}


def build(args, arch: dict):
    """The family's model (random weights) with the bench's vocabulary, classes and grid."""
    from raygen.models.registry import build_model

    common = {"vocab_size": args.vocab, "num_classes": 1000, "grid_size": args.grid}
    if args.one != "ctf":
        return build_model(args.one, "debug", **common, **arch)
    from raygen.models.ctf import CTFPair, Lookup

    k = args.ctf_clusters
    lookup = Lookup(torch.arange(args.vocab) % k, torch.arange(k))  # balanced clusters; timing only
    ctf = {**common, "clusters": k, "lookup_fingerprint": lookup.fingerprint()}
    aux = {"dim": args.ctf_aux_width or args.width, "n_layer": args.ctf_aux_layers or args.layers,
           "n_head": args.ctf_aux_heads or args.heads}
    stages = [build_model("ctf", "debug", **ctf, **arch), build_model("ctf", "aux-debug", **ctf, **aux)]
    for stage in stages:
        stage.bind_lookup(lookup)
    return CTFPair(*stages)


def run_one(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    arch = arch_for(args.one, args.width, args.layers, args.heads)
    model = build(args, arch)
    with torch.no_grad():  # a zero-initialised head would make every logit equal
        for name, p in model.named_parameters():
            if p.ndim >= 2 and float(p.abs().sum()) == 0.0:
                p.normal_(0, 0.02)
    model = model.to(device).eval()
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    labels = torch.arange(args.batch, device=device) % 1000
    g = torch.Generator(device=device).manual_seed(0)
    knobs = knobs_for(args.one, args)

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(labels, cfg_scale=args.cfg, temperature=1.0, generator=g, **knobs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = sorted(once() for _ in range(args.repeats))
    seconds = times[len(times) // 2]
    out = {
        "params": model.num_params(),
        "arch": arch,
        "knobs": knobs,
        "seconds_per_batch": seconds,
        "images_per_s": args.batch / seconds,
        "forward_passes": getattr(model, "last_forward_passes",
                                  args.grid * args.grid + (1 if args.one == "ctf" else 0)),
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        import resource

        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="ar,arpg,nar")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--arpg-steps", type=int, default=64)
    p.add_argument("--ctf-clusters", type=int, default=512, help="ctf: K coarse labels (the paper's default)")
    p.add_argument("--ctf-aux-width", type=int, default=0, help="ctf stage 2 width (0 = --width)")
    p.add_argument("--ctf-aux-layers", type=int, default=0, help="ctf stage 2 blocks (0 = --layers)")
    p.add_argument("--ctf-aux-heads", type=int, default=0, help="ctf stage 2 heads (0 = --heads)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    out = {"batch": args.batch, "width": args.width, "layers": args.layers, "grid": args.grid, "vocab": args.vocab,
           "cfg": args.cfg, "precision": args.precision,
           "device": args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
           "families": {}}
    for fam in args.families.split(","):
        cmd = [sys.executable, __file__, "--one", fam] + [a for a in sys.argv[1:] if a != "--one"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{fam} failed:\n{res.stderr[-3000:]}")
        out["families"][fam] = json.loads(res.stdout.strip().splitlines()[-1])
    if "ar" in out["families"]:
        base = out["families"]["ar"]["images_per_s"]
        out["speedup_over_ar"] = {f: r["images_per_s"] / base for f, r in out["families"].items() if f != "ar"}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

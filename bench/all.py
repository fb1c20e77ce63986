r"""Every speed figure in one run, as one JSON document: sampling per family, the training step per
mode (plain torch, DeepSpeed in one process, Ray Train + DeepSpeed) and their ratios, and with
official checkouts, raygen against the papers' own samplers and training steps.

    python bench/all.py                                   # CPU defaults: a few minutes per part
    python bench/all.py --official-llamagen /tmp/official_llamagen --official-arpg /tmp/official_arpg \
        --official-arpg-site /tmp/official_arpg/site --official-nar /tmp/official_nar
    python bench/all.py --parts train --train-shape width512   # the width-512 / 12-layer / 256-token shape

It runs bench/sampling.py, bench/train_step.py, bench/decode_graphs.py and bench/official.py as
subprocesses (each in a process of its own, one after the other, so no two parts share the
machine) and merges their JSON under "sampling", "train", "graphs" and "official"; "ratios"
collects the numbers a change is judged by, all measured in this one run:

- sampling: images/s per family and each family's speed-up over `ar` at the same shape;
- train: DeepSpeed / torch and Ray Train + DeepSpeed / torch step time (1.0 = no platform cost);
- graphs: decode time with the static step (captured as CUDA graphs on a GPU) over the dynamic
  one per family, and on a GPU the GPU-busy fraction of each;
- official: raygen's speed-up over the official sampler and training step per family.

Defaults follow the device: on a GPU the sampling batch is 64 and the train shape is width 512;
on a CPU the sampling batch is 8 (width 512, 12 layers; every family at that shape) and the
train shape is the digits demo's, so the whole run stays within minutes. Every option of the
parts can be passed through with --sampling-args / --train-args / --official-args.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WIDTH512 = ["--arch", '{"dim":512,"n_layer":12,"n_head":8}', "--vocab", "16384", "--grid", "16", "--batch", "16",
            "--steps", "6", "--warmup", "2"]


def run_part(script: str, argv: list[str]) -> dict:
    """Run bench/<script> with argv; its stdout's JSON object (progress goes to stderr)."""
    cmd = [sys.executable, str(HERE / script), *argv]
    print(f"[all] {' '.join(shlex.quote(a) for a in cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}",
                "command": cmd}
    lines = res.stdout.splitlines()  # a library may print a line before the JSON (a compiled op's notice)
    start = next((i for i, line in enumerate(lines) if line.startswith("{")), None)
    if start is None:
        return {"error": "no JSON on stdout", "command": cmd}
    out, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]))  # and not what a library printed after it
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def ratios(result: dict) -> dict:
    r: dict = {}
    s = result.get("sampling", {})
    if "families" in s:
        r["sampling_images_per_s"] = {f: v["images_per_s"] for f, v in s["families"].items()}
        if "speedup_over_ar" in s:
            r["sampling_speedup_over_ar"] = s["speedup_over_ar"]
    t = result.get("train", {})
    for key in ("deepspeed_over_torch_step_time", "ray_deepspeed_over_torch_step_time", "ddp_over_torch_step_time",
                "ray_deepspeed_over_ddp_step_time"):
        if key in t:
            r[f"train_{key}"] = t[key]
    g = result.get("graphs", {})
    for fam, v in g.get("families", {}).items():
        if "on_over_off" in v:
            r.setdefault("decode_graphs_on_over_off_time", {})[fam] = v["on_over_off"]
            if "profile" in v and "error" not in v["profile"].get("on", {}):
                r.setdefault("decode_gpu_busy_fraction", {})[fam] = {m: v["profile"][m].get("gpu_busy_fraction")
                                                                     for m in ("off", "on")}
    o = result.get("official", {})
    for fam, v in o.get("families", {}).items():
        for what in ("sample", "train"):
            if isinstance(v.get(what), dict) and "raygen_speedup" in v[what]:
                r.setdefault(f"official_{what}_raygen_speedup", {})[fam] = v[what]["raygen_speedup"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="sampling,train,graphs,official", help="which parts to run")
    p.add_argument("--families", default="ar,arpg,nar,ctf,emigm,d2it", help="sampling families")
    p.add_argument("--threads", type=int, default=0, help="torch threads for every part (0 = default)")
    p.add_argument("--train-shape", choices=["digits", "width512"], default=None,
                   help="the training step's shape (default: width512 on a GPU, digits on a CPU)")
    p.add_argument("--sampling-args", default="", help="extra arguments for bench/sampling.py")
    p.add_argument("--train-args", default="", help="extra arguments for bench/train_step.py")
    p.add_argument("--official-args", default="", help="extra arguments for bench/official.py")
    p.add_argument("--graphs-args", default="", help="extra arguments for bench/decode_graphs.py")
    p.add_argument("--official-llamagen", help="a LlamaGen checkout (official ar)")
    p.add_argument("--official-arpg", help="an ARPG checkout")
    p.add_argument("--official-arpg-site", help="where `transformers` is installed for ARPG")
    p.add_argument("--official-nar", help="a NAR checkout")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    parts = args.parts.split(",")
    threads = ["--threads", str(args.threads)] if args.threads else []
    out: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                 "threads": args.threads or torch.get_num_threads()}
    if "sampling" in parts:
        batch = ["--batch", "64" if gpu else "8", "--repeats", "3" if gpu else "2"]
        out["sampling"] = run_part("sampling.py", ["--families", args.families, *batch, *threads,
                                                   *shlex.split(args.sampling_args)])
    if "train" in parts:
        shape = WIDTH512 if (args.train_shape or ("width512" if gpu else "digits")) == "width512" else []
        modes = "torch,deepspeed,ray" if gpu else "torch,ddp,deepspeed,ray"  # ddp: the same processes, no Ray
        out["train"] = run_part("train_step.py", ["--modes", modes, *shape, *threads,
                                                  *shlex.split(args.train_args)])
    if "graphs" in parts:  # the static decode step: captured on a GPU, eager on a CPU
        shape = ["--batch", "64"] if gpu else ["--width", "256", "--layers", "4", "--batch", "8", "--rounds", "2"]
        out["graphs"] = run_part("decode_graphs.py", [*shape, *threads, *shlex.split(args.graphs_args)])
    official = {"--llamagen": args.official_llamagen, "--arpg": args.official_arpg, "--nar": args.official_nar}
    if "official" in parts and any(official.values()):
        fams = [f for f, d in (("ar", args.official_llamagen), ("arpg", args.official_arpg),
                               ("nar", args.official_nar)) if d]
        argv = ["--families", ",".join(fams), *[a for k, v in official.items() if v for a in (k, v)],
                *(["--arpg-site", args.official_arpg_site] if args.official_arpg_site else []), *threads,
                *shlex.split(args.official_args)]
        out["official"] = run_part("official.py", argv)
    out["ratios"] = ratios(out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

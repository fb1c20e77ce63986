r"""Sampling speed per family at the same width, total depth and batch on a 16x16 grid.

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

`emigm` (continuous KL-16 latents, so `--vocab` does not apply; its grid is `--grid`, 16 -> 256
tokens) has `--layers` / 2 encoder blocks and as many decoder blocks (`--layers` must be even),
a 64-slot class buffer (`--emigm-buffer-size`) and a per-token MLP diffusion head
(`--emigm-head-depth` x `--emigm-head-width`) on `--emigm-token-dim` channels. It samples with
the paper's 16-step setting: `--emigm-mask-steps` mask-prediction steps, each token's value
solved by DPM-Solver++ (singlestep, order 3) in `--emigm-solver-steps` head evaluations, and
CFG (at `--cfg`, like every family: the cost depends only on guidance being on, not on the
scale; the paper samples at 4.0) only at the steps whose time s lies in `--emigm-cfg-interval`
(lo, hi]; the other steps run the conditional batch alone. Besides images/s and peak memory
it reports the counts of the run (`model.last_sampling`): `mask_steps`,
`mae_passes_per_image_batch` (encoder+decoder passes, a guided step counting 2: the paper's
"NFE 16 x 1.2" is mask_steps x mae_passes_per_mask_step) and, separately, `head_nfe`: the
solver's network calls per token and over the batch, and its passes (a guided call counting 2),
plus the share of the time spent in the head (from one extra, untimed, instrumented run).
With `--precision bf16` it runs under bf16 autocast over float32 weights (its latents and the
head's diffusion arithmetic stay float32), not with its weights cast as the other families.
eMIGM-L (dim 1024, 16 + 16 blocks, 16 heads, head 8 x 1280) against LlamaGen-style `ar` at the
same width and total depth:

    python bench/sampling.py --families ar,emigm --width 1024 --layers 32 --heads 16   # eMIGM-L vs ar

`d2it` is the whole D2iT sampler on a `--grid` coarse grid (16: 256 cells, 1024 fine positions):
the Dynamic Grain Transformer predicts each grain map (`grain_passes_per_image_batch` small AR
passes), then the Dynamic Content Transformer ((`--layers` - `--d2it-refine-depth`) DiT blocks +
the RefineNet blocks over the fine grid) runs `--d2it-steps` respaced DDPM steps with CFG.
`dit` is the plain DiT it is compared with: the same trunk with all `--layers` as DiT blocks on
the same 256 tokens, no RefineNet, no grain transformer (an all-coarse map), the same sampler.
Their ratio is the cost of the dynamic parts:

    python bench/sampling.py --families dit,d2it --width 768 --layers 12 --heads 12   # D2iT-B vs DiT-B
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


def arch_for(family: str, args) -> dict:
    width, layers, heads = args.width, args.layers, args.heads
    if family == "ar":
        return {"dim": width, "n_layer": layers, "n_head": heads}
    if family == "arpg":
        return {"dim": width, "n_layer": layers, "n_head": heads}
    if family in ("nar", "ctf"):
        return {"dim": width, "n_layer": layers, "n_head": heads}
    if family == "emigm":  # `depth` is the encoder's blocks; the decoder has as many
        if layers % 2:
            raise SystemExit(f"bench/sampling.py: emigm splits --layers between an encoder and a decoder of "
                             f"equal depth, so --layers must be even (got {layers})")
        return {"dim": width, "depth": layers // 2, "n_head": heads, "head_depth": args.emigm_head_depth,
                "head_width": args.emigm_head_width, "token_dim": args.emigm_token_dim,
                "buffer_size": args.emigm_buffer_size}
    if family in ("d2it", "dit"):  # same total depth: D2iT's DiT blocks + RefineNet blocks = the DiT's blocks
        refine = args.d2it_refine_depth if family == "d2it" else 0
        if layers <= refine:
            raise SystemExit(f"bench/sampling.py: d2it needs --layers above --d2it-refine-depth ({refine})")
        return {"dim": width, "depth": layers - refine, "n_head": heads, "refine_depth": refine,
                "token_dim": args.d2it_token_dim}
    raise SystemExit(f"bench/sampling.py: no shape rule for family '{family}'")


def knobs_for(family: str, args) -> dict:
    if family == "arpg":
        return {"steps": args.arpg_steps}
    if family == "emigm":  # sampler: DPM-Solver++ singlestep order 3 (generate's defaults, the paper's)
        lo, hi = cfg_interval(args.emigm_cfg_interval)
        return {"steps": args.emigm_mask_steps, "solver_steps": args.emigm_solver_steps,
                "cfg_t_min": lo, "cfg_t_max": hi}
    if family == "d2it":  # the DGT predicts each grain map, then the DCT samples the content
        return {"steps": args.d2it_steps, "sampler": "ddpm"}
    if family == "dit":  # the plain DiT: every cell coarse, no grain transformer
        return {"steps": args.d2it_steps, "sampler": "ddpm",
                "grain": torch.zeros(args.batch, args.grid, args.grid, dtype=torch.long)}
    return {}


def cfg_interval(text: str) -> tuple[float, float]:
    """"lo,hi" -> (lo, hi): eMIGM guides the steps whose time s lies in (lo, hi]."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"bench/sampling.py: --emigm-cfg-interval takes 'lo,hi', got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise SystemExit(f"bench/sampling.py: --emigm-cfg-interval needs 0 <= lo < hi <= 1, got {text!r}")
    return lo, hi


def build(args, arch: dict):
    """The family's model (random weights) with the bench's vocabulary, classes and grid."""
    from raygen.models.registry import build_model

    common = {"vocab_size": args.vocab, "num_classes": 1000, "grid_size": args.grid}
    if args.one == "emigm":
        del common["vocab_size"]  # continuous tokens: the config's vocab_size is unused
    if args.one in ("d2it", "dit"):
        del common["vocab_size"]  # continuous latents
        return build_model("d2it", "debug", **common, **arch)
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
    arch = arch_for(args.one, args)
    model = build(args, arch)
    with torch.no_grad():  # a zero-initialised head would make every logit equal
        for name, p in model.named_parameters():
            if p.ndim >= 2 and float(p.abs().sum()) == 0.0:
                p.normal_(0, 0.02)
    model = model.to(device).eval()
    # emigm's generate() builds float32 latents and its head keeps the diffusion arithmetic in
    # float32, so it runs bf16 as autocast over float32 weights (as MAR/eMIGM sample) instead
    autocast = args.precision == "bf16" and args.one == "emigm"
    if args.precision == "bf16" and not autocast:
        model = model.to(torch.bfloat16)
    labels = torch.arange(args.batch, device=device) % 1000
    g = torch.Generator(device=device).manual_seed(0)
    knobs = knobs_for(args.one, args)

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
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
        "knobs": {k: ("all coarse" if k == "grain" else v) for k, v in knobs.items()},
        "seconds_per_batch": seconds,
        "images_per_s": args.batch / seconds,
        "forward_passes": getattr(model, "last_forward_passes",
                                  args.grid * args.grid + (1 if args.one == "ctf" else 0)),
    }
    if args.one == "emigm":
        out.update(emigm_counts(model, once, seconds), bf16_autocast=autocast)
    if args.one in ("d2it", "dit"):  # the DCT's network calls (a guided step counts 1 nfe, 2 passes)
        s = model.last_sampling
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        params = count(model.dct) + count(model.dgt) if args.one == "d2it" else count(model.dct) - count(model.dct.refine)
        out.update(params=params, forward_passes=s["passes"], nfe=s["nfe"],
                   grain_passes_per_image_batch=s["grain_passes"])
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        import resource

        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def emigm_counts(model, once, seconds: float) -> dict:
    """eMIGM's counts of the last timed run, and the head's share of one more, instrumented run."""
    s = dict(model.last_sampling)  # per image batch: mask_steps, passes (MAE), head_nfe, head_passes
    head = model.diffloss
    spent = [0.0]

    def timed_sample(*a, **kw):
        sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        res = type(head).sample(head, *a, **kw)
        sync()
        spent[0] += time.perf_counter() - t0
        return res

    head.sample = timed_sample
    try:
        total = once()
    finally:
        del head.sample
    steps = s["mask_steps"]
    return {
        "mask_steps": steps,
        "mae_passes_per_image_batch": s["passes"],
        "mae_passes_per_mask_step": s["passes"] / steps,  # the paper's "x 1.2"
        "head_nfe": {
            "solver_steps_per_token": s["head_nfe"] / steps,  # every token is solved once, at one mask step
            "calls_per_image_batch": s["head_nfe"],
            "passes_per_image_batch": s["head_passes"],  # a guided call counts 2
        },
        "head_seconds_per_batch": spent[0] / total * seconds,
        "head_time_fraction": spent[0] / total,
    }


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
    p.add_argument("--emigm-mask-steps", type=int, default=16, help="emigm: mask-prediction steps")
    p.add_argument("--emigm-solver-steps", type=int, default=8, help="emigm: DPM-Solver++ steps per token")
    p.add_argument("--emigm-cfg-interval", default="0.1,0.3", help="emigm: guide the steps with s in (lo, hi]")
    p.add_argument("--emigm-head-depth", type=int, default=8, help="emigm: diffusion-head ResBlocks (L: 8)")
    p.add_argument("--emigm-head-width", type=int, default=1280, help="emigm: diffusion-head width (L: 1280)")
    p.add_argument("--emigm-token-dim", type=int, default=16, help="emigm: channels per token (KL-16: 16)")
    p.add_argument("--emigm-buffer-size", type=int, default=64, help="emigm: class-embedding buffer slots")
    p.add_argument("--d2it-steps", type=int, default=50, help="d2it/dit: respaced DDPM steps (the paper's DiT: 250)")
    p.add_argument("--d2it-refine-depth", type=int, default=2, help="d2it: RefineNet blocks (of --layers)")
    p.add_argument("--d2it-token-dim", type=int, default=4, help="d2it/dit: latent channels (DiT's SD-VAE: 4)")
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
    for fam in args.families.split(","):  # shape rules and knobs fail here, before any subprocess
        arch_for(fam, args)
        knobs_for(fam, args)
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

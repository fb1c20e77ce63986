"""Training-step time: raygen's Ray Train + DeepSpeed path against a plain single-process torch loop.

    python bench/train_step.py                               # digits 8x8, the demo model, CPU
    python bench/train_step.py --modes torch,deepspeed --size L --vocab 16384 --grid 16 \\
        --batch 32 --precision bf16 --stage 2                # one GPU, no Ray

Modes (compared in one run, same model, same global batch):
- `torch`: a plain loop (AdamW, clipping; bf16 autocast when --precision bf16), one process.
- `deepspeed`: raygen's DeepSpeedEngine in one process (world size 1; NCCL on GPU, gloo on CPU).
- `ddp` (CPU): the same data-parallel work without the platform: `--workers` processes of plain
  torch with DistributedDataParallel over gloo, the threads and the global batch split between them;
  `ds-ddp`: the same processes driving raygen's DeepSpeedEngine (ZeRO-0) instead: no Ray.
- `ray`: `raygen train` itself: Ray Data streaming the tokenized digits (at another --vocab,
  --grid or --classes: a synthetic data set of seeded random ids) into `--workers` Ray Train
  workers driving DeepSpeed; step time and data_wait_frac come from the run's MLflow metrics
  (the first log window, which includes start-up, is left out).

    python bench/train_step.py --modes torch,deepspeed,ray --arch '{"dim":512,"n_layer":12,"n_head":8}' \
        --vocab 16384 --grid 16 --batch 16 --steps 6 --warmup 2 --threads 2   # the width-512 shape

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raygen.models.registry import build_model  # noqa: E402


def _batch(args, device, g):
    n = args.grid * args.grid
    return {"tokens": torch.randint(args.vocab, (args.batch, n), generator=g).to(device),
            "label": torch.randint(args.classes, (args.batch,), generator=g).to(device)}


def _model(args, device):
    torch.manual_seed(0)
    model = build_model(args.family, args.size, vocab_size=args.vocab, num_classes=args.classes,
                        grid_size=args.grid, **json.loads(args.arch))
    return model.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(args, device, step_fn) -> dict:
    """Median wall time of step_fn(batch, generator) after args.warmup untimed steps."""
    g = torch.Generator().manual_seed(0)
    batches = [_batch(args, device, g) for _ in range(4)]
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        step_fn(batches[i % 4], gen)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return _summary(times, args.batch, device)


def bench_torch(args, device) -> dict:
    _reset_peak(device)
    model = _model(args, device)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")

    def step(batch, gen):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(batch, generator=gen)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time_steps(args, device, step)


def bench_deepspeed(args, device) -> dict:
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    import deepspeed

    from raygen.platform.train.engine import DeepSpeedEngine, build_ds_config

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    _reset_peak(device)
    model = _model(args, device)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    stage = 0 if args.stage == "auto" else int(args.stage)  # auto on one process: 0
    ds = build_ds_config(global_batch=args.batch, micro_batch=None, world=1, stage=stage,
                         bf16=args.precision == "bf16", grad_clip=1.0)
    ds = {**ds, **json.loads(args.ds_config)}
    engine = DeepSpeedEngine(model, opt, ds)

    def step(batch, gen):
        engine.backward(engine(batch, generator=gen)["loss"])
        engine.step()

    return {**_time_steps(args, device, step), "zero_stage": stage}


def _ddp_worker(rank: int, args, threads: int, port: int, results, engine: str) -> None:
    """One rank of the `ddp` / `ds-ddp` modes: torch DistributedDataParallel, or raygen's DeepSpeedEngine
    (ZeRO-0), over gloo, each with plain in-memory batches: no Ray."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sys.stdout = sys.stderr  # the libraries' prints: stdout stays the parent's JSON
    torch.set_num_threads(threads)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": str(args.workers), "DS_ACCELERATOR": "cpu"}
    os.environ.update(env)
    local = argparse.Namespace(**{**vars(args), "batch": args.batch // args.workers})
    model = _model(args, torch.device("cpu"))
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
    if engine == "ddp":
        dist.init_process_group("gloo", rank=rank, world_size=args.workers)
        ddp = DistributedDataParallel(model)

        def step(batch, gen):
            ddp(batch, generator=gen)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import deepspeed

        from raygen.platform.train.engine import DeepSpeedEngine, build_ds_config

        deepspeed.init_distributed(dist_backend="gloo")
        ds = build_ds_config(global_batch=args.batch, micro_batch=None, world=args.workers, stage=0, bf16=False,
                             grad_clip=1.0)
        eng = DeepSpeedEngine(model, opt, ds)

        def step(batch, gen):
            eng.backward(eng(batch, generator=gen)["loss"])
            eng.step()
    try:
        g = torch.Generator().manual_seed(rank)
        batches = [_batch(local, torch.device("cpu"), g) for _ in range(4)]
        gen = torch.Generator().manual_seed(rank)
        times = []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step(batches[i % 4], gen)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if rank == 0:
            results.put(times)
    finally:
        dist.destroy_process_group()


def bench_ddp(args, engine: str = "ddp") -> dict:
    """`--workers` processes x (torch threads / workers) threads, the global batch split: the data-parallel
    work of the ray mode without Ray Train, Ray Data or DeepSpeed (CPU only)."""
    import socket

    import torch.multiprocessing as mp

    threads = max(1, (args.threads or torch.get_num_threads()) // args.workers)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, args, threads, port, results, engine))
             for r in range(args.workers)]
    for proc in procs:
        proc.start()
    times = results.get()
    for proc in procs:
        proc.join()
    return {**_summary(times, args.batch, torch.device("cpu")), "workers": args.workers, "threads_per_worker": threads}


def synthetic_dataset(out: Path, args, rows: int) -> Path:
    """A tokenized data set of seeded random ids at the bench's vocabulary and grid (what the
    step costs does not depend on the values), written as `raygen tokenize` writes one."""
    import numpy as np

    from raygen.models.tokenizers import PaletteConfig, PaletteTokenizer
    from raygen.platform.data import shards
    from raygen.platform.data.tokenize import column_of

    n = args.grid * args.grid
    palette = torch.linspace(0, 255, args.vocab)[:, None]  # a codec spec for the manifest (never decodes here)
    tok = PaletteTokenizer(PaletteConfig(size=args.vocab), image_size=args.grid, channels=1, palette=palette)
    col = column_of(tok, "float16")
    g = np.random.default_rng(0)
    writer = shards.ShardWriter(out, [col], 512)
    writer.add({col.name: g.integers(0, args.vocab, (rows, n), dtype=np.int32)},
               g.integers(0, args.classes, rows), np.arange(rows))
    writer.finish({"schema_version": shards.SCHEMA_VERSION, "request": {}, "skipped": [],
                   "source": {"name": "synthetic", "path": None, "image_size": args.grid, "channels": 1, "rows": rows},
                   "tokenizer": {**tok.spec(), "fingerprint": tok.fingerprint()}, "grid": [args.grid, args.grid],
                   "vocab_size": args.vocab, "num_classes": args.classes})
    return out


def bench_ray(args) -> dict:
    from mlflow.tracking import MlflowClient

    from raygen.config import load_config
    from raygen.platform.data.tokenize import tokenize
    from raygen.platform.train.driver import train

    work = Path(tempfile.mkdtemp(prefix="raygen-bench-"))
    arch = json.loads(args.arch)
    overrides = [f"workdir={work}", f"train.workers={args.workers}", f"train.global_batch={args.batch}",
                 f"train.steps={args.warmup + args.steps}", f"train.log_every={args.warmup}",
                 f"train.checkpoint_every={10**6}", f"train.zero_stage={args.stage}", f"model.family={args.family}",
                 f"model.size={args.size}", "sample.per_label=1", f"train.precision={args.precision}"]
    overrides += [f"model.arch.{k}={v}" for k, v in arch.items()]
    cfg = load_config("demo", overrides)
    if (args.vocab, args.grid, args.classes) == (16, 8, 10):  # the demo's own digits
        data_dir = tokenize(cfg, progress=False).out
    else:
        data_dir = synthetic_dataset(work / "data", args, rows=max(2048, 4 * args.batch))
    with contextlib.redirect_stdout(sys.stderr):  # Ray's worker lines: stdout stays the JSON
        r = train(cfg, data_dir=str(data_dir))
    client = MlflowClient(r.tracking_uri)
    hist = {k: [m.value for m in sorted(client.get_metric_history(r.run_id, k), key=lambda m: m.step)]
            for k in ("perf/samples_per_s", "perf/data_wait_frac")}
    sps = statistics.mean(hist["perf/samples_per_s"][1:] or hist["perf/samples_per_s"])
    return {"step_s": args.batch / sps, "samples_per_s": sps,
            "data_wait_frac": statistics.mean(hist["perf/data_wait_frac"][1:] or hist["perf/data_wait_frac"]),
            "workers": args.workers, "zero_stage": int(client.get_run(r.run_id).data.params["derived.zero_stage"]),
            "wall_s_total": r.seconds}


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _summary(times, batch, device) -> dict:
    med = statistics.median(times)
    out = {"step_s": med, "step_s_min": min(times), "samples_per_s": batch / med}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="torch,ray")
    p.add_argument("--family", default="ar")
    p.add_argument("--size", default="debug")
    p.add_argument("--arch", default="{}", help="JSON architecture overrides")
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--stage", default="auto", choices=["auto", "0", "1", "2", "3"],
                   help="ZeRO stage (auto: what `raygen train` picks for this model and worker count)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ds-config", default="{}", help="JSON merged into the ds_config (deepspeed mode)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for in-process modes (0 = default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    modes = args.modes.split(",")
    model = build_model(args.family, args.size, vocab_size=args.vocab, num_classes=args.classes, grid_size=args.grid,
                        **json.loads(args.arch))
    out = {"family": args.family, "size": args.size, "params": model.num_params(), "grid": args.grid,
           "vocab": args.vocab, "global_batch": args.batch, "precision": args.precision, "device": str(device),
           "torch_threads": torch.get_num_threads()}
    del model
    stdout, sys.stdout = sys.stdout, sys.stderr  # the libraries' prints (also late ones from Ray workers)
    try:
        if "torch" in modes:
            out["torch"] = bench_torch(args, device)
        if "ddp" in modes:
            out["ddp"] = bench_ddp(args)
        if "ds-ddp" in modes:
            out["ds_ddp"] = bench_ddp(args, "deepspeed")
        if "deepspeed" in modes:
            out["deepspeed"] = bench_deepspeed(args, device)
        if "ray" in modes:
            out["ray_deepspeed"] = bench_ray(args)
    finally:  # late library lines (Ray's log forwarding at exit) keep going to stderr
        sys.stdout.flush()
    for mode in ("ddp", "ds_ddp", "deepspeed", "ray_deepspeed"):
        if mode in out and "torch" in out:
            out[f"{mode}_over_torch_step_time"] = out[mode]["step_s"] / out["torch"]["step_s"]
    for mode in ("ds_ddp", "ray_deepspeed"):
        if "ddp" in out and mode in out:
            out[f"{mode}_over_ddp_step_time"] = out[mode]["step_s"] / out["ddp"]["step_s"]
    stdout.write(json.dumps(out, indent=1) + "\n")
    stdout.flush()


if __name__ == "__main__":
    main()

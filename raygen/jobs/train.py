"""`raygen train`: train a model on a tokenized data set with Ray Train + DeepSpeed, tracked in MLflow."""

from __future__ import annotations

import argparse
import os

from raygen.config import Config, load_config
from raygen.errors import UserError
from raygen.jobs.common import add_config_args, print_dry_run


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on tokenized shards (Ray Train + DeepSpeed + MLflow)")
    p.add_argument("--data", help="= data.shards: the directory `raygen tokenize` wrote")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a stopped run (same MLflow run, latest checkpoint)")
    p.add_argument("--tracking-uri", help="= tracking.uri (MLflow); MLFLOW_TRACKING_URI also works")
    add_config_args(p)
    p.set_defaults(func=run)


def resolve_train_config(args: argparse.Namespace) -> Config:
    flags = {"data.shards": args.data, "tracking.uri": args.tracking_uri}
    if not args.resume:
        return load_config(args.preset, args.overrides, **flags)
    if args.preset:
        raise UserError("--resume continues a run with its own config; give overrides (e.g. train.steps=2000), not --preset")
    from raygen.platform.tracking import tracking_uri
    from raygen.platform.train.driver import run_config_of

    # Where the run lives may itself be an override (workdir, tracking.uri); the rest applies on top.
    where = load_config(None, [o for o in args.overrides if o.split("=")[0] in ("workdir", "tracking.uri")], **flags)
    saved = Config.from_dict(run_config_of(tracking_uri(where.workdir, where.tracking.uri), args.resume))
    return load_config(None, args.overrides, base=saved, **flags)


def run(args: argparse.Namespace) -> int:
    from raygen.platform.data.tokenize import data_dir_of

    cfg = resolve_train_config(args)
    data_dir = data_dir_of(cfg)
    if args.dry_run:
        import torch

        from raygen.platform.train.driver import plan_training

        p = plan_training(cfg, cluster_cpus=float(os.cpu_count() or 1), cluster_gpus=float(torch.cuda.device_count()),
                          data_dir=data_dir)
        print_dry_run(cfg, {"data": p.data_dir, "model params": f"{p.n_params:,}", "workers": p.workers,
                            "cpus per worker": p.cpus_per_worker, "precision": p.precision, "zero stage": p.zero_stage,
                            "micro batch": p.micro_batch, "accumulation": p.accumulation, "ds_config": p.ds_config})
        return 0
    from raygen.platform.train.driver import train

    r = train(cfg, data_dir=data_dir, resume_run=args.resume, progress=True)
    m = r.metrics
    print(f"run {r.run_id}: {r.steps} steps in {r.seconds:.0f} s, final loss {m.get('train/loss', float('nan')):.4f}"
          + (f", reconstruction PSNR {m['eval/psnr']:.1f} dB" if "eval/psnr" in m else "")
          + (f", class accuracy {m['eval/class_acc']:.3f}" if "eval/class_acc" in m else ""))
    print(f"tracking: {r.tracking_uri}")
    print(f"register: raygen models register {r.run_id} --name NAME --alias latest")
    return 0

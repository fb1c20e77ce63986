"""`raygen sweep SPEC`: a Ray Tune sweep over train-time or sample-time knobs, tracked in MLflow.

    raygen sweep lr-schedule                       # a spec in raygen/configs/sweeps/
    raygen sweep SAMPLE_SPEC --model models:/NAME@ALIAS --dry-run
    raygen sweep my-sweep.yaml train.steps=300     # key=value overrides of the trials' base config
"""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweep with Ray Tune (train- or sample-time knobs), MLflow child runs")
    p.add_argument("spec", metavar="SPEC", help="a sweep spec YAML, or a name from raygen/configs/sweeps/")
    p.add_argument("--data", help="train sweeps: the tokenized data set (= the spec's data)")
    p.add_argument("--model", help="sample sweeps: models:/NAME@ALIAS to sweep (= the spec's model)")
    p.add_argument("--tracking-uri", help="= tracking.uri (MLflow); MLFLOW_TRACKING_URI also works")
    p.add_argument("--dry-run", action="store_true", help="check everything, print the trials and resources, and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every trial")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raygen.config import load_config
    from raygen.platform.sweep import driver as sweep
    from raygen.platform.sweep.spec import load_spec

    spec = load_spec(args.spec)
    kw = dict(data=args.data, model=args.model, tracking_uri=args.tracking_uri)
    ray_cfg = load_config(spec.base if spec.kind == "train" else None, [*spec.overrides, *args.overrides]).ray
    if not (ray_cfg.address or os.environ.get("RAY_ADDRESS")):
        # A local sweep: every check, sized for this machine, before Ray starts.
        plan = sweep.plan_sweep(spec, args.overrides, **kw)
        if args.dry_run:
            print(sweep.describe(plan), end="")
            return 0
    import ray

    from raygen.platform.cluster.connect import init_ray

    init_ray(ray_cfg)  # sized for the cluster's free resources
    free = ray.available_resources()
    plan = sweep.plan_sweep(spec, args.overrides, cpus=float(free.get("CPU", 0)), gpus=float(free.get("GPU", 0)), **kw)
    if args.dry_run:
        print(sweep.describe(plan), end="")
        return 0
    r = sweep.run_sweep(plan, out=lambda line: print(line, flush=True))
    print()
    print(r.table, end="")
    print(f"sweep {spec.name}: {len(r.rows)} trials in {r.seconds:.0f} s; parent run {r.parent_run_id}")
    print(f"tracking: {r.uri}  (Tune logs: {r.tune_path})")
    if r.interrupted:
        print("sweep interrupted: nothing registered"
              + (f"; to register the best so far: raygen models register {r.best.run_id} --name NAME --alias ALIAS"
                 if r.best is not None and r.best.run_id and spec.kind == "train" else ""))
        return 130
    if r.registered:
        name, version, alias = r.registered
        print(f"registered: models:/{name}@{alias} (version {version})")
        if spec.kind == "sample":
            print(f"sample it: raygen sample models:/{name}@{alias}  (the alias brings the best knobs: "
                  + ", ".join(f"{k}={v}" for k, v in r.best.values.items()) + ")")
    return 0

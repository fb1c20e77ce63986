"""`raygen demo` (= `make demo`): the main job on the embedded defaults, end to end.

Tokenize the bundled digits, train the preset's model (the `demo` preset's by default) on 2
workers with ZeRO-2, register it as `digits-<family>` (`models:/digits-<family>@latest`), write
a sample grid (one row per digit) and print the class accuracy the held-out classifier gives
it. The `<family>-digits` presets run the same job for the other families.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from raygen.jobs.common import add_config_args, print_dry_run, resolve


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded defaults (digits, 2 workers, ZeRO-2)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raygen.platform import tracking
    from raygen.platform.data.tokenize import tokenize
    from raygen.platform.train.driver import train

    args.preset = args.preset or "demo"
    cfg = resolve(args)
    if args.dry_run:
        print_dry_run(cfg)
        return 0
    t0 = time.time()
    data = tokenize(cfg, progress=False)
    print(f"[1/4] data: {data.manifest['rows']} digits -> {data.out} "
          f"({'up to date' if data.up_to_date else f'{data.seconds:.0f} s'})")
    result = train(cfg, data_dir=str(data.out), progress=True)
    print(f"[2/4] trained {cfg.model.family}-{cfg.model.size} for {result.steps} steps in {result.seconds:.0f} s "
          f"(run {result.run_id}, final loss {result.metrics.get('train/loss', float('nan')):.3f})")
    name = f"digits-{cfg.model.family}"
    version = tracking.register(result.tracking_uri, result.run_id, name, "latest")
    print(f"[3/4] registered models:/{name}@latest (version {version})")
    acc = result.metrics.get("eval/class_acc")
    if "eval/psnr" in result.metrics:  # a codec (an autoencoder family): reconstructions, not samples
        grids = sorted((result.export_dir.parent / f"{result.export_dir.name}-reconstructions").glob("*.png"))
        out = Path(cfg.workdir) / "reconstructions.png"
        shutil.copy(grids[-1], out)
        print(f"[4/4] reconstructions: {out} (originals above reconstructions); PSNR "
              f"{result.metrics['eval/psnr']:.1f} dB" + (f", class accuracy {acc:.3f}" if acc is not None else ""))
    else:
        samples = Path(cfg.workdir) / "samples.png"
        shutil.copy(result.export_dir.parent / f"{result.export_dir.name}-samples.png", samples)
        print(f"[4/4] samples: {samples} (one row per digit); class accuracy {acc:.3f}")
        for extra in sorted(result.export_dir.parent.glob(f"{result.export_dir.name}-samples-*.png")):
            shutil.copy(extra, Path(cfg.workdir) / extra.name.replace(f"{result.export_dir.name}-", ""))
            print(f"      beside them: {Path(cfg.workdir) / extra.name.replace(f'{result.export_dir.name}-', '')}")
    mlflow = Path(sys.executable).parent / "mlflow"  # the one installed beside raygen, wherever it runs from
    print(f"\ndone in {time.time() - t0:.0f} s. Browse the run with:\n"
          f"  {mlflow if mlflow.is_file() else 'mlflow'} ui --backend-store-uri {result.tracking_uri} "
          "--host 127.0.0.1 --port 5000")
    return 0

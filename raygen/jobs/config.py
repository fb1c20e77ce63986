"""`raygen config`: show the resolved config, every key with its meaning, or the presets."""

from __future__ import annotations

import argparse

from raygen.jobs.common import add_config_args, resolve


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config, its keys or the presets")
    p.add_argument("--keys", action="store_true", help="list every key with its type, default and meaning")
    p.add_argument("--presets", action="store_true", help="list the presets in raygen/configs/ and the sweep specs")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raygen.config import describe_keys, preset_names

    if args.presets:
        from raygen.platform.sweep.spec import spec_names

        print("\n".join(preset_names()))
        print("# sweep specs (raygen sweep NAME), in raygen/configs/sweeps/:")
        print("\n".join(f"sweeps/{n}" for n in spec_names()))
        return 0
    cfg = resolve(args)
    if args.keys:
        for key, tp, value, help_ in describe_keys(cfg):
            print(f"{key} = {value!r}  ({tp})\n    {help_}")
        return 0
    print(cfg.to_yaml(), end="")
    return 0

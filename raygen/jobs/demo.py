"""`raygen demo` (= `make demo`): the main job on the embedded defaults.

For now it tokenizes the bundled digits with the palette tokenizer and prints where the
shards went; training, registration and sampling join it as they land.
"""

from __future__ import annotations

import argparse

from raygen.jobs.common import add_config_args, resolve


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded defaults (digits)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raygen.platform.shards import check_dataset, format_report
    from raygen.platform.tokenize import tokenize

    args.preset = args.preset or "demo"
    cfg = resolve(args)
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    r = tokenize(cfg)
    print(format_report(r.out, check_dataset(r.out)))
    print(f"\nshards: {r.out}")
    return 0

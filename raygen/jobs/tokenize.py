"""`raygen tokenize`: images -> tokenized Parquet shards + manifest.json."""

from __future__ import annotations

import argparse

from raygen.jobs.common import add_config_args, print_dry_run, resolve
from raygen.models.tokenizers import TOKENIZERS


def add_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="tokenize an image source into Parquet shards")
    p.add_argument("--source", choices=["digits", "folder", "parquet"], help="= data.source")
    p.add_argument("--path", help="= data.path (folder or Parquet source)")
    p.add_argument("--tokenizer", choices=list(TOKENIZERS), help="= tokenizer.name")
    p.add_argument("--out", help="= data.shards (the data set directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set made with other settings")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raygen.platform.data.tokenize import plan, tokenize

    cfg = resolve(args, **{"data.source": args.source, "data.path": args.path,
                           "tokenizer.name": args.tokenizer, "data.shards": args.out})
    if args.dry_run:
        p = plan(cfg)
        print_dry_run(cfg, {"data.image_size": p.image_size, "data.channels": p.channels, "data.shards": p.out,
                            "source rows": p.source.rows})
        return 0
    from raygen.models.tokenizers import CODECS
    from raygen.platform.data.shards import columns, data_column

    from raygen.jobs.common import check_writable

    check_writable(str(plan(cfg).out), "the data set directory (--out / data.shards)", directory=True)
    r = tokenize(cfg, overwrite=args.overwrite)
    m = r.manifest
    state = "already up to date" if r.up_to_date else f"written in {r.seconds:.1f} s"
    print(f"{m['rows']} rows in {len(m['shards'])} shards ({state}), {len(m['skipped'])} skipped")
    col = data_column(m)
    size = f"vocab {col.vocab_size}" if col.kind == "ids" else f"{col.kind} {'x'.join(map(str, col.shape))} {col.dtype}"
    print(f"grid {m['grid'][0]}x{m['grid'][1]}, {size}, {m['num_classes']} classes, "
          f"codec {m['tokenizer']['name']} {m['tokenizer']['fingerprint']}"
          + (f" (models:/{reg['name']}/{reg['version']})" if (reg := m["tokenizer"].get("registry", {})).get("version")
             else ""))
    for side in (c for c in columns(m) if c.kind == "side"):
        print(f"  side column {side.name}: {'x'.join(map(str, side.shape))} {side.dtype}")
    fitted = CODECS[m["tokenizer"]["name"]].describe_state(m["tokenizer"].get("state") or {})
    if fitted:
        print(f"  {fitted}")
    print(f"shards: {r.out}")
    return 0

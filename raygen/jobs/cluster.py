"""`raygen cluster`: CTF's k-means over a data set's codebook -> a fine->coarse lookup file."""

from __future__ import annotations

import argparse

from raygen.jobs.common import add_config_args, print_dry_run, resolve


def add_parser(sub) -> None:
    p = sub.add_parser("cluster", help="CTF: cluster the tokenizer's codebook into K coarse labels (a lookup file)")
    p.add_argument("--data", help="= data.shards: the tokenized data set whose codebook to cluster")
    p.add_argument("--clusters", type=int, help="= ctf.clusters (K)")
    p.add_argument("--seed", type=int, help="= ctf.seed (k-means++)")
    p.add_argument("--out", help="lookup file to write; default: the cache `raygen train` reads (<workdir>/cache/ctf/)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raygen.jobs.train import data_dir_of
    from raygen.platform import shards
    from raygen.platform.ctf import cache_path, cluster_dataset, write_lookup

    cfg = resolve(args, **{"data.shards": args.data, "ctf.clusters": args.clusters, "ctf.seed": args.seed})
    data_dir = data_dir_of(cfg)
    manifest = shards.read_manifest(data_dir)
    c = cfg.ctf
    out = args.out or cache_path(cfg.workdir, manifest, c.clusters, c.seed, c.iters)
    if args.dry_run:
        print_dry_run(cfg, {"data": data_dir, "out": out})
        return 0
    lookup, meta = cluster_dataset(manifest, c.clusters, seed=c.seed, iters=c.iters)
    path = write_lookup(out, lookup, meta)
    sizes = meta["cluster_sizes"]
    print(f"{meta['vocab_size']} codebook entries -> {c.clusters} clusters (sizes {sizes['min']}..{sizes['max']}, "
          f"median {sizes['median']:g}); lookup {meta['fingerprint']}")
    print(f"lookup: {path}")
    if args.out:
        print(f"train with it: raygen train ... ctf.clusters={c.clusters} ctf.lookup={path}")
    return 0

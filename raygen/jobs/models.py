"""`raygen models register|list|show`: the MLflow model registry."""

from __future__ import annotations

import argparse

from raygen.families import all_families
from raygen.jobs.common import add_config_args, print_dry_run


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="the model registry: register, list, show")
    p.add_argument("--tracking-uri", help="= tracking.uri")
    p.add_argument("--workdir", default="work", help="where the default MLflow store lives")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    r = verbs.add_parser("register", help="register a finished run's model (or one composed of several runs)")
    r.add_argument("run_id")
    r.add_argument("--name", required=True)
    r.add_argument("--alias", help="e.g. latest, champion")
    for family in all_families():  # options of exports composed of several runs
        family.add_register_args(r)
    r.set_defaults(func=run_register)
    ls = verbs.add_parser("list", help="registered models with their versions and aliases")
    ls.set_defaults(func=run_list)
    sh = verbs.add_parser("show", help="one model's versions, runs and aliases")
    sh.add_argument("name")
    sh.set_defaults(func=run_show)
    im = verbs.add_parser(
        "import", help="register a released checkpoint (a paper's generator weights, or VQ-16 / KL-16 tokenizer "
                       "weights) from a local file",
        description="Map a released checkpoint onto raygen's layout, check every key and shape, write a raygen "
                    "export and register it. Generators: the family's tokens are decoded by the codec the config "
                    "names (e.g. tokenizer.name=vq tokenizer.vq.checkpoint=models:/vq16@official) or by a "
                    "tokenized data set's (--data); --preset FAMILY-SIZE brings the paper's sampling settings.")
    im.add_argument("kind", metavar="FAMILY|CODEC", help="a family with released weights, or a codec (vq, kl)")
    im.add_argument("file", help="the checkpoint: a local file, never downloaded")
    im.add_argument("--name", required=True, help="the registered model's name")
    im.add_argument("--alias", help="e.g. official")
    im.add_argument("--size", help="the family's size (read from the file's shapes when omitted)")
    im.add_argument("--data", help="a tokenized data set whose codec decodes the model's tokens (and names its "
                                   "classes)")
    add_config_args(im)
    im.set_defaults(func=run_import)


def _uri(args) -> str:
    from raygen.platform.tracking import tracking_uri

    return tracking_uri(args.workdir, args.tracking_uri)


def run_register(args: argparse.Namespace) -> int:
    from raygen.platform.tracking import register

    run_id = args.run_id
    for family in all_families():
        composed = family.compose(_uri(args), args.run_id, args, args.workdir)
        if composed:
            run_id, line = composed
            print(line)
            break
    version = register(_uri(args), run_id, args.name, args.alias)
    ref = f"models:/{args.name}@{args.alias}" if args.alias else f"models:/{args.name}/{version}"
    print(f"registered {args.name} version {version}: {ref}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from raygen.platform.tracking import list_models

    models = list_models(_uri(args))
    if not models:
        print("no registered models")
    for m in models:
        aliases = ", ".join(f"@{a}->v{v}" for a, v in sorted(m["aliases"].items())) or "no aliases"
        print(f"{m['name']}: versions {', '.join(map(str, m['versions']))}; {aliases}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from raygen.platform.tracking import show_model

    info = show_model(_uri(args), args.name)
    print(info["name"])
    for v in info["versions"]:
        aliases = " ".join(f"@{a}" for a in v["aliases"])
        print(f"  v{v['version']}  run {v['run_id']}  {aliases}\n      {v['source']}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from raygen.config import load_config
    from raygen.platform.imports import import_checkpoint

    cfg = load_config(args.preset, args.overrides, **{"workdir": args.workdir if args.workdir != "work" else None,
                                                      "tracking.uri": args.tracking_uri})
    if args.dry_run:
        print_dry_run(cfg, {"import": args.file, "as": args.kind})
        return 0
    r = import_checkpoint(cfg, args.kind, args.file, registered_name=args.name, alias=args.alias, size=args.size,
                          data_dir=args.data)
    print(f"imported {r.what} from {args.file}" + (f" ['{r.entry}']" if r.entry else "") + f", sha256 {r.sha256[:16]}")
    ref = f"models:/{r.name}@{args.alias}" if args.alias else r.reference
    print(f"registered {r.name} version {r.version} (run {r.run_id}): {ref}")
    return 0

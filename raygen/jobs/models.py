"""`raygen models register|list|show`: the MLflow model registry."""

from __future__ import annotations

import argparse

from raygen.families import all_families


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

"""`raygen eval MODEL`: FID, IS, precision/recall and the digits metrics, logged to the model's run.

    raygen eval models:/NAME@latest --n 1000 sample.cfg_scale=3
    raygen eval --make-reference work/data/digits-palette-8 --out work/ref-digits8.npz
    raygen eval models:/imagenet-l@champion --protocol paper --reference VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

import argparse
import re

from raygen.jobs.common import alias_knobs_derived, check_writable, print_alias_knobs, print_dry_run


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (FID/IS/precision/recall, digits metrics) or make a reference")
    p.add_argument("model", nargs="?", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or an export directory")
    p.add_argument("--n", type=int, help="= eval.n: images to sample")
    p.add_argument("--reference", metavar="REF", help="= eval.reference: statistics from --make-reference, or an ADM "
                   "evaluator reference batch (.npz, e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--protocol", metavar="paper[:KEY]", help="= eval.protocol: the family's paper-table row for the "
                   "model's size (50,000 samples, the paper's sampling settings)")
    p.add_argument("--make-reference", metavar="DATA_DIR", help="compute reference statistics from a tokenized data set")
    p.add_argument("--out", metavar="REF", help="with --make-reference: the file to write")
    p.add_argument("--inception-weights", metavar="PATH", help="= eval.inception_weights: pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--workers", type=int, help="= eval.workers: sampling actors")
    p.add_argument("--cfg", type=float, help="= sample.cfg_scale")
    p.add_argument("--steps", type=int, help="= sample.steps")
    p.add_argument("--seed", type=int, help="= sample.seed")
    p.add_argument("--tracking-uri", help="= tracking.uri")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (sample.*, eval.*, workdir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raygen.config import load_config
    from raygen.errors import UserError
    from raygen.platform.evaluate import scoring as evaluate

    if args.model and re.match(r"^[A-Za-z_][\w.]*=", args.model):  # a key=value override, not a model
        args.overrides = [args.model, *(args.overrides or [])]
        args.model = None
    flags = {"eval.n": args.n, "eval.reference": args.reference, "eval.protocol": args.protocol, "eval.inception_weights": args.inception_weights,
             "eval.workers": args.workers, "sample.cfg_scale": args.cfg, "sample.steps": args.steps,
             "sample.seed": args.seed, "tracking.uri": args.tracking_uri}
    if args.make_reference:
        if args.model or not args.out:
            raise UserError("--make-reference DATA_DIR takes --out REF and no MODEL")
        cfg = load_config(None, args.overrides, **flags)
        if args.dry_run:
            print_dry_run(cfg, {"data": args.make_reference, "out": args.out})
            return 0
        check_writable(args.out, "--out")
        ref = evaluate.make_reference(cfg, args.make_reference, args.out)
        stats = ", ".join(f"{k} ({v['n']} images, weights {v['fingerprint']})" for k, v in ref.stats.items())
        print(f"reference {ref.path}: {ref.resolution} images; {stats}")
        return 0
    if not args.model:
        raise UserError("give a MODEL to evaluate (models:/NAME@ALIAS, runs:/RUN_ID or a directory) or --make-reference DATA_DIR")
    if args.out:
        raise UserError("--out goes with --make-reference")
    target = evaluate.resolve_target(args.model, args.overrides, flags)
    if args.dry_run:
        derived = {"model": target.export_dir, "run": target.run_id, **alias_knobs_derived(target.knobs)}
        if target.row is not None:
            from raygen.platform.evaluate.protocol import describe

            derived["protocol"] = describe(target.row) + (f"; with changes: {'; '.join(target.changed)}"
                                                          if target.changed else "")
        print_dry_run(target.cfg, derived)
        return 0
    print_alias_knobs(args.model, target.knobs)
    if target.row is not None:
        from raygen.platform.evaluate.protocol import describe

        print(f"protocol: {describe(target.row)}: {target.cfg.eval.n} samples, {target.row.sample}")
    r = evaluate.evaluate(target)
    paper = evaluate.paper_scores(target.row)
    for k, v in r["metrics"].items():
        print(f"{k} {v:.4f}" + (f" (paper {paper[k]:g})" if paper.get(k) is not None else ""))
    ident = r["identity"]
    ref = ident.get("reference") or {}
    print(f"evaluator {ident['evaluator']}; extractors "
          + ", ".join(f"{k} {v['fingerprint']}" for k, v in ident["extractors"].items())
          + f"; reference {ref.get('name', 'none')}" + (f" (sha256 {ref['sha256'][:16]})" if ref.get("sha256") else ""))
    print(f"{r['n']} images on {r['workers']} workers in {r['seconds']:.0f} s")
    for note in r["notes"]:
        print(f"note: {note}")
    if r["kept_params"]:
        print(f"note: params {', '.join(sorted(r['kept_params']))} keep an earlier evaluation's values (MLflow params "
              "never change); this one's config is in the run's eval/ artifacts")
    if r["run_id"]:
        print(f"logged to run {r['run_id']}")
    return 0

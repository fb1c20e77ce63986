"""`raygen sample MODEL`: draw a grid of samples (and, for digits, judge them)."""

from __future__ import annotations

import argparse

from raygen.jobs.common import alias_knobs_derived, check_writable, print_alias_knobs, print_dry_run


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample a grid from a model (models:/NAME@ALIAS, runs:/ID or a directory)")
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or an export directory")
    p.add_argument("--labels", help="= sample.labels: all, 0-9, 1,3,5")
    p.add_argument("--per-label", type=int, help="= sample.per_label")
    p.add_argument("--cfg", type=float, help="= sample.cfg_scale")
    p.add_argument("--temperature", type=float, help="= sample.temperature")
    p.add_argument("--top-k", type=int, help="= sample.top_k")
    p.add_argument("--top-p", type=float, help="= sample.top_p")
    p.add_argument("--steps", type=int, help="= sample.steps (parallel decoders)")
    p.add_argument("--seed", type=int, help="= sample.seed")
    p.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")
    p.add_argument("--eval", action="store_true", help="digits: log eval/class_acc to the model's run")
    p.add_argument("--edit", metavar="IMAGE", help="zero-shot editing: regenerate the masked region of IMAGE")
    p.add_argument("--mask", metavar="MASK.png", help="with --edit: white = regenerate, black = keep")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--tracking-uri", help="= tracking.uri")
    p.add_argument("--dry-run", action="store_true", help="print the resolved sampling config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (sample.*, workdir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from raygen.errors import UserError
    from raygen.platform import tracking
    from raygen.platform.evaluate.scoring import resolve_target
    from raygen.platform.evaluate.sampling import (
        check_samples_alone, edit_grid, family_of, is_digits, load_edit_inputs, load_export, sample_grid,
    )

    flags = {"sample.labels": args.labels, "sample.per_label": args.per_label, "sample.cfg_scale": args.cfg,
             "sample.temperature": args.temperature, "sample.top_k": args.top_k, "sample.top_p": args.top_p,
             "sample.steps": args.steps, "sample.seed": args.seed, "tracking.uri": args.tracking_uri}
    # The model's own sampling defaults, then a sweep's knobs for its alias, then whatever was given here.
    target = resolve_target(args.model, args.overrides, flags)
    cfg, uri, export_dir, run_id = target.cfg, target.uri, target.export_dir, target.run_id
    check_samples_alone(target.meta)
    family_of(target.meta).check_sample(cfg.sample)
    check_writable(args.out, "--out")
    if args.dry_run:
        print_dry_run(cfg, {"model": export_dir, "run": run_id, **alias_knobs_derived(target.knobs)})
        return 0
    print_alias_knobs(args.model, target.knobs)
    if bool(args.edit) != bool(args.mask):
        raise UserError("--edit IMAGE and --mask MASK.png go together")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, meta = load_export(export_dir, device)
    if args.edit:
        tokens, keep = load_edit_inputs(meta, args.edit, args.mask)
        s = edit_grid(model, meta, tokens, keep, cfg.sample, args.out, device)
        print(f"{len(s['labels'])} edits ({int((~keep).sum())} of {keep.numel()} tokens regenerated) -> {args.out}")
    else:
        s = sample_grid(model, meta, cfg.sample, args.out, device)
        print(f"{len(s['labels'])} samples -> {args.out}")
        for path in s["pictures"]:
            print(f"  beside them: {path}")
    if args.eval and is_digits(meta):
        from pathlib import Path

        from raygen.platform.evaluate.digits import class_accuracy, digit_labels, load_classifier

        clf, _ = load_classifier(Path(cfg.workdir) / "cache")
        acc = class_accuracy(clf, s["images"], digit_labels(s["labels"], meta["data"].get("class_names")))
        print(f"eval/class_acc {acc:.3f}")
        if run_id:
            tracking.log_metrics(uri, run_id, {"eval/class_acc": acc})
            print(f"logged to run {run_id}")
    elif args.eval:
        print("eval: class accuracy needs a digits model; see `raygen eval` for FID")
    return 0

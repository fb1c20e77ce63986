"""Arguments every config-driven job shares: --preset, --dry-run, key=value overrides."""

from __future__ import annotations

import argparse
import sys

from raygen.config import Config, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a preset name from raygen/configs/ (see `raygen config --presets`) or a YAML file")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. data.image_size=8")


def resolve(args: argparse.Namespace, **flags) -> Config:
    return load_config(args.preset, args.overrides, **flags)


def print_dry_run(cfg: Config, derived: dict | None = None) -> None:
    sys.stdout.write(cfg.to_yaml())
    if derived:
        sys.stdout.write("# derived\n" + "".join(f"#   {k}: {v}\n" for k, v in derived.items()))


def _knobs_text(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items())


def print_alias_knobs(model: str, knobs: dict) -> None:
    """Say which sweep-chosen knobs a models:/NAME@ALIAS brought (flags and overrides still win)."""
    if knobs:
        print(f"{model}: the sweep's knobs {_knobs_text(knobs)} (flags and key=value overrides take precedence)")


def alias_knobs_derived(knobs: dict) -> dict:
    """The same, as a `# derived` line of a dry run."""
    return {"sweep knobs": _knobs_text(knobs)} if knobs else {}


def check_writable(path: str, what: str, *, directory: bool = False) -> None:
    """Refuse, before any work, an output file (or with `directory`, an output directory) that
    cannot be written: where it would go cannot be made or written to, or a file is a directory.
    Writes nothing when it can."""
    import os
    import tempfile
    from pathlib import Path

    from raygen.errors import UserError

    out = Path(path).expanduser()
    if out.is_dir() and not directory:
        raise UserError(f"{what} '{path}' is a directory; give a file name")
    if out.exists() and directory and not out.is_dir():
        raise UserError(f"{what} '{path}' is a file; give a directory")
    parent = out if directory and out.is_dir() else out.parent
    existing = next((d for d in [parent, *parent.parents] if d.exists()), None)
    if existing is None or not existing.is_dir():
        raise UserError(f"{what} '{path}': '{existing}' is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK) or (out.is_file() and not os.access(out, os.W_OK)):
        raise UserError(f"{what} '{path}' cannot be written (no write permission in '{existing}')")
    try:  # permission bits can lie (root, read-only mounts, /proc): try it where the file would go
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".raygen-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be written: {e.strerror or e}") from None

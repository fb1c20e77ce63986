"""Sweep specs: the YAML behind `raygen sweep SPEC.yaml`, parsed and checked before anything runs.

    name: lr-schedule                    # default: the file's name
    base: demo                           # the trials' config preset (train sweeps)
    data: work/data/digits8              # optional; default: the base config's data (tokenized if missing)
    overrides: [train.steps=600]         # key=value on top of the base config
    space:
      train.lr: {loguniform: [5.0e-4, 5.0e-3]}
      train.schedule: {grid: [cosine, linear, constant]}
    metric: eval/class_acc
    mode: max                            # default: the metric's own direction
    num_samples: 2                       # samples of the random keys, per grid point
    scheduler: {name: asha, grace_period: 150, reduction_factor: 2}   # or asha, or none
    register: {name: digits, alias: best-lr}

A sample-time sweep (every key under sample.*, or `kind: sample`) names a registered model
instead of a base preset, and `n`, the samples each trial draws and scores.

This module knows the spec's shape and the config tree; it never touches Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from raygen.config import CONFIG_DIR, Config, find_yaml, load_config, suggest, yaml_problem
from raygen.errors import ConfigError, UserError

SWEEP_DIR = CONFIG_DIR / "sweeps"

SPEC_KEYS = {
    "name": "the sweep's name (MLflow parent run, Tune experiment); default: the file's name",
    "description": "free text, shown by --dry-run",
    "kind": "train (one training run per trial) or sample (sampling + eval of a registered model); "
            "default: sample when every space key is under sample.*",
    "base": "config preset (or YAML file) the trials start from (train sweeps)",
    "data": "tokenized data set directory (train sweeps); default: the base config's data, tokenized first if missing",
    "model": "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID (sample sweeps)",
    "n": "images each sample-time trial draws and scores (default: eval.n)",
    "overrides": "a list of key=value config overrides applied to every trial",
    "space": "the search space: {config.key: {choice|grid|uniform|loguniform: [...]}}",
    "metric": "what ranks the trials (train: train/loss, eval/class_acc; sample: eval/fd_digits, eval/class_acc, "
              "eval/fid, eval/sfid, eval/is)",
    "mode": "min or max; default: the metric's own direction",
    "num_samples": "samples of the random keys per grid point (trials = num_samples x grid points)",
    "scheduler": "asha (train sweeps' default), none, or {name: asha, max_t, grace_period, reduction_factor, metric, mode}",
    "max_concurrent_trials": "at most this many trials at once (default: what the cluster's free resources hold)",
    "max_failures": "Tune retries of a failed trial (a train trial resumes its run from its latest checkpoint)",
    "seed": "seed of the random search (default 0)",
    "register": "{name: NAME, alias: ALIAS}: register the best trial's model (sample sweeps: alias the swept version)",
}

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")
TRAIN_METRICS = {"train/loss": "min", "eval/class_acc": "max"}
SAMPLE_METRICS = {"eval/fd_digits": "min", "eval/class_acc": "max", "eval/fid": "min", "eval/sfid": "min",
                  "eval/is": "max"}
SCHEDULER_KEYS = ("name", "max_t", "grace_period", "reduction_factor", "metric", "mode")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Keys that size and place the trials (the sweep plans its resources from them) or say where
# results go: the same for every trial.
RUN_KEYS = ("workdir", "train.workers", "train.cpus_per_worker", "train.use_gpu", "data.shards", "eval.n")
RUN_PREFIXES = ("ray.", "tracking.")


@dataclass
class Dist:
    """One key's search distribution."""

    key: str
    kind: str  # choice | grid | uniform | loguniform
    values: list[Any]  # the candidates (choice, grid) or [low, high]
    integer: bool = False  # the key takes integers: uniform/loguniform draw integers

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.kind} {self.values}"
        return f"{self.kind}{'(int)' if self.integer else ''} [{self.values[0]:g}, {self.values[1]:g}]"

    def to_tune(self):
        from ray import tune

        lo, hi = self.values[0], self.values[-1]
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "uniform":
            return tune.randint(int(lo), int(hi) + 1) if self.integer else tune.uniform(lo, hi)
        return tune.lograndint(int(lo), int(hi) + 1) if self.integer else tune.loguniform(lo, hi)


@dataclass
class Scheduler:
    name: str  # asha | none
    max_t: int | None = None  # steps; default train.steps
    grace_period: int | None = None  # steps; default max(train.log_every, max_t // 4)
    reduction_factor: float = 2.0
    metric: str | None = None  # default: the sweep's metric if training reports it, else train/loss
    mode: str | None = None


@dataclass
class SweepSpec:
    name: str
    kind: str  # train | sample
    space: list[Dist]
    metric: str
    mode: str
    base: str | None = None
    data: str | None = None
    model: str | None = None
    n: int | None = None
    overrides: list[str] = field(default_factory=list)
    num_samples: int = 1
    scheduler: Scheduler = field(default_factory=lambda: Scheduler("none"))
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    seed: int = 0
    register: dict[str, str] | None = None
    description: str | None = None
    source: str = "<spec>"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def grid_points(self) -> int:
        return math.prod(len(d.values) for d in self.space if d.kind == "grid")

    @property
    def trials(self) -> int:
        return self.num_samples * self.grid_points

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def spec_names() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def spec_path(spec: str) -> Path:
    """A YAML file, or the name of a spec in raygen/configs/sweeps/."""
    return find_yaml(spec, SWEEP_DIR, "sweep spec", "give a YAML file or one of")


def load_spec(spec: str) -> SweepSpec:
    path = spec_path(spec)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"sweep spec '{path}' is not valid YAML{yaml_problem(e)}") from None
    return parse_spec(raw, source=str(path), default_name=path.stem)


def _bad(source: str, what: str) -> ConfigError:
    return ConfigError(f"sweep spec '{source}': {what}")


def _int(raw: dict, key: str, source: str, default: Any, lo: int) -> Any:
    v = raw.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(source, f"'{key}' must be an integer >= {lo}, got {v!r}")
    return v


def parse_spec(raw: Any, *, source: str = "<spec>", default_name: str = "sweep") -> SweepSpec:
    """Check the spec's own shape: keys, distributions, metric, scheduler, register. Config keys and
    values are checked against a base config by `check_space`."""
    if not isinstance(raw, dict):
        raise _bad(source, "must be a mapping of spec keys (space, metric, ...)")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise _bad(source, f"unknown key '{unknown[0]}'; valid keys: {', '.join(SPEC_KEYS)}"
                   + suggest(str(unknown[0]), list(SPEC_KEYS)))
    name = str(raw.get("name") or default_name)
    if not NAME_RE.match(name):
        raise _bad(source, f"bad name '{name}'; use letters, digits, '.', '_' and '-'")

    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise _bad(source, "'space' must map config keys to distributions, e.g. "
                           "space: {train.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    space = [_parse_dist(str(k), v, source) for k, v in space_raw.items()]
    for d in space:
        if d.key in RUN_KEYS or d.key.startswith(RUN_PREFIXES):
            raise _bad(source, f"'{d.key}' says how and where trials run, not what they try; set it in "
                               "'overrides' (the same for every trial)")

    keys = [d.key for d in space]
    all_sample = all(k.startswith("sample.") for k in keys)
    kind = raw.get("kind") or ("sample" if all_sample else "train")
    if kind not in ("train", "sample"):
        raise _bad(source, f"'kind' must be train or sample, got {kind!r}")
    if kind == "sample" and not all_sample:
        bad = next(k for k in keys if not k.startswith("sample."))
        raise _bad(source, f"a sample-time sweep searches sample.* keys only; '{bad}' needs training "
                           "(kind: train)")
    if kind == "sample":
        if not raw.get("model"):
            raise _bad(source, "a sample-time sweep (every key under sample.*) needs 'model: models:/NAME@ALIAS'; "
                               "set kind: train to train a model per trial instead")
        for key in ("base", "data"):
            if raw.get(key) is not None:
                raise _bad(source, f"'{key}' belongs to train sweeps; a sample sweep takes its config from 'model'")
    else:
        for key in ("model", "n"):
            if raw.get(key) is not None:
                raise _bad(source, f"'{key}' belongs to sample sweeps (kind: sample); a train sweep trains "
                                   "its own model per trial")
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model.startswith(("models:/", "runs:/"))):
        raise _bad(source, f"'model' must be models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID, got {model!r}")

    metrics = SAMPLE_METRICS if kind == "sample" else TRAIN_METRICS
    metric = raw.get("metric") or ("eval/fd_digits" if kind == "sample" else "train/loss")
    if metric not in metrics:
        raise _bad(source, f"metric '{metric}' is not one a {kind} trial reports; choose from {', '.join(metrics)}")
    mode = raw.get("mode") or metrics[metric]
    if mode not in ("min", "max"):
        raise _bad(source, f"'mode' must be min or max, got {mode!r}")

    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise _bad(source, "'overrides' must be a list of key=value strings, e.g. [train.steps=600]")
    overridden = {o.split("=", 1)[0].strip() for o in overrides} & set(keys)
    if overridden:
        raise _bad(source, f"'{sorted(overridden)[0]}' is both searched (space) and fixed (overrides)")

    scheduler = _parse_scheduler(raw.get("scheduler"), kind, metric, mode, source)
    register = raw.get("register")
    if register is not None:
        register = _parse_register(register, kind, source)
    base, data = raw.get("base"), raw.get("data")
    for key, value in (("base", base), ("data", data)):
        if value is not None and not isinstance(value, str):
            raise _bad(source, f"'{key}' must be a string, got {value!r}")
    desc = raw.get("description")
    return SweepSpec(
        name=name, kind=kind, space=space, metric=metric, mode=mode, base=base, data=data, model=model,
        n=_int(raw, "n", source, None, 2), overrides=list(overrides),
        num_samples=_int(raw, "num_samples", source, 1, 1), scheduler=scheduler,
        max_concurrent_trials=_int(raw, "max_concurrent_trials", source, None, 1),
        max_failures=_int(raw, "max_failures", source, 1, 0), seed=_int(raw, "seed", source, 0, 0),
        register=register, description=str(desc) if desc else None, source=source, raw=dict(raw),
    )


def _parse_dist(key: str, value: Any, source: str) -> Dist:
    example = "{grid: [1.5, 2.0, 3.0]}, {choice: [64, 128]}, {uniform: [0.5, 1.0]} or {loguniform: [1.0e-4, 1.0e-2]}"
    if not isinstance(value, dict) or len(value) != 1:
        raise _bad(source, f"space.{key} must be one distribution, e.g. {example}; got {value!r}")
    (kind, args), = value.items()
    if kind not in DISTRIBUTIONS:
        raise _bad(source, f"space.{key}: unknown distribution '{kind}'; use one of {', '.join(DISTRIBUTIONS)}"
                   + suggest(str(kind), list(DISTRIBUTIONS)))
    if not isinstance(args, list) or not args:
        raise _bad(source, f"space.{key}: {kind} takes a non-empty list, e.g. {example}")
    if kind in ("choice", "grid"):
        if any(isinstance(v, (dict, list)) for v in args):
            raise _bad(source, f"space.{key}: {kind} values must be scalars, got {args!r}")
        return Dist(key, kind, list(args))
    if len(args) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
        raise _bad(source, f"space.{key}: {kind} takes [low, high] numbers, got {args!r}")
    lo, hi = float(args[0]), float(args[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise _bad(source, f"space.{key}: {kind} needs low < high, got [{args[0]}, {args[1]}]")
    if kind == "loguniform" and lo <= 0:
        raise _bad(source, f"space.{key}: loguniform needs low > 0, got {args[0]}")
    return Dist(key, kind, [args[0], args[1]])


def _parse_scheduler(value: Any, kind: str, metric: str, mode: str, source: str) -> Scheduler:
    if value is None:
        value = "asha" if kind == "train" else "none"
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise _bad(source, f"'scheduler' must be asha, none or a mapping, got {value!r}")
    unknown = sorted(set(value) - set(SCHEDULER_KEYS))
    if unknown:
        raise _bad(source, f"unknown scheduler key '{unknown[0]}'; valid: {', '.join(SCHEDULER_KEYS)}")
    name = str(value.get("name", "asha")).lower()
    if name not in ("asha", "none"):
        raise _bad(source, f"scheduler '{name}' is not supported; use asha or none")
    if name == "none":
        if len(value) > 1:
            raise _bad(source, "scheduler none takes no other keys")
        return Scheduler("none")
    if kind == "sample":
        raise _bad(source, "a sample-time trial reports once, so ASHA has nothing to stop early; use scheduler: none")
    for key in ("max_t", "grace_period"):
        v = value.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _bad(source, f"scheduler.{key} is in training steps: an integer >= 1, got {v!r}")
    rf = value.get("reduction_factor", 2)
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 1:
        raise _bad(source, f"scheduler.reduction_factor must be a number > 1, got {rf!r}")
    s_metric = value.get("metric") or (metric if metric == "train/loss" else "train/loss")
    if s_metric != "train/loss":
        raise _bad(source, f"ASHA decides on what training reports while it runs (train/loss), not '{s_metric}'")
    s_mode = value.get("mode") or (mode if s_metric == metric else "min")
    if s_mode not in ("min", "max"):
        raise _bad(source, f"scheduler.mode must be min or max, got {s_mode!r}")
    return Scheduler("asha", value.get("max_t"), value.get("grace_period"), float(rf), s_metric, s_mode)


def _parse_register(value: Any, kind: str, source: str) -> dict[str, str]:
    from raygen.platform.tracking import _check_alias

    if not isinstance(value, dict) or set(value) - {"name", "alias"} or not value.get("alias"):
        raise _bad(source, "'register' must be {name: NAME, alias: ALIAS}" + (" (name defaults to the swept model's)"
                                                                              if kind == "sample" else ""))
    if kind == "train" and not value.get("name"):
        raise _bad(source, "register.name is required: the registered model the best trial becomes a version of")
    alias = str(value["alias"])
    try:
        _check_alias(alias)
    except UserError as e:
        raise _bad(source, f"register.alias: {e.message}") from None
    if kind == "sample" and alias.lower() == "latest":
        raise _bad(source, "register.alias 'latest' always means the newest version; a sample sweep aliases an "
                           "existing version, so choose another alias (e.g. best-fid)")
    return {"name": str(value["name"]) if value.get("name") else None, "alias": alias}


# --------------------------------------------------------------------------------------
# Checking the space against the config tree
# --------------------------------------------------------------------------------------


def leaf_type(key: str) -> Any:
    """The declared type of a config key; None inside free-form sections (sample.knobs.*,
    model.arch.*), where any value goes. An unknown key raises the loader's own error."""
    obj: Any = Config
    for part in key.split("."):
        if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
            return None
        hints = typing.get_type_hints(obj)
        if part not in hints:
            load_config(None, [], **{key: 0})  # raises, naming the valid keys at that level
        obj = hints[part]
    return obj


def _is_integer(tp: Any) -> bool:
    if tp is int:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args == [int]
    return False


def check_space(spec: SweepSpec, base: Config) -> None:
    """Every key must be a config key and every candidate (each grid/choice value, both bounds of
    a range) a value the config accepts, checked on top of `base`."""
    for d in spec.space:
        try:
            tp = leaf_type(d.key)
        except ConfigError as e:
            raise _bad(spec.source, f"space: {e.message}") from None
        if d.kind in ("uniform", "loguniform"):
            d.integer = _is_integer(tp)
            if d.integer and not all(float(v).is_integer() for v in d.values):
                raise _bad(spec.source, f"space.{d.key} takes integers: give {d.kind} integer bounds")
            if tp is not None and not d.integer and not _is_number(tp):
                raise _bad(spec.source, f"space.{d.key} is not a number; {d.kind} draws numbers (use choice or grid)")
        for v in d.values:
            try:
                load_config(None, [], base=base, **{d.key: v})
            except ConfigError as e:
                raise _bad(spec.source, f"space.{d.key} = {v!r}: {e.message}") from None


def _is_number(tp: Any) -> bool:
    if tp in (int, float):
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_is_number(a) for a in typing.get_args(tp) if a is not type(None))
    return False


def one_at_a_time(spec: SweepSpec) -> list[dict[str, Any]]:
    """The trial settings `plan`-level checks try: each candidate of each key, the others at their
    first candidate (not the full product, which can be large)."""
    first = {d.key: d.values[0] for d in spec.space}
    out = [dict(first)]
    for d in spec.space:
        for v in d.values[1:]:
            out.append({**first, d.key: v})
    return out


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """The base config with one trial's values set (checked by the loader like any override)."""
    return load_config(None, [], base=base, **values)

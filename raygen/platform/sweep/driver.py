"""Sweeps: Ray Tune over raygen's own training (train-time knobs) or sampling + eval (sample-time knobs).

    raygen sweep lr-schedule                  # a spec in raygen/configs/sweeps/, or a YAML file
    raygen sweep my-sweep.yaml --dry-run      # the resolved trials, resources and scheduler

Train-time trials (Train V2 style): Tune runs `_train_trial` once per trial, with a small CPU
reservation of its own; it calls `platform.train.train` with the trial's config, which builds
one `TorchTrainer` whose worker group asks Ray for its own resources. A `TuneReportCallback`
forwards every log step's metrics (the loop reports them, metrics only) to Tune, so ASHA can stop
a trial early; the trial reports its final metrics (after the export and the sample grid) itself.
Sample-time trials load the swept model once per trial and sample + score in the trial's own
process (the same batches and seeds as `raygen eval`).

Tune only reserves what each trial's driver asks for, not its workers, so the number of trials
at once comes from the cluster's free resources (leaving spare CPU for Ray Data and worker-group
start-up); worker groups may wait for resources (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S is
raised) and a failed trial is retried (`max_failures`), resuming its own run from its checkpoint.

MLflow: one parent run per sweep, one child run per trial (tag mlflow.parentRunId; params = the
trial's config). With a SQLite store a local `mlflow server` fronts it while trials run, and
every trial logs over HTTP. The driver writes the parent run before and after, logs the results
table, and registers the best trial's model under the spec's alias.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raygen.config import Config, load_config, parse_labels
from raygen.errors import ConfigError, UserError
from raygen.options import path_keys
from raygen.platform.sweep.spec import SweepSpec, check_space, one_at_a_time, trial_config

DRIVER_CPUS = 0.1  # a train trial's own process; the Train controller asks for none, its workers for theirs
WORKER_GROUP_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_GROUP_TIMEOUT_S = 900  # trials queue for resources freed asynchronously (Ray's default is 60 s)
SWEEP_TAG, TRIAL_TAG, OUTCOME_TAG = "raygen.sweep", "raygen.sweep.trial", "raygen.sweep.outcome"
DONE, DIVERGED = "raygen/done", "raygen/diverged"


# --------------------------------------------------------------------------------------
# Resources per trial
# --------------------------------------------------------------------------------------


@dataclass
class Resources:
    tune: dict[str, float]  # what Tune reserves for each trial (its own process)
    trial_cpus: float  # what one trial holds in all (train: driver + workers)
    concurrency: int
    spare_cpus: float = 0.0
    workers: int | None = None  # train: per trial
    cpus_per_worker: float | None = None
    use_gpu: bool = False
    threads: int = 1  # sample: torch threads per trial

    def describe(self) -> str:
        if self.workers is None:
            what = f"{self.tune.get('CPU', 0):g} CPU" + (f" + {self.tune['GPU']:g} GPU" if self.tune.get("GPU") else "")
            return f"{self.concurrency} at once; each trial {what} ({self.threads} sampling threads)"
        dev = f"{self.workers} x (1 GPU + {self.cpus_per_worker:g} CPU)" if self.use_gpu else \
            f"{self.workers} x {self.cpus_per_worker:g} CPU"
        return (f"{self.concurrency} at once; each trial {DRIVER_CPUS:g} CPU (driver) + workers {dev}; "
                f"{self.spare_cpus:g} CPU left spare for Ray Data and worker start-up")


def _floor2(x: float) -> float:
    return math.floor(100 * x + 1e-9) / 100


def plan_resources(kind: str, *, cpus: float, gpus: float, trials: int, cap: int | None = None,
                   workers: int | None = None, cpus_per_worker: float | None = None,
                   use_gpu: bool | None = None) -> Resources:
    """How many trials run at once on `cpus`/`gpus` free resources, and what each one holds."""
    cap = cap or trials
    if kind == "sample":
        gpu = gpus >= 1 and use_gpu is not False
        conc = max(1, min(trials, cap, int(gpus) if gpu else int(cpus) or 1))
        threads = max(1, int(cpus // conc)) if not gpu else 1
        tune = {"CPU": float(threads), **({"GPU": 1.0} if gpu else {})}
        return Resources(tune, float(threads), conc, use_gpu=gpu, threads=threads)
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    spare = _floor2(max(min(1.0, cpus / 2), 0.1 * cpus))
    budget = cpus - spare
    w = workers or 1
    if use_gpu:
        if gpus < w:
            raise ConfigError(f"a trial's {w} GPU workers do not fit the cluster's {gpus:g} free GPUs; lower train.workers")
        conc = max(1, min(int(gpus // w), trials, cap))
        cpw = cpus_per_worker or max(0.01, min(8.0, _floor2((budget - DRIVER_CPUS * conc) / (w * conc))))
    else:
        cpw = cpus_per_worker or (1.0 if DRIVER_CPUS + w <= budget else _floor2((budget - DRIVER_CPUS) / w))
        if cpw < 0.01:
            raise ConfigError(f"{w} workers per trial do not fit {cpus:g} free CPUs; lower train.workers")
        conc = max(1, min(int((budget + 1e-9) // (DRIVER_CPUS + w * cpw)), trials, cap))
    trial_cpus = round(DRIVER_CPUS + w * cpw, 4)
    if trial_cpus > cpus + 1e-9:
        raise ConfigError(f"one trial needs {trial_cpus:g} CPUs ({w} workers x {cpw:g} + {DRIVER_CPUS:g}) but the "
                          f"cluster has {cpus:g} free; lower train.workers or train.cpus_per_worker")
    return Resources({"CPU": DRIVER_CPUS}, trial_cpus, conc, spare, w, cpw, use_gpu)


# --------------------------------------------------------------------------------------
# Planning: everything checked before a trial starts
# --------------------------------------------------------------------------------------


@dataclass
class SweepPlan:
    spec: SweepSpec
    base: Config  # train: the trials' base config; sample: the model's sampling config + overrides
    uri: str  # the tracking store
    resources: Resources
    data_dir: str | None = None  # train
    tokenize_first: bool = False  # train: the base config's data set is not there yet
    data_keys: list[str] = field(default_factory=list)  # train: searched tokenizer.*/data.* keys
    data_dirs: dict[str, str] = field(default_factory=dict)  # train: data_key(values) -> that tokenization's set

    def data_dir_for(self, values: dict[str, Any]) -> str:
        """The data set a trial with these values trains on."""
        return self.data_dirs[data_key(values, self.data_keys)] if self.data_keys else self.data_dir
    target: Any = None  # sample: evaluate.EvalTarget of the swept model
    model: str | None = None  # sample: the swept model's reference (the spec's, or --model)
    asha: dict[str, Any] | None = None  # ASHAScheduler arguments
    notes: list[str] = field(default_factory=list)


DATA_PREFIXES = ("tokenizer.", "data.")  # keys that change the data set itself: one tokenization per value


def data_key(values: dict[str, Any], keys: list[str]) -> str:
    """The tokenization a trial's values select, as a stable string (its data set's name)."""
    return ",".join(f"{k.split('.', 1)[1]}={values[k]}" for k in keys)


def _data_sets(spec: SweepSpec, base: Config) -> tuple[list[str], dict[str, str]]:
    """Searched tokenizer.*/data.* keys and, for each combination of their values, the data set
    directory it is tokenized into (<base data dir>-sweep-<name>/<key=value,...>)."""
    import itertools

    from raygen.platform.data.tokenize import data_dir_of

    keys = [d.key for d in spec.space if d.key.startswith(DATA_PREFIXES)]
    if not keys:
        return [], {}
    if "data.shards" in keys:
        raise ConfigError("sweep space: data.shards names a data set; search how it is made (tokenizer.*) instead")
    ranged = [d.key for d in spec.space if d.key in keys and d.kind not in ("grid", "choice")]
    if ranged:
        raise ConfigError(f"sweep space: {ranged[0]} changes the data set, so each value is tokenized before the "
                          "trials start: give it a grid or a choice, not a range")
    root = Path(data_dir_of(base))
    dirs = {}
    for combo in itertools.product(*(d.values for d in spec.space if d.key in keys)):
        values = dict(zip(keys, combo))
        dirs[data_key(values, keys)] = str(root.parent / f"{root.name}-sweep-{spec.name}" / data_key(values, keys))
    return keys, dirs


def _absolute_paths(cfg: Config) -> Config:
    """Tune runs each trial in its own directory: every path a trial reads must be absolute."""
    values: dict[str, Any] = {"workdir": str(Path(cfg.workdir).resolve())}
    flat = cfg.flat()
    for key in path_keys(cfg):
        if flat.get(key) and ":/" not in str(flat[key]):  # not a models:/ or runs:/ reference
            values[key] = str(Path(flat[key]).expanduser().resolve())
    return load_config(None, [], base=cfg, **values)


def plan_sweep(spec: SweepSpec, overrides: list[str] | tuple[str, ...] = (), *, data: str | None = None,
               model: str | None = None, tracking_uri: str | None = None, cpus: float | None = None,
               gpus: float | None = None) -> SweepPlan:
    """Resolve and check the whole sweep: config keys and every candidate value, data set or model,
    metric availability, resources and the scheduler. `cpus`/`gpus`: the free resources (default:
    this machine's)."""
    import torch

    from raygen.platform import tracking

    if cpus is None:
        cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    gpus = gpus or 0.0
    searched = {o.split("=", 1)[0].strip() for o in overrides} & {d.key for d in spec.space}
    if searched:
        raise ConfigError(f"'{sorted(searched)[0]}' is searched by sweep {spec.name}; every trial sets its own value, "
                          "so drop the override (or edit the spec's space)")
    overrides = [*spec.overrides, *overrides]
    if spec.kind == "sample":
        return _plan_sample(spec, overrides, model or spec.model, tracking_uri, cpus, gpus)
    if model:
        raise UserError("--model goes with sample-time sweeps (kind: sample); a train sweep trains its own models")
    flags = {"data.shards": data or spec.data, "tracking.uri": tracking_uri}
    base = _absolute_paths(load_config(spec.base, overrides, **flags))
    check_space(spec, base)
    data_keys, data_dirs = _data_sets(spec, base)
    if data_keys and (data or spec.data or base.data.shards):
        raise UserError(f"sweep {spec.name} searches {data_keys[0]}, so every trial's data set is tokenized for "
                        "it; drop --data / data.shards")
    t = base.train
    res = plan_resources("train", cpus=cpus, gpus=gpus, trials=spec.trials, cap=spec.max_concurrent_trials,
                         workers=t.workers, cpus_per_worker=t.cpus_per_worker, use_gpu=t.use_gpu)
    base = load_config(None, [], base=base, **{"train.workers": res.workers, "train.cpus_per_worker": res.cpus_per_worker,
                                               "train.use_gpu": res.use_gpu})
    from raygen.platform.data.tokenize import data_dir_of

    data_dir = str(Path(data_dir_of(base)).resolve())
    plan = SweepPlan(spec, base, tracking.tracking_uri(base.workdir, base.tracking.uri), res, data_dir,
                     data_keys=data_keys, data_dirs=data_dirs)
    from raygen.platform.data import shards

    if data_keys:
        plan.data_dir = next(iter(data_dirs.values()))
        missing = [d for d in data_dirs.values() if not (Path(d) / shards.MANIFEST).is_file()]
        plan.tokenize_first = bool(missing)
        plan.notes.append(f"{len(data_dirs)} data sets, one per value of {', '.join(data_keys)}, under "
                          f"{Path(plan.data_dir).parent}" + (f" ({len(missing)} tokenized first)" if missing else ""))
        if not missing:
            check_train_trials(plan)
    elif not (Path(data_dir) / shards.MANIFEST).is_file():
        if data or spec.data or base.data.shards:
            raise UserError(f"no data set at '{data_dir}' (no {shards.MANIFEST}); run `raygen tokenize` first")
        plan.tokenize_first = True
        plan.notes.append(f"the base config's data set is tokenized first into {data_dir}")
    else:
        check_train_trials(plan)
    plan.asha = _asha_args(spec, plan)
    return plan


def check_train_trials(plan: SweepPlan) -> None:
    """Plan each candidate's training run (model vs data, batch vs rows, what the family prepares,
    e.g. lookups made and cached here once per cluster count) and check the metric is one these
    runs report."""
    from raygen.platform.train.driver import plan_training

    spec, res = plan.spec, plan.resources
    cpus = max(res.trial_cpus, (res.workers or 1) * (res.cpus_per_worker or 1))
    for values in one_at_a_time(spec):
        cfg = trial_config(plan.base, values)
        try:
            p = plan_training(cfg, cluster_cpus=cpus, cluster_gpus=float(res.workers or 0) if res.use_gpu else 0.0,
                              data_dir=plan.data_dir_for(values))
        except UserError as e:
            where = ", ".join(f"{k}={v}" for k, v in values.items())
            raise type(e)(f"trial with {where}: {e.message}") from None
        if spec.metric.startswith("eval/"):
            if p.manifest["source"]["name"] != "digits":
                raise ConfigError(f"metric {spec.metric} is measured on digits models; '{plan.data_dir}' holds "
                                  f"{p.manifest['source']['name']} images; use metric: train/loss")
            if not p.plugin.can_sample({"model_config": p.model_config}):
                raise ConfigError(f"metric {spec.metric}: a {cfg.model.family} {cfg.model.size} model samples only as "
                                  "part of a registered pair; use metric: train/loss")


def _asha_args(spec: SweepSpec, plan: SweepPlan) -> dict[str, Any] | None:
    s = spec.scheduler
    if s.name != "asha":
        return None
    steps = [trial_config(plan.base, v).train for v in one_at_a_time(spec)]
    longest = max(t.steps for t in steps)
    max_t = s.max_t or longest
    if max_t < longest:
        raise ConfigError(f"scheduler.max_t={max_t} is below train.steps={longest}: ASHA would stop every trial there, "
                          "before it exports a model; leave max_t out (it is train.steps) or lower train.steps")
    grace = s.grace_period or max(min(t.log_every for t in steps), max_t // 4)
    if grace >= max_t:
        raise ConfigError(f"scheduler.grace_period={grace} must be below max_t={max_t} (steps)")
    if grace < min(t.log_every for t in steps):
        plan.notes.append(f"ASHA's first rung ({grace} steps) comes before the first log step "
                          f"(train.log_every={min(t.log_every for t in steps)}); it decides there")
    return {"time_attr": "step", "metric": s.metric, "mode": s.mode, "max_t": max_t, "grace_period": grace,
            "reduction_factor": s.reduction_factor}


def _plan_sample(spec: SweepSpec, overrides: list[str], model: str, tracking_uri: str | None,
                 cpus: float, gpus: float) -> SweepPlan:
    from raygen.platform.evaluate import scoring as evaluate
    from raygen.platform.evaluate import metrics as M
    from raygen.platform.evaluate.sampling import check_knobs, is_digits

    target = evaluate.resolve_target(model, overrides, {"tracking.uri": tracking_uri, "eval.n": spec.n})
    target.cfg = _absolute_paths(target.cfg)
    check_space(spec, target.cfg)
    meta = target.meta
    for values in one_at_a_time(spec):
        cfg = trial_config(target.cfg, values)
        try:
            parse_labels(cfg.sample.labels, meta["data"]["num_classes"])
            check_knobs(meta, cfg.sample.knobs)
        except UserError as e:
            where = ", ".join(f"{k}={v}" for k, v in values.items())
            raise type(e)(f"trial with {where}: {e.message}") from None
    e = target.cfg.eval
    have = set()
    if is_digits(meta):
        have |= {"eval/class_acc", "eval/fd_digits"}
    weights = M.inception_weights_path(e.inception_weights)[0]
    if weights is not None:
        have.add("eval/is")
        ref = M.Reference.load(e.reference) if e.reference else None
        if ref is not None and M.INCEPTION in ref.stats:
            have.add("eval/fid")
            if "mu_s" in ref.stats[M.INCEPTION]:
                have.add("eval/sfid")
    if spec.metric not in have:
        why = {"eval/fid": "needs Inception weights (eval.inception_weights) and eval.reference with Inception statistics",
               "eval/sfid": "needs Inception weights and eval.reference with spatial Inception statistics",
               "eval/is": "needs Inception weights (eval.inception_weights or RAYGEN_INCEPTION_WEIGHTS)"}.get(
            spec.metric, f"needs a digits model (this one was trained on {meta['data'].get('source')})")
        raise ConfigError(f"metric {spec.metric} {why}; available here: {', '.join(sorted(have)) or 'none'}")
    if e.n < len(parse_labels(target.cfg.sample.labels, meta["data"]["num_classes"])):
        raise ConfigError(f"n={e.n} samples per trial is below the number of classes")
    res = plan_resources("sample", cpus=cpus, gpus=gpus, trials=spec.trials, cap=spec.max_concurrent_trials)
    plan = SweepPlan(spec, target.cfg, target.uri, res, target=target, model=model)
    if spec.register and not model.startswith("models:/"):
        if target.run_id is None:
            raise ConfigError(f"'{model}' is a directory with no MLflow run to register; sweep models:/NAME@ALIAS or "
                              "runs:/RUN_ID, or leave 'register' out")
        if spec.register["name"] is None:
            raise ConfigError("register.name is required when the swept model is not a registered one (models:/...)")
    return plan


def describe(plan: SweepPlan) -> str:
    """What --dry-run prints."""
    from raygen.platform import tracking

    spec = plan.spec
    lines = [f"sweep {spec.name} ({spec.kind}-time) from {spec.source}"]
    if spec.description:
        lines.append(f"  {spec.description}")
    if spec.kind == "sample":
        what = f"model {plan.model} (run {plan.target.run_id}), {plan.base.eval.n} samples per trial"
    else:
        what = f"base {spec.base or '(defaults)'}, data {plan.data_dir}, {plan.base.train.steps} steps per trial"
    lines.append(f"  {what}")
    lines.append("  space:")
    for d in spec.space:
        lines.append(f"    {d.key}: {d.describe()}")
    lines.append(f"  trials: {spec.trials} ({spec.num_samples} sample(s) x {spec.grid_points} grid point(s))")
    lines.append(f"  metric: {spec.metric} ({spec.mode})")
    if plan.asha:
        a = plan.asha
        lines.append(f"  scheduler: ASHA on {a['metric']} ({a['mode']}) every reported step; grace {a['grace_period']} "
                     f"steps, max_t {a['max_t']}, reduction factor {a['reduction_factor']:g}")
    else:
        lines.append("  scheduler: none (every trial runs to the end)")
    lines.append(f"  resources: {plan.resources.describe()}")
    server = " (a local mlflow server fronts it while trials run)" if tracking.needs_local_server(plan.uri) else ""
    lines.append(f"  tracking: {plan.uri}{server}; parent run + one child run per trial")
    if spec.register:
        name = spec.register["name"] or (plan.model or "").split("models:/")[-1].split("@")[0].split("/")[0]
        lines.append(f"  register: best trial -> models:/{name}@{spec.register['alias']}")
    for note in plan.notes:
        lines.append(f"  note: {note}")
    lines.append("# base config of every trial" if spec.kind == "train" else "# sampling config of every trial")
    body = plan.base.to_yaml() if spec.kind == "train" else json.dumps(dataclasses.asdict(plan.base.sample)) + "\n"
    return "\n".join(lines) + "\n" + body


# --------------------------------------------------------------------------------------
# Trials (they run in Tune's trial actors)
# --------------------------------------------------------------------------------------


def _trial_values(config: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    return {k: config[k] for k in keys}


def _run_name(ctx: dict[str, Any], trial_id: str) -> str:
    return f"{ctx['name']}-{trial_id.rsplit('_', 1)[-1]}"


def _existing_child(ctx: dict[str, Any], trial_id: str) -> str | None:
    """A retried trial finds the run its first attempt opened (to resume it, not start another)."""
    from raygen.platform import tracking

    for run in tracking.child_runs(ctx["uri"], ctx["experiment"], ctx["parent"]):
        if run.data.tags.get(TRIAL_TAG) == trial_id:
            return run.info.run_id
    return None


def _tokenizations(plan: SweepPlan) -> list[tuple[Config, str]]:
    """(config, note) of each data set the sweep tokenizes before its trials (one per searched value)."""
    if not plan.data_keys:
        return [(plan.base, "")]
    out = []
    for values in _data_combos(plan):
        cfg = trial_config(plan.base, {**values, "data.shards": plan.data_dir_for(values)})
        out.append((cfg, f" ({', '.join(f'{k}={v}' for k, v in values.items())})"))
    return out


def _data_combos(plan: SweepPlan) -> list[dict[str, Any]]:
    import itertools

    dims = [d for d in plan.spec.space if d.key in plan.data_keys]
    return [dict(zip(plan.data_keys, combo)) for combo in itertools.product(*(d.values for d in dims))]


def _report_callback(final_step: int):
    """Tune's TuneReportCallback, minus the last training report: the trial reports the end itself,
    after the export and the sample grid, so no scheduler can stop it in between."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReport(TuneReportCallback):
        def __init__(self, final: int):
            super().__init__()
            self.final = final

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("step", 0) >= self.final:
                return
            super().after_report(run_context, metrics, checkpoint)

    return TrialReport(final_step)


def _train_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    import ray
    import torch
    from ray import tune

    from raygen.platform.train.driver import TrainingAborted, train

    os.environ["MLFLOW_TRACKING_URI"] = ctx["uri"]  # this trial's process: every log goes over HTTP
    os.environ.setdefault(WORKER_GROUP_TIMEOUT_ENV, str(WORKER_GROUP_TIMEOUT_S))  # Train propagates it
    torch.set_num_threads(1)
    ray.data.DataContext.get_current().enable_progress_bars = False  # trials share one console
    trial_id = tune.get_context().get_trial_id()
    values = _trial_values(config, ctx["keys"])
    cfg = trial_config(Config.from_dict(ctx["base"]), {**values, "tracking.run_name": _run_name(ctx, trial_id)})
    try:
        data_dir = ctx["data_dirs"][data_key(values, ctx["data_keys"])] if ctx.get("data_keys") else ctx["data_dir"]
        r = train(cfg, data_dir=data_dir, resume_run=_existing_child(ctx, trial_id), parent_run_id=ctx["parent"],
                  run_tags={SWEEP_TAG: ctx["name"], TRIAL_TAG: trial_id},
                  callbacks=[_report_callback(cfg.train.steps)])
    except TrainingAborted:  # a diverged trial is a result, not a failure to retry
        tune.report({DIVERGED: 1.0})
        return
    metrics = {k: float(v) for k, v in r.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report({**metrics, "step": r.steps, DONE: 1.0, "raygen/seconds": r.seconds})


def _sample_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from ray import tune

    from raygen.platform import tracking
    from raygen.platform.evaluate.scoring import SamplerWorker, balanced_labels, batch_seed, score_features

    t0 = time.time()
    os.environ["MLFLOW_TRACKING_URI"] = ctx["uri"]
    torch.set_num_threads(ctx["threads"])
    trial_id = tune.get_context().get_trial_id()
    values = _trial_values(config, ctx["keys"])
    cfg = trial_config(Config.from_dict(ctx["base"]), values)
    uri = ctx["uri"]
    run_id = _existing_child(ctx, trial_id)
    if run_id is None:
        params = {**_sample_params(cfg), "model": ctx["model"], "model.run_id": ctx["model_run"] or "-"}
        run_id = tracking.create_run(uri, ctx["experiment"], _run_name(ctx, trial_id), params,
                                     {SWEEP_TAG: ctx["name"], TRIAL_TAG: trial_id, tracking.PARENT_TAG: ctx["parent"],
                                      "raygen.model": ctx["model"]})
    payload = {"export": ctx["export"], "sample": dataclasses.asdict(cfg.sample), "digits": ctx["digits"],
               "inception": ctx["inception"]}
    worker = SamplerWorker(payload, ctx["threads"], ctx["use_gpu"])
    classes = parse_labels(cfg.sample.labels, ctx["num_classes"])
    labels = balanced_labels(classes, cfg.eval.n)
    bs = cfg.eval.batch_size
    keep = min(cfg.eval.n, bs, 8 * len(classes)) // len(classes) * len(classes)  # whole rows for the grid
    t_sample = time.perf_counter()
    got = [worker.run({"index": i, "labels": labels[s : s + bs], "seed": batch_seed(cfg.sample.seed, i),
                       "keep_images": keep if i == 0 else 0}) for i, s in enumerate(range(0, len(labels), bs))]
    seconds = time.perf_counter() - t_sample
    feats = {k: np.concatenate([g[k] for g in got]) for k in got[0] if isinstance(got[0][k], np.ndarray) and k != "images"}
    names = json.loads(ctx["export"]["config.json"])["data"].get("class_names")
    metrics = score_features(feats, ctx["digits_ref"], ctx["fid_ref"], ctx["is_splits"], pr_k=0,  # as `raygen eval`
                             class_names=names)
    metrics["perf/eval_images_per_s"] = cfg.eval.n / seconds
    tracking.log_metrics(uri, run_id, metrics, 0)
    images = got[0].get("images")
    if images is not None and len(images):
        import tempfile

        from raygen.platform.evaluate.sampling import grid_image

        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "samples.png"
            order = np.argsort(feats["labels"][: len(images)], kind="stable")
            grid_image(torch.from_numpy(images[order]), rows=min(len(classes), len(images))).save(png)
            tracking.log_artifact(uri, run_id, png, "samples")
    tracking.set_terminated(uri, run_id, "FINISHED")
    tune.report({**metrics, DONE: 1.0, "raygen/seconds": time.time() - t0})


def _sample_params(cfg: Config) -> dict[str, Any]:
    """A sample trial's config: its sampling settings and how much it evaluates."""
    out = {k: v for k, v in cfg.flat().items() if k.startswith("sample.")}
    out.update({"eval.n": cfg.eval.n, "eval.batch_size": cfg.eval.batch_size})
    return out


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    status: str  # finished | stopped (by ASHA) | diverged | error | interrupted (Ctrl+C)
    metrics: dict[str, float]
    step: int | None
    seconds: float | None
    run_id: str | None = None
    error: str | None = None


@dataclass
class SweepResult:
    parent_run_id: str
    uri: str
    rows: list[TrialRow]
    best: TrialRow | None
    registered: tuple[str, int, str] | None  # (name, version, alias)
    table: str
    seconds: float
    tune_path: str
    interrupted: bool = False  # Ctrl+C: the table holds what ran; nothing is registered


def run_sweep(plan: SweepPlan, *, out: Callable[[str], None] = print) -> SweepResult:
    """Run the planned sweep to the end; returns the parent run, the table and the best trial."""
    import ray

    from raygen.platform import tracking
    from raygen.platform.cluster.connect import init_ray

    spec, t0 = plan.spec, time.time()
    os.environ.setdefault(WORKER_GROUP_TIMEOUT_ENV, str(WORKER_GROUP_TIMEOUT_S))  # a local Ray's workers inherit it
    init_ray(plan.base.ray)
    ctx: dict[str, Any] = {"name": spec.name, "keys": [d.key for d in spec.space]}
    if spec.kind == "train":
        if plan.tokenize_first:
            from raygen.platform.data.tokenize import tokenize

            for cfg, where in _tokenizations(plan):
                data = tokenize(cfg, progress=False)
                out(f"sweep: data {data.manifest['rows']} rows -> {data.out}{where}")
            check_train_trials(plan)
        ctx.update(base=plan.base.to_dict(), data_dir=plan.data_dir, data_keys=plan.data_keys, data_dirs=plan.data_dirs)
    uri = plan.uri
    if tracking.needs_local_server(uri) and sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
        raise UserError(f"the tracking store {uri} is a SQLite file, and the MLflow server raygen would start in front "
                        "of it listens on 127.0.0.1, which trials on other nodes cannot reach; on a multi-node cluster "
                        "set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow server every node can reach")
    exp = tracking.ensure_experiment(uri, plan.base.tracking.experiment, plan.base.workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = tracking.create_run(uri, exp, f"sweep-{spec.name}-{stamp}", _parent_params(plan),
                                 {SWEEP_TAG: spec.name, "raygen.sweep.kind": spec.kind})
    tracking.log_text(uri, parent, spec.to_yaml(), "sweep/spec.yaml")
    tracking.log_text(uri, parent, plan.base.to_yaml(), "sweep/base_config.yaml")
    server = tracking.LocalServer(uri, plan.base.workdir, Path(plan.base.workdir).resolve() / "logs") \
        if tracking.needs_local_server(uri) else None
    status = "FAILED"
    try:
        if spec.kind == "sample":
            ctx.update(base=plan.base.to_dict(), **_sample_context(plan))
        elif _is_digits_data(plan.data_dir):
            from raygen.platform.evaluate.digits import load_classifier

            load_classifier(Path(plan.base.workdir) / "cache")  # trained once here, not by trials at once
        trial_uri = server.wait() if server else uri
        if server:
            out(f"sweep: MLflow server {trial_uri} in front of {uri}, up in {time.time() - server.started:.0f} s "
                f"(log {server.log_path})")
        ctx.update(uri=trial_uri, experiment=exp, parent=parent)
        out(f"sweep {spec.name}: {spec.trials} trials, {plan.resources.describe()}; parent run {parent}")
        grid, ended = _tune(plan, ctx, out)
    except BaseException:
        if server:
            server.stop()
        tracking.set_terminated(uri, parent, "KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    if server:
        server.stop()
    rows = _rows(grid, spec, ended)
    interrupted = len(rows) < spec.trials or any(r.status == "interrupted" for r in rows)
    _finish_child_runs(uri, exp, parent, rows)
    best = _best(rows, spec)
    table = format_table(rows, spec, best)
    if interrupted:
        table += f"interrupted: {sum(r.status != 'interrupted' for r in rows)} of {spec.trials} trials ran to their end\n"
    tracking.log_text(uri, parent, table, "sweep/results.txt")
    tracking.log_text(uri, parent, json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str),
                      "sweep/results.json")
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "stopped", "diverged", "error", "interrupted")}
    summary = {f"sweep/trials_{k}": float(v) for k, v in counts.items()}
    summary["sweep/seconds"] = time.time() - t0
    registered = None
    if best is not None:
        summary[f"best/{spec.metric}"] = best.metrics[spec.metric]
        tracking.set_tags(uri, parent, {"raygen.sweep.best_trial": best.trial_id, "raygen.sweep.best_run": best.run_id,
                                        **{f"raygen.sweep.best.{k}": v for k, v in best.values.items()}})
        tracking.log_text(uri, parent, json.dumps(best.values, indent=1), "sweep/best_config.json")
        if spec.register and not interrupted:  # an alias names the best of the whole sweep, not of a part
            registered = _register(plan, best)
        status = "FINISHED"
    tracking.log_metrics(uri, parent, summary, 0)
    tracking.set_terminated(uri, parent, "KILLED" if interrupted else status)
    result = SweepResult(parent, uri, rows, best, registered, table, time.time() - t0, str(grid.experiment_path),
                         interrupted)
    if best is None and not interrupted:
        errors = [r.error for r in rows if r.error]
        raise UserError(f"sweep {spec.name}: no trial finished ({counts['error']} failed"
                        + (f"; first error: {errors[0]}" if errors else "") + f"); parent run {parent}, "
                        f"Tune logs in {result.tune_path}")
    return result


def _is_digits_data(data_dir: str) -> bool:
    from raygen.platform.data import shards

    return shards.read_manifest(data_dir)["source"]["name"] == "digits"


def _parent_params(plan: SweepPlan) -> dict[str, Any]:
    spec = plan.spec
    params: dict[str, Any] = {"sweep.name": spec.name, "sweep.kind": spec.kind, "sweep.metric": spec.metric,
                              "sweep.mode": spec.mode, "sweep.num_samples": spec.num_samples,
                              "sweep.trials": spec.trials, "sweep.concurrency": plan.resources.concurrency,
                              "sweep.scheduler": json.dumps(plan.asha) if plan.asha else "none",
                              **{f"sweep.space.{d.key}": d.describe() for d in spec.space}}
    if spec.kind == "sample":
        params.update({"sweep.model": plan.model, "eval.n": plan.base.eval.n})
    else:
        params.update({"sweep.base": spec.base or "-", "sweep.data": plan.data_dir})
    if spec.register:
        params["sweep.register"] = f"{spec.register['name'] or '-'}@{spec.register['alias']}"
    return params


def _sample_context(plan: SweepPlan) -> dict[str, Any]:
    """What every sample trial needs, computed once: the export's files, the extractors, the references."""
    from raygen.platform.evaluate import scoring as evaluate
    from raygen.platform.evaluate import metrics as M
    from raygen.platform.evaluate.digits import classifier_fingerprint, load_classifier
    from raygen.platform.evaluate.sampling import is_digits

    target, cfg, e = plan.target, plan.base, plan.base.eval
    ctx: dict[str, Any] = {"threads": plan.resources.threads, "use_gpu": plan.resources.use_gpu,
                           "model": plan.model, "model_run": target.run_id,
                           "num_classes": target.meta["data"]["num_classes"], "is_splits": e.is_splits,
                           "export": {str(f.relative_to(target.export_dir)): f.read_bytes()
                                      for f in sorted(target.export_dir.rglob("*")) if f.is_file()},
                           "digits": None, "inception": None, "digits_ref": None, "fid_ref": None}
    reference = M.Reference.load(e.reference) if e.reference else None
    if is_digits(target.meta):
        clf, _ = load_classifier(Path(cfg.workdir) / "cache")
        digits = (clf.state_dict(), classifier_fingerprint(clf))
        ref = reference if reference is not None and M.DIGITS in reference.stats else \
            evaluate.implicit_digits_reference(cfg, target, digits)
        s = ref.get(M.DIGITS, digits[1])
        ctx.update(digits=digits[0], digits_ref={"mu": s["mu"], "sigma": s["sigma"]})
    if plan.spec.metric in ("eval/is", "eval/fid", "eval/sfid"):
        weights = M.load_inception_weights(e.inception_weights, needed_by=f"metric {plan.spec.metric}")
        ctx["inception"] = weights.state
        if reference is not None and M.INCEPTION in reference.stats:
            s = reference.get(M.INCEPTION, weights.fingerprint)
            ctx["fid_ref"] = {k: s[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in s}
    return ctx


def _tune(plan: SweepPlan, ctx: dict[str, Any], out: Callable[[str], None]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec, res = plan.spec, plan.resources
    progress = _progress(spec, out)
    fn = _train_trial if spec.kind == "train" else _sample_trial
    trainable = tune.with_resources(tune.with_parameters(fn, ctx=ctx), res.tune)
    scheduler = ASHAScheduler(**plan.asha) if plan.asha else FIFOScheduler()
    storage = Path(plan.base.workdir).resolve() / "sweeps"
    tuner = tune.Tuner(
        trainable,
        param_space={d.key: d.to_tune() for d in spec.space},
        tune_config=tune.TuneConfig(num_samples=spec.num_samples, scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=spec.seed,
                                                                     max_concurrent=res.concurrency)),
        run_config=tune.RunConfig(name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures), verbose=0,
                                  callbacks=[progress]),
    )
    return tuner.fit(), progress.ended


def _progress(spec: SweepSpec, out: Callable[[str], None]):
    """One line per trial event on the driver's console (Tune's own tables are off), and the ids of
    the trials that ended (finished, stopped by the scheduler or failed): on Ctrl+C Tune returns
    the rest as they were, and only this tells them from trials ASHA stopped."""
    from ray.tune import Callback

    def values(trial) -> str:
        return ", ".join(f"{k}={_fmt(trial.config.get(k))}" for k in (d.key for d in spec.space))

    class Progress(Callback):
        def __init__(self):
            super().__init__()
            self.ended: set[str] = set()
            self.t0 = self.last_table = time.monotonic()

        def on_trial_start(self, iteration, trials, trial, **info):
            out(f"sweep: trial {trial.trial_id} started ({values(trial)})")

        def on_step_end(self, iteration, trials, **info):  # Tune's loop, many times a second
            now = time.monotonic()
            if now - self.last_table >= TABLE_EVERY_S and any(t.status == "RUNNING" for t in trials):
                self.last_table = now
                out(trial_table(spec, trials, now - self.t0))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended.add(trial.trial_id)
            r = trial.last_result or {}
            if r.get(DONE):
                what = f"finished: {spec.metric} {_fmt(r.get(spec.metric))}"
            elif r.get(DIVERGED):
                what = "diverged (non-finite loss)"
            else:
                what = f"stopped early at step {r.get('step')} (train/loss {_fmt(r.get('train/loss'))})"
            out(f"sweep: trial {trial.trial_id} {what}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended.add(trial.trial_id)
            out(f"sweep: trial {trial.trial_id} failed ({values(trial)}); see {trial.path}")

    return Progress()


TABLE_EVERY_S = 60.0  # how often a sweep prints the table of its trials while some run


def trial_table(spec: SweepSpec, trials, elapsed: float) -> str:
    """The trials as a small table: id, state, step, train/loss, the sweep's metric and the values."""
    rows = [("trial", "state", "step", "train/loss", spec.metric, "values")]
    for t in trials:
        r = t.last_result or {}
        state = {"TERMINATED": "done", "ERROR": "failed"}.get(t.status, t.status.lower())
        rows.append((t.trial_id, state, _fmt(r.get("step")), _fmt(r.get("train/loss")), _fmt(r.get(spec.metric)),
                     ", ".join(f"{k}={_fmt(t.config.get(k))}" for k in (d.key for d in spec.space))))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
    minutes, seconds = divmod(int(elapsed), 60)
    return f"sweep: {sum(t.status == 'RUNNING' for t in trials)} running after {minutes}:{seconds:02d}\n" + \
        "\n".join(ln.rstrip() for ln in lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _rows(grid, spec: SweepSpec, ended: set[str]) -> list[TrialRow]:
    import re

    keys = [d.key for d in spec.space]
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        df = res.metrics_dataframe
        trial_id = m.get("trial_id")
        if not trial_id:
            found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(res.path).name)
            trial_id = found.group(1) if found else Path(res.path).name
        final = m
        if df is not None and DONE in df.columns and (df[DONE] == 1).any():
            final = {k: v for k, v in df[df[DONE] == 1].iloc[-1].to_dict().items() if v == v}  # drop NaN
            status = "finished"
        elif res.error is not None:
            status = "error"
        elif m.get(DIVERGED):
            status = "diverged"
        elif trial_id in ended:
            status = "stopped"
        else:
            status = "interrupted"
        steps = [int(s) for s in df["step"].dropna()] if df is not None and "step" in df.columns else []
        metrics = {k: float(v) for k, v in final.items()
                   if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("raygen/")}
        err = None
        if res.error is not None:
            lines = [ln for ln in str(res.error).strip().splitlines() if ln.strip()]
            err = (lines[-1] if lines else type(res.error).__name__)[:300]
        rows.append(TrialRow(trial_id, {k: res.config.get(k) for k in keys}, status, metrics,
                             max(steps) if steps else None, m.get("time_total_s"), error=err))
    return sorted(rows, key=lambda r: r.trial_id)


def _finish_child_runs(uri: str, exp: str, parent: str, rows: list[TrialRow]) -> None:
    """Tie each row to its child run; runs that Tune stopped or that failed are closed as such."""
    from raygen.platform import tracking

    by_trial = {r.data.tags.get(TRIAL_TAG): r for r in tracking.child_runs(uri, exp, parent)}
    for row in rows:
        run = by_trial.get(row.trial_id)
        if run is None:
            continue
        row.run_id = run.info.run_id
        outcome = row.status if row.status != "stopped" else f"stopped early at step {row.step} (ASHA)"
        tracking.set_tags(uri, row.run_id, {OUTCOME_TAG: outcome})
        if run.info.status == "RUNNING":
            tracking.set_terminated(uri, row.run_id, "KILLED" if row.status in ("stopped", "interrupted") else "FAILED")


def _best(rows: list[TrialRow], spec: SweepSpec) -> TrialRow | None:
    done = [r for r in rows if r.status == "finished" and spec.metric in r.metrics
            and math.isfinite(r.metrics[spec.metric])]
    if not done:
        return None
    sign = 1 if spec.mode == "min" else -1
    return min(done, key=lambda r: sign * r.metrics[spec.metric])


def format_table(rows: list[TrialRow], spec: SweepSpec, best: TrialRow | None) -> str:
    """The results, best first: one row per trial with its values, outcome and metrics."""
    keys = [d.key for d in spec.space]
    extra = [m for m in (["train/loss", "eval/class_acc"] if spec.kind == "train" else
                         ["eval/class_acc", "eval/fd_digits", "eval/fid", "eval/sfid", "eval/is"])
             if m != spec.metric and any(m in r.metrics for r in rows)]
    head = ["trial", "status", *keys, spec.metric, *extra] + (["steps"] if spec.kind == "train" else []) + ["time", "run"]
    sign = 1 if spec.mode == "min" else -1

    def order(r: TrialRow):
        v = r.metrics.get(spec.metric)
        return (r.status != "finished", sign * v if v is not None and math.isfinite(v) else math.inf, r.trial_id)

    body = []
    for r in sorted(rows, key=order):
        status = {"stopped": f"stopped@{r.step}"}.get(r.status, r.status)
        cells = [r.trial_id.rsplit("_", 1)[-1] + (" *" if r is best else ""), status,
                 *(_fmt(r.values.get(k)) for k in keys), _fmt(r.metrics.get(spec.metric)),
                 *(_fmt(r.metrics.get(m)) for m in extra)]
        if spec.kind == "train":
            cells.append(_fmt(r.step))
        cells += [f"{r.seconds:.0f}s" if r.seconds is not None else "-", r.run_id or "-"]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines) + "\n"
    if best is not None:
        text += f"* best: {spec.metric} {_fmt(best.metrics[spec.metric])} ({spec.mode}) with " + \
                ", ".join(f"{k}={_fmt(v)}" for k, v in best.values.items()) + "\n"
    errors = [r for r in rows if r.error]
    for r in errors:
        text += f"trial {r.trial_id} failed: {r.error}\n"
    return text


def _register(plan: SweepPlan, best: TrialRow) -> tuple[str, int, str]:
    from raygen.platform import tracking

    spec, uri = plan.spec, plan.uri
    alias = spec.register["alias"]
    tags = {"raygen.sweep": spec.name, f"raygen.sweep.{alias}.trial_run": best.run_id or "-",
            **{f"raygen.sweep.{alias}.{k}": v for k, v in best.values.items()}}
    if spec.kind == "train":
        if best.run_id is None:
            raise UserError(f"the best trial {best.trial_id} has no MLflow run to register")
        name = spec.register["name"]
        version = tracking.register(uri, best.run_id, name, alias)
    else:
        swept = tracking.model_version(uri, plan.model)
        name = spec.register["name"] or swept[0]
        if swept is not None and swept[0] == name:
            version = swept[1]
            tracking.set_alias(uri, name, alias, version)  # the same weights; the alias marks the best knobs
        else:
            version = tracking.register(uri, plan.target.run_id, name, alias)
    tracking.set_version_tags(uri, name, version, tags)
    return name, version, alias

"""Distributed training: Ray Data streams the shards into Ray Train workers that drive DeepSpeed.

    raygen train --preset demo --data DIR [key=value ...]

The driver checks the data set against the model before any worker starts, opens the MLflow
run, and builds one `TorchTrainer`. Each worker runs `train_loop_per_worker`: a step-based
loop (LR a pure function of the step, clipping, optional EMA, abort on a non-finite loss)
that checkpoints every `train.checkpoint_every` steps through `ray.train.report`. A failed
worker group restarts from the latest checkpoint (`train.max_failures`); a stopped driver
continues with `raygen train --resume RUN`, in the same MLflow run. At the end the driver
logs the consolidated fp32 export as the run's `model/` artifact and a sample grid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raygen import console
from raygen import families
from raygen.config import Config
from raygen.errors import ConfigError, DataError, UserError
from raygen.families import Family
from raygen.models.registry import build_model, model_config
from raygen.platform.data import shards
from raygen.platform.train.engine import batch_split, build_ds_config, resolve_zero_stage
from raygen.platform.train.init import InitPlan, adapt_state, resolve_init
from raygen.platform.devices import peak_flops, peak_memory_gb
from raygen.platform.train.loop import EMA, BatchChecker, LoopHooks, TrainState, run_steps

MATERIALIZE_BELOW_BYTES = 256 * 2**20
PREVIEW_IMAGES = 16  # the first rows of the data set, reconstructed at sample steps (codec families)
COLUMN_DTYPES = {"ids": torch.long, "latents": torch.float32, "images": torch.uint8}  # as the model gets them
ABORT_TAG = "raygen.abort"
MIN_CPUS_PER_WORKER = 0.5  # below this share a CPU worker group is refused unless train.cpus_per_worker asks for it

# --------------------------------------------------------------------------------------
# Planning (driver, before any worker starts)
# --------------------------------------------------------------------------------------


@dataclass
class TrainPlan:
    data_dir: str
    manifest: dict[str, Any]
    family: str  # the plugin's name; family_module registered it (workers import it again)
    family_module: str
    arch: dict[str, Any]  # model_config overrides: the user's, the data's and the family's prepared ones
    model_config: dict[str, Any]  # the resolved model config (JSON)
    n_params: int
    workers: int
    cpus_per_worker: float
    use_gpu: bool
    precision: str
    zero_stage: int
    micro_batch: int
    accumulation: int
    ds_config: dict[str, Any]
    storage_path: str
    column: dict[str, Any]  # the data column the family reads: {name, kind, dtype, shape, vocab_size, scale}
    prepared: dict[str, Any]  # families.Prepared as a dict: payload, params, artifacts, export
    sides: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the side columns the family reads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def plugin(self) -> Family:
        return families.get(self.family)


def plan_training(cfg: Config, *, cluster_cpus: float, cluster_gpus: float, data_dir: str) -> TrainPlan:
    """Check everything that can be checked before a worker starts: the data set (files, checksums,
    columns) against the family and the model, the family's preparations, knobs, resources, batch."""
    family = families.get(cfg.model.family)
    manifest = shards.read_manifest(data_dir)
    problems = shards.check_files(Path(data_dir), manifest, checksums=True)
    if problems:
        raise DataError(f"data set '{data_dir}' is damaged: {problems[0]} (run `raygen data check {data_dir}`)")
    if cfg.data.classes:  # a subset of the classes, relabelled: the plan sees only those rows
        manifest = shards.class_view(data_dir, manifest, cfg.data.classes)
    data = shards.data_info(manifest)
    family.check_data(data, f"data set '{data_dir}'")
    arch = dict(cfg.model.arch)
    for key, value in family.arch_from_data(data).items():
        if key in arch and arch[key] != value:
            raise ConfigError(
                f"model.arch.{key}={arch[key]} does not match the data set '{data_dir}', which has {key}={value}"
            )
        arch[key] = value
    prepared = family.prepare(cfg, manifest, data_dir, arch)
    arch.update(prepared.arch)
    family.check_knobs(cfg.sample.knobs)
    family.check_sample(cfg.sample)
    try:
        resolved = model_config(family.name, cfg.model.size, **arch)
        with torch.device("meta"):
            model = build_model(family.name, cfg.model.size, **arch)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    n_params = sum(p.numel() for p in model.parameters())

    t = cfg.train
    use_gpu = t.use_gpu if t.use_gpu is not None else cluster_gpus > 0
    if use_gpu and cluster_gpus == 0:
        raise ConfigError("train.use_gpu=true but the Ray cluster has no GPUs")
    workers = t.workers or (int(cluster_gpus) if use_gpu else max(1, int(cluster_cpus)))
    if t.cpus_per_worker is not None:
        cpw = t.cpus_per_worker
    elif use_gpu:
        cpw = max(1.0, min(8.0, (cluster_cpus - 1) / workers))
    else:  # share the CPUs and leave one for Ray Data (two decimals keep Ray's resource math exact)
        cpw = max(0.01, math.floor(100 * max(cluster_cpus - 1, 1) / workers) / 100)
        if cpw < MIN_CPUS_PER_WORKER:  # more workers than CPUs to run them: they would only wait on each other
            most = max(1, int(max(cluster_cpus - 1, 1) / MIN_CPUS_PER_WORKER))
            raise ConfigError(
                f"train.workers={workers} on a cluster with {cluster_cpus:g} CPUs leaves {cpw:g} CPU per worker "
                f"(one CPU stays with Ray Data; the floor is {MIN_CPUS_PER_WORKER:g}): use train.workers <= {most}, "
                "or set train.cpus_per_worker to force this split")
    if workers * cpw > cluster_cpus:
        raise ConfigError(
            f"{workers} workers x {cpw} CPUs do not fit the cluster's {cluster_cpus:g} CPUs; "
            "lower train.workers or train.cpus_per_worker"
        )
    if use_gpu and workers > cluster_gpus:
        raise ConfigError(f"train.workers={workers} but the cluster has {cluster_gpus:g} GPUs")
    precision = t.precision if t.precision != "auto" else ("bf16" if use_gpu else "fp32")
    device_mem = None
    if use_gpu and torch.cuda.is_available():
        device_mem = torch.cuda.get_device_properties(0).total_memory
    elif not use_gpu:  # CPU workers share this host's memory (on a cluster: a conservative share)
        device_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / workers
    stage = resolve_zero_stage(t.zero_stage, n_params=n_params, world=workers, device_mem_bytes=device_mem)
    micro, accum = batch_split(t.global_batch, t.micro_batch, workers)
    if micro * workers > manifest["rows"]:
        raise ConfigError(
            f"train.global_batch={t.global_batch} needs {micro * workers} rows per micro step but '{data_dir}' "
            f"has {manifest['rows']}"
        )
    ds_config = build_ds_config(global_batch=t.global_batch, micro_batch=t.micro_batch, world=workers, stage=stage,
                                bf16=precision == "bf16", grad_clip=t.grad_clip, raw=t.ds_config)
    storage = str((Path(cfg.workdir) / "checkpoints").resolve())
    column = shards.data_column(manifest)
    sides = [{"name": c.name, **c.to_json()} for c in shards.columns(manifest) if c.name in family.side_columns]
    return TrainPlan(str(Path(data_dir).resolve()), manifest, family.name, families.module_of(family.name), arch,
                     _jsonable(dataclasses.asdict(resolved)), n_params, workers, cpw, use_gpu, precision, stage,
                     micro, accum, ds_config, storage, {"name": column.name, **column.to_json()},
                     dataclasses.asdict(prepared), sides)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------------------
# The worker loop
# --------------------------------------------------------------------------------------


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


@dataclass
class WorkerSetup:
    """What the driver hands every worker, typed (Ray pickles it)."""

    cfg: Config
    plan: TrainPlan
    run_id: str
    tracking_uri: str
    export_meta: dict[str, Any]
    report_log_steps: bool = False  # a listening callback (a sweep's) also gets every log step
    progress: Any = None  # a ProgressBoard actor rank 0 posts each log window to (the driver draws it)
    init: InitPlan | None = None  # train.init_from resolved: the parent's weights and how they are adapted


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: assemble the parts (model, engine, state, batches, hooks) and run the loop."""
    import importlib
    import warnings

    import ray.train
    import ray.train.torch

    from raygen.platform.train.engine import DeepSpeedEngine
    from raygen.platform.tracking import MlflowTracker, NullTracker

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    setup: WorkerSetup = config["setup"]
    cfg, plan = setup.cfg, setup.plan
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(round(plan.cpus_per_worker))))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)  # nn.Dropout; explicit generators drive the rest

    importlib.import_module(plan.family_module)  # a plugin from outside raygen registers itself
    family = families.get(plan.family)
    model = family.build(cfg.model.size, plan.arch, plan.prepared["payload"])
    if setup.init:  # train.init_from: checked on the driver, loaded before the engine shards it
        parent = torch.load(setup.init.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(adapt_state(parent, model.state_dict(), setup.init))
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.param_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                  fused=device.type == "cuda")
    engine = DeepSpeedEngine(model, optimizer, plan.ds_config)
    critic = None
    critic_module = model.make_critic()
    if critic_module is not None:  # e.g. a GAN discriminator: its own optimizer and engine
        critic_module = critic_module.to(device)
        critic_opt = torch.optim.AdamW(critic_module.param_groups(t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                       fused=device.type == "cuda")
        critic = DeepSpeedEngine(critic_module, critic_opt, plan.ds_config, name="ds_critic")
    state = TrainState(torch.Generator(device=device).manual_seed(cfg.seed * 9973 + rank))
    if t.ema:
        with engine.full_params():  # under ZeRO-3 each rank holds only a partition otherwise
            state.ema = EMA(engine.module, t.ema)
    checkpointer = Checkpointer(engine, state, rank, setup.export_meta, critic)
    restored = checkpointer.restore(ray.train.get_checkpoint())

    tracker = MlflowTracker(setup.tracking_uri, setup.run_id) if rank == 0 else NullTracker()
    shard = ray.train.get_dataset_shard("train")
    check = BatchChecker.of(plan.column, plan.data_dir, plan.manifest, plan.sides)

    def epoch_batches(epoch: int):
        batches = shard.iter_torch_batches(
            batch_size=plan.micro_batch, drop_last=True,
            dtypes={plan.column["name"]: COLUMN_DTYPES[plan.column["kind"]], **check.side_dtypes(),
                    "label": torch.long, "index": torch.long},
            local_shuffle_buffer_size=t.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 1000 + epoch * world + rank) if t.shuffle_buffer else None,
            prefetch_batches=t.prefetch_batches,
        )
        # the epoch's own CPU generator for draws from posterior moments: a resumed epoch re-draws its
        # skipped batches and continues exactly
        draws = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * world + rank)
        return (check(b, device, draws) for b in batches)

    if restored:
        tracker.resumed(state.step)  # the curves keep one point per step across restarts
    if rank == 0 and setup.progress is not None:
        setup.progress.started.remote(state.step)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(metrics, step)
        if rank == 0 and setup.progress is not None:  # fire and forget: the driver's progress line
            setup.progress.update.remote(step, metrics)
        if setup.report_log_steps and step < t.steps and step % t.checkpoint_every:
            # Every rank reports the log step (metrics only, rank 0's kept) when a callback listens
            # (a sweep's TuneReportCallback: what ASHA decides on); checkpoint steps report with theirs.
            ray.train.report({**metrics, "step": step})

    def on_abort(step: int, loss: float) -> None:
        # Every rank stops cleanly at this step (an exception would only be retried); the driver
        # reads the reason from the run.
        tracker.set_tag(ABORT_TAG, f"step {step}: loss {loss}")

    hooks = LoopHooks(
        reduce=lambda v: _all_reduce(v, device), any_rank=lambda flag: _all_reduce([float(flag)], device, "max")[0] > 0,
        on_log=on_log, on_abort=on_abort,
        on_sample=lambda step: _log_samples(cfg, setup.export_meta, engine, device, step, tracker, rank, plan),
        on_checkpoint=lambda step, metrics: checkpointer.save(step == t.steps, metrics),
        fail_at_step=t.fail_at_step if not restored and rank == world - 1 else None, world=world,
        peak_flops=peak_flops(device, plan.precision), extra_metrics=lambda: {"mem/peak_gb": peak_memory_gb(device)[0]},
    )
    run_steps(engine, state, epoch_batches, t, hooks, critic=critic)


class Checkpointer:
    """Every rank's DeepSpeed shard (and its critic's) + the loop state + its RNG, reported to Ray
    Train; the last checkpoint also holds the consolidated export (rank 0 writes it)."""

    def __init__(self, engine, state: TrainState, rank: int, export_meta: dict[str, Any], critic=None):
        self.engine, self.state, self.rank, self.export_meta = engine, state, rank, export_meta
        self.critic = critic

    def restore(self, checkpoint) -> bool:
        """Load the latest checkpoint Ray Train hands a (re)started worker; False when there is none."""
        if checkpoint is None:
            return False
        import torch.distributed as dist

        with checkpoint.as_directory() as d:
            client_state = self.engine.load(d)
            if self.critic is not None:
                self.critic.load(d)
            rng_file = Path(d) / "rng" / f"rank{self.rank}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
            self.state.restore(client_state, rng)
            if dist.is_initialized():
                dist.barrier()  # nobody leaves (and deletes) the directory while others read it
        return True

    def save(self, final: bool, metrics: dict[str, float]) -> None:
        import ray.train
        from ray.train import Checkpoint

        from raygen.platform.evaluate.sampling import write_export

        state = self.state
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save(tmp, state.client_state())
            if self.critic is not None:
                self.critic.save(tmp, {})
            (Path(tmp) / "rng").mkdir()
            torch.save(state.rng_state(), Path(tmp) / "rng" / f"rank{self.rank}.pt")
            if final:
                weights = self.engine.fp32_state_dict()  # collective
                if state.ema is not None:
                    weights = {**weights, **state.ema.state_dict()}
                if self.rank == 0:
                    write_export(Path(tmp) / "export", weights, self.export_meta)
            ray.train.report({**metrics, "step": state.step}, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{state.step:08d}")


def _log_samples(cfg: Config, meta: dict[str, Any], engine, device, step: int, tracker, rank: int,
                 plan: TrainPlan) -> None:
    """A fixed-seed grid from the live weights (or, for a codec, originals above their
    reconstructions); every rank runs the model (ZeRO-3 gathers collectively)."""
    from raygen.config import parse_labels
    from raygen.platform.evaluate.sampling import decode, generate, grid_image, reconstruction_grid

    family = families.get(meta["family"])
    if family.can_reconstruct(meta):
        images, _ = shards.read_rows(plan.data_dir, plan.manifest, PREVIEW_IMAGES)
        with engine.full_params():
            grid = reconstruction_grid(engine.module, images)
        engine.module.train()
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"reconstructions_step{step:08d}.png"
                grid.save(path)
                tracker.log_artifact(path, "reconstructions")
        return
    if not family.can_sample(meta):
        return
    sample = dataclasses.replace(cfg.sample, per_label=min(cfg.sample.per_label, 4))
    classes = parse_labels(sample.labels, meta["data"]["num_classes"])[:10]
    labels = [c for c in classes for _ in range(sample.per_label)]
    with engine.full_params():
        tokens = generate(engine.module, meta, labels, sample, device)
    engine.module.train()
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"samples_step{step:08d}.png"
            grid_image(decode(meta, tokens), rows=len(classes)).save(path)
            tracker.log_artifact(path, "samples")


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    export_dir: Path
    steps: int
    metrics: dict[str, Any]
    seconds: float


class TrainingAborted(UserError):
    pass


def export_meta(cfg: Config, plan: TrainPlan, run_id: str) -> dict[str, Any]:
    m = plan.manifest
    return {
        "family": plan.family,
        "size": cfg.model.size,
        "arch": plan.arch,
        "model_config": plan.model_config,
        "weights": "ema" if cfg.train.ema else "raw",
        "tokenizer": m["tokenizer"],
        "data": {"dir": plan.data_dir, "source": m["source"]["name"], "num_classes": m["num_classes"],
                 "class_names": m.get("class_names"), "grid": m["grid"], "vocab_size": plan.column.get("vocab_size"),
                 "column": plan.column, "tokenizer_fingerprint": m["tokenizer"]["fingerprint"]},
        "sample": dataclasses.asdict(cfg.sample),
        **plan.prepared["export"],
        "run_id": run_id,
        "steps": cfg.train.steps,
    }


def train(cfg: Config, *, data_dir: str, resume_run: str | None = None, progress: bool = False,
          parent_run_id: str | None = None, run_tags: dict[str, str] | None = None,
          callbacks: list | tuple = ()) -> TrainResult:
    """Plan, open (or reopen) the MLflow run, fit, export, sample. Returns where everything went.

    With `progress`, the console shows the run's progress while it trains (raygen/platform/train/progress.py).

    A sweep trial passes its sweep's run as `parent_run_id` (the new run becomes its child), its
    own `run_tags`, and Ray Train `callbacks` such as Tune's `TuneReportCallback`; with callbacks
    every log step is also reported to Ray Train (metrics only), not just the checkpoints.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raygen.platform import tracking
    from raygen.platform.cluster.connect import init_ray

    t0 = time.time()
    shards.read_manifest(data_dir)  # no data set there: say so before Ray starts
    init_ray(cfg.ray)
    plan = plan_training(cfg, cluster_cpus=float(ray.cluster_resources().get("CPU", 1)),
                         cluster_gpus=float(ray.cluster_resources().get("GPU", 0)), data_dir=data_dir)
    uri = tracking.tracking_uri(cfg.workdir, cfg.tracking.uri)
    init = resolve_init(cfg, plan, uri)
    if resume_run:
        run_id = resume_run
        tracking.reopen_run(uri, run_id, clear_tags=(ABORT_TAG,))
    else:
        exp = tracking.ensure_experiment(uri, cfg.tracking.experiment, cfg.workdir)
        name = cfg.tracking.run_name or f"{plan.family}-{cfg.model.size}-{time.strftime('%Y%m%d-%H%M%S')}"
        # eval.* params belong to `raygen eval`, which logs what each evaluation used (config.yaml keeps all)
        params = {**{k: v for k, v in cfg.flat().items() if not k.startswith("eval.")}, **plan.prepared["params"],
                  "derived.n_params": plan.n_params, "derived.workers": plan.workers,
                  "derived.zero_stage": plan.zero_stage, "derived.micro_batch": plan.micro_batch,
                  "derived.accumulation": plan.accumulation, "derived.precision": plan.precision,
                  **({"derived.init": "; ".join(init.notes)} if init and init.notes else {})}
        run_id = tracking.create_run(uri, exp, name, params, {"raygen.family": plan.family,
                                                              "raygen.size": cfg.model.size,
                                                              "raygen.data": plan.data_dir, **(run_tags or {}),
                                                              **({tracking.PARENT_MODEL_TAG: init.lineage} if init else {}),
                                                              **({tracking.PARENT_TAG: parent_run_id}
                                                                 if parent_run_id else {})})
        tracking.log_text(uri, run_id, cfg.to_yaml(), "config.yaml")
        tracking.log_text(uri, run_id, json.dumps(plan.manifest, indent=1), "data/manifest.json")
        tracking.log_text(uri, run_id, json.dumps(plan.ds_config, indent=1), "ds_config.json")
        for path, artifact_dir in plan.prepared["artifacts"]:
            tracking.log_artifact(uri, run_id, path, artifact_dir)

    column = shards.Column.from_json(plan.column["name"], plan.column)
    ds = ray.data.read_parquet(shards.shard_paths(plan.data_dir, plan.manifest)).select_columns(
        [column.name, *(c["name"] for c in plan.sides), "label", "index"])
    if "class_subset" in plan.manifest:  # data.classes
        ds = ds.map_batches(shards.keep_classes, fn_kwargs={"ids": plan.manifest["class_subset"]["ids"]},
                            batch_format="pyarrow", batch_size=None)
    row_bytes = sum(c.size * np.dtype(c.dtype).itemsize for c in [column, *(
        shards.Column.from_json(c["name"], c) for c in plan.sides)])
    n_bytes = plan.manifest["rows"] * (row_bytes + 12)
    if n_bytes < MATERIALIZE_BELOW_BYTES:
        # Small data sets live in the object store once instead of being re-read every epoch.
        ds = ds.materialize()
    # One seeded block order for every epoch, and no locality preference in the split: each rank
    # then reads the same rows in the same order in every execution (a restart included), and
    # its per-epoch seeded local shuffle makes the epochs differ. That is what exact resume needs.
    ds = ds.randomize_block_order(seed=cfg.seed)
    board = None
    if progress:
        from raygen.platform.train.progress import new_board

        board = new_board()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"setup": WorkerSetup(cfg, plan, run_id, uri, export_meta(cfg, plan, run_id),
                                                report_log_steps=bool(callbacks), progress=board,
                                                init=init)},
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus_per_worker}),
        torch_config=TorchConfig(timeout_s=900),
        run_config=RunConfig(
            name=f"raygen-{run_id}", storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            callbacks=list(callbacks) or None,
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(enable_shard_locality=False),
    )
    try:
        if board is not None:
            from raygen.platform.train.progress import ProgressThread, ProgressView

            print(f"train: {plan.family}-{cfg.model.size} ({plan.n_params:,} parameters) on {plan.workers} "
                  f"worker(s), ZeRO-{plan.zero_stage}, {plan.precision}; run {run_id}", file=console.err(), flush=True)
            if init:
                print("\n".join([f"train: from {init.lineage}", *(f"  {n}" for n in init.notes)]), file=console.err(),
                      flush=True)
            with ProgressThread(board, ProgressView(cfg.train.steps)):
                result = trainer.fit()
        else:
            result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - training errors end the MLflow run as FAILED
        log_console_file(uri, run_id)
        tracking.set_terminated(uri, run_id, "FAILED")
        raise TrainingFailed.of(run_id, e) from e
    metrics = dict(result.metrics or {})
    abort = tracking.get_run(uri, run_id).data.tags.get(ABORT_TAG)
    if abort:
        tracking.set_terminated(uri, run_id, "FAILED")
        raise TrainingAborted(
            f"training stopped at {abort}: the loss is not finite; "
            "lower train.lr, raise train.warmup_steps or set train.grad_clip"
        )
    export_dir = Path(tempfile.mkdtemp(prefix="raygen-export-"))
    with result.checkpoint.as_directory() as d:
        src = Path(d) / "export"
        if not src.is_dir():
            tracking.set_terminated(uri, run_id, "FAILED")
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} has no export/")
        import shutil

        shutil.copytree(src, export_dir, dirs_exist_ok=True)
    if plan.plugin.can_reconstruct(export_meta(cfg, plan, run_id)):  # a codec: measured before it is logged
        final_metrics = finish_with_reconstructions(cfg, uri, run_id, export_dir, plan)
        tracking.log_artifact(uri, run_id, export_dir, tracking.MODEL_ARTIFACT)
    else:
        tracking.log_artifact(uri, run_id, export_dir, tracking.MODEL_ARTIFACT)
        final_metrics = finish_with_samples(cfg, uri, run_id, export_dir)
    log_console_file(uri, run_id)
    tracking.set_terminated(uri, run_id, "FINISHED")
    return TrainResult(run_id, uri, export_dir, int(metrics.get("step", cfg.train.steps)),
                       {**metrics, **final_metrics}, time.time() - t0)


def finish_with_samples(cfg: Config, uri: str, run_id: str, export_dir: Path) -> dict[str, float]:
    """Sample a grid from the export, log it, and log eval/class_acc for digits."""
    from raygen.platform import tracking
    from raygen.platform.evaluate.digits import class_accuracy, digit_labels, load_classifier
    from raygen.platform.evaluate.sampling import is_digits, load_export, sample_grid

    model, meta = load_export(export_dir)
    if not families.get(meta["family"]).can_sample(meta):  # e.g. a part of a composite export
        return {}
    png = export_dir.parent / f"{export_dir.name}-samples.png"
    s = sample_grid(model, meta, cfg.sample, png)
    for path in [png, *s["pictures"]]:  # and what the family draws beside them (grain maps)
        tracking.log_artifact(uri, run_id, path, "samples")
    out: dict[str, float] = {}
    if is_digits(meta):
        clf, _ = load_classifier(Path(cfg.workdir) / "cache")
        out["eval/class_acc"] = class_accuracy(clf, s["images"], digit_labels(s["labels"], meta["data"]["class_names"]))
        tracking.log_metrics(uri, run_id, out, cfg.train.steps)
    return out


def finish_with_reconstructions(cfg: Config, uri: str, run_id: str, export_dir: Path, plan: TrainPlan,
                                n: int = 512) -> dict[str, float]:
    """A codec run's end: the family's export fields measured on the data (its latent scale), then
    reconstruction metrics on the data set's first `n` rows (`reconstruction_metrics`) and a grid."""
    from raygen.platform import tracking
    from raygen.platform.evaluate.metrics import load_inception_weights
    from raygen.platform.evaluate.sampling import is_digits, load_export, read_export_meta, reconstruction_grid
    from raygen.platform.evaluate.sampling import write_export_meta

    inception = load_inception_weights(cfg.eval.inception_weights)  # checked before the work
    model, meta = load_export(export_dir)
    images, labels = (torch.from_numpy(a) for a in shards.read_rows(plan.data_dir, plan.manifest, n))
    updates = families.get(meta["family"]).finalize_export(model, meta, images)
    if updates:
        meta = {**read_export_meta(export_dir), **updates}
        write_export_meta(export_dir, {k: v for k, v in meta.items() if k != "format"})
    clf = None
    if is_digits(meta):
        from raygen.platform.evaluate.digits import load_classifier

        clf, _ = load_classifier(Path(cfg.workdir) / "cache")
    out = reconstruction_metrics(model, images, labels, digits=clf, inception=inception.state if inception else None)
    png = export_dir.parent / f"{export_dir.name}-reconstructions" / f"reconstructions_step{cfg.train.steps:08d}.png"
    png.parent.mkdir(exist_ok=True)
    reconstruction_grid(model, images[:PREVIEW_IMAGES]).save(png)
    tracking.log_artifact(uri, run_id, png, "reconstructions")
    tracking.log_metrics(uri, run_id, out, cfg.train.steps)
    return out


def reconstruction_metrics(model, images: torch.Tensor, labels: torch.Tensor, *, digits=None,
                           inception: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """A codec model's reconstructions of uint8 `images` (N, H, W, C) against them: eval/psnr and
    eval/l1 (in [-1, 1] units); with the digits classifier, its accuracy on the reconstructions
    (eval/class_acc: are they legible) and FD-digits to the originals; with FID Inception weights,
    rFID (the Fréchet distance of the two sets' Inception pool features, over these N images)."""
    from raygen.models.tokenizers.base import psnr
    from raygen.platform.evaluate.metrics import Extractors, feature_stats, frechet_distance

    recon = torch.cat([model.reconstruct(images[i : i + 64]) for i in range(0, len(images), 64)])
    x, y = images.float() / 127.5 - 1, recon.float() / 127.5 - 1  # [-1, 1]
    mse = (x - y).pow(2).flatten(1).mean(dim=1)  # (N,)
    out = {"eval/psnr": float(psnr(mse).mean()), "eval/l1": float((x - y).abs().mean())}
    if digits is not None:
        from raygen.platform.evaluate.digits import class_accuracy, digits_features

        out["eval/class_acc"] = class_accuracy(digits, recon, labels.long())
        out["eval/fd_digits"] = frechet_distance(*feature_stats(digits_features(digits, images)[0]),
                                                 *feature_stats(digits_features(digits, recon)[0]))
    if inception is not None:
        extract = Extractors(inception_state=inception)
        real, fake = extract(images)["inception_pool"], extract(recon)["inception_pool"]
        out["eval/rfid"] = frechet_distance(*feature_stats(real), *feature_stats(fake))
    return out


class TrainingFailed(UserError):
    """Training failed after its restarts; the run can be resumed."""

    @classmethod
    def of(cls, run_id: str, cause: BaseException) -> "TrainingFailed":
        from raygen.errors import find_user_error

        user = find_user_error(cause)  # e.g. a worker's DataError naming the bad shard and row
        failures = getattr(cause, "worker_failures", None) or {}  # Ray Train's WorkerGroupError: rank -> error
        rank, first = min(failures.items(), key=lambda kv: kv[0]) if failures else (None, cause)
        lines = [ln for ln in str(first).strip().splitlines() if ln.strip()]
        detail = user.message if user else (lines[-1] if lines else type(first).__name__)[:400]
        where = f"rank {rank}: " if rank is not None and not user else ""
        logs = f"; the workers' logs: {session_logs()}" if console.is_quiet() and not user else ""
        return cls(f"training failed (run {run_id}): {where}{detail}{logs}; continue it with "
                   f"`raygen train --resume {run_id}`")


def session_logs() -> str:
    """The Ray session's log directory (every worker's stdout and stderr), or where to look."""
    try:
        import ray

        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except Exception:  # noqa: BLE001 - only a hint in a message
        return "/tmp/ray/session_latest/logs"


def log_console_file(uri: str, run_id: str) -> None:
    """Attach the command's log file (the libraries' output, when quiet) to the run as logs/raygen.log."""
    path = console.log_path()
    if path is None or not path.is_file():
        return
    import shutil

    from raygen.platform import tracking

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / "raygen.log")
        try:
            tracking.log_artifact(uri, run_id, Path(tmp) / "raygen.log", "logs")
        except Exception:  # noqa: BLE001 - the log is a convenience; the run's result stands
            pass


def run_config_of(uri: str, run_id: str) -> dict[str, Any]:
    """The resolved config a run was started with (its config.yaml artifact)."""
    import yaml

    from raygen.platform import tracking

    try:
        text = tracking.read_artifact_text(uri, run_id, "config.yaml")
    except UserError:
        raise
    except Exception:  # noqa: BLE001
        raise UserError(f"run '{run_id}' has no config.yaml artifact; was it started by raygen train?") from None
    return yaml.safe_load(text)

"""The training loop as parts: state, batches, a metrics window, and the step loop itself.

`run_steps` is the loop every worker runs, and nothing in it needs Ray: it takes an engine
(DeepSpeed's or the plain-torch one), a `TrainState`, a function that yields one epoch of
batches, and `LoopHooks` for what the surroundings do at log, sample and checkpoint steps. The
Ray Train worker (`train.train_loop_per_worker`) only assembles these parts; a unit test runs
the same loop on the plain-torch engine.

    state = TrainState(generator=g)
    outcome = run_steps(engine, state, epoch_batches, cfg.train, hooks)   # "done" or "aborted"
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raygen.config import TrainConfig
from raygen.errors import DataError
from raygen.platform.data import shards


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.schedule == "linear":
        return t.min_lr + (t.lr - t.min_lr) * (1 - progress)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the weights, in fp32 (the loop calls it inside full_params)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)


@dataclass
class TrainState:
    """What a checkpoint must bring back to continue exactly: the step, the data position (epoch and
    micro-batches consumed in it), the loop's RNG, torch's global RNG (dropout) and the EMA."""

    generator: torch.Generator
    step: int = 0
    epoch: int = 0
    batches: int = 0  # micro-batches of `epoch` consumed on this rank
    ema: EMA | None = None

    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batches": self.batches,
                "ema": self.ema.state_dict() if self.ema else None}

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This rank's random state (saved per rank beside the engine's checkpoint)."""
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}

    def restore(self, client_state: dict[str, Any], rng: dict[str, torch.Tensor] | None) -> None:
        """Continue at the saved data position. Checkpoints older than the data position
        (no "batches") continue with the next epoch, as they did."""
        self.step = int(client_state["step"])
        if "batches" in client_state:
            self.epoch, self.batches = int(client_state["epoch"]), int(client_state["batches"])
        else:
            self.epoch, self.batches = int(client_state["epoch"]) + 1, 0
        if rng is not None:
            self.generator.set_state(rng["generator"])
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
        if self.ema is not None and client_state.get("ema") is not None:
            self.ema.load_state_dict(client_state["ema"])


@dataclass
class MetricsWindow:
    """Loss, the model's other scalars, data wait and steps since the last log step; `close`
    turns them into metrics."""

    loss: float = 0.0
    micro_steps: int = 0
    wait_s: float = 0.0
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)
    extras: dict[str, list[Any]] = field(default_factory=dict)  # name -> [sum (a 0-d tensor), count]

    def add(self, out: dict[str, Any]) -> None:
        """Accumulate a forward's 0-d extras (everything but "loss"), logged as train/<name>. The
        sums stay tensors on the model's device: no host sync until the window closes."""
        for name, value in out.items():
            if name != "loss" and isinstance(value, torch.Tensor) and value.ndim == 0:
                acc = self.extras.setdefault(name, [0.0, 0])
                acc[0] = acc[0] + value.detach().float()
                acc[1] += 1

    def close(self, *, reduce: Callable[[list[float]], list[float]], samples_per_step: int, world: int,
              flops_per_sample: float, peak_flops: float | None) -> dict[str, float]:
        """Metrics over the window (the loss and extras averaged over every rank's micro steps)."""
        names = sorted(self.extras)  # the same on every rank: the same code ran
        flat = reduce([self.loss, float(self.micro_steps), *(float(v) for n in names for v in self.extras[n])])
        loss_sum, n = flat[:2]
        elapsed = time.perf_counter() - self.t0
        sps = self.steps * samples_per_step / elapsed
        out = {"train/loss": loss_sum / max(n, 1), "perf/samples_per_s": sps, "perf/data_wait_frac": self.wait_s / elapsed,
               "perf/tflops_per_worker": flops_per_sample * sps / world / 1e12}
        for i, name in enumerate(names):
            total, count = flat[2 + 2 * i : 4 + 2 * i]
            out[f"train/{name}"] = total / max(count, 1)
        if peak_flops:
            out["perf/mfu"] = flops_per_sample * sps / world / peak_flops
        return out


@dataclass
class LoopHooks:
    """What the surroundings do at the loop's events; the defaults do nothing (a plain loop)."""

    reduce: Callable[[list[float]], list[float]] = lambda v: v  # sum over ranks
    any_rank: Callable[[bool], bool] = lambda flag: flag  # true when any rank says so
    on_log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    on_sample: Callable[[int], None] = lambda step: None
    on_checkpoint: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    on_abort: Callable[[int, float], None] = lambda step, loss: None
    fail_at_step: int | None = None  # fault injection (train.fail_at_step), armed by the caller
    world: int = 1
    peak_flops: float | None = None
    extra_metrics: Callable[[], dict[str, float]] = lambda: {}


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Inside, `module`'s parameters take no gradient (a loss can still flow through it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def run_steps(engine, state: TrainState, epoch_batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
              t: TrainConfig, hooks: LoopHooks | None = None, critic=None) -> str:
    """Optimizer steps until t.steps: LR by step, backward, step, EMA, logs, samples, checkpoints.

    `critic` is the engine of the model's critic (`model.make_critic()`), or None. From optimizer
    step `model.critic_start` on, each micro step runs the model with the critic frozen inside
    its loss, then the critic on the model's detached "critic_batch" with its own optimizer,
    at the same learning rate.

    Returns "done", or "aborted" when any rank saw a non-finite loss (every rank stops at the
    same step: one scalar all-reduce per optimizer step). A restored state continues its epoch
    after the micro-batches it had consumed (`epoch_batches(epoch)` must yield the same batches
    for the same epoch: that makes a resumed run end where an uninterrupted one does).
    """
    hooks = hooks or LoopHooks()
    model = engine.module
    flops = model.flops_per_sample()
    window, last, bad_loss = MetricsWindow(), {}, False
    while state.step < t.steps:
        it = iter(epoch_batches(state.epoch))
        for _ in range(state.batches):  # what this epoch had given before the checkpoint
            next(it)
        while state.step < t.steps:
            t_wait = time.perf_counter()
            batch = next(it, None)
            if batch is None:  # the epoch is over: the next one starts from its first batch
                state.epoch, state.batches = state.epoch + 1, 0
                break
            window.wait_s += time.perf_counter() - t_wait
            state.batches += 1
            engine.set_lr(lr_at(state.step, t))
            if critic is not None and state.step >= model.critic_start:
                critic.set_lr(lr_at(state.step, t))
                with frozen(critic.module):
                    out = engine(batch, generator=state.generator, critic=critic.module)
                    engine.backward(out["loss"])
                critic_out = critic(out.pop("critic_batch"))
                critic.backward(critic_out["loss"])
                critic.step()
                critic_loss = float(critic_out["loss"].detach())
                bad_loss |= not math.isfinite(critic_loss)
                window.add({f"critic_{k}": v.detach() for k, v in critic_out.items()})  # train/critic_loss, ...
            else:
                out = engine(batch, generator=state.generator)
                engine.backward(out["loss"])
            loss_value = float(out["loss"].detach())
            bad_loss |= not math.isfinite(loss_value)
            window.loss += loss_value
            window.micro_steps += 1
            window.add(out)
            if not engine.step():
                continue
            state.step += 1
            window.steps += 1
            if hooks.any_rank(bad_loss):
                hooks.on_abort(state.step, loss_value)
                return "aborted"
            if state.ema is not None:
                with engine.full_params():
                    state.ema.update(model)
            if hooks.fail_at_step is not None and state.step >= hooks.fail_at_step:
                raise RuntimeError(f"injected failure at step {state.step} (train.fail_at_step)")
            step = state.step
            if step % t.log_every == 0 or step == t.steps:
                last = window.close(reduce=hooks.reduce, samples_per_step=t.global_batch, world=hooks.world,
                                    flops_per_sample=flops, peak_flops=hooks.peak_flops)
                last["train/lr"] = lr_at(step - 1, t)
                norm = engine.grad_norm()
                if norm is not None and math.isfinite(norm):
                    last["train/grad_norm"] = norm
                last.update(hooks.extra_metrics())
                hooks.on_log(step, last)
                window = MetricsWindow()
            if t.sample_every and step % t.sample_every == 0 and step < t.steps:
                hooks.on_sample(step)
            if step % t.checkpoint_every == 0 and step < t.steps:
                hooks.on_checkpoint(step, {k: v for k, v in last.items() if k == "train/loss"})
    hooks.on_checkpoint(state.step, {k: v for k, v in last.items() if k == "train/loss"})
    return "done"


# --------------------------------------------------------------------------------------
# Batches: the declared data column, checked on the worker before the model sees it
# --------------------------------------------------------------------------------------


@dataclass
class BatchChecker:
    """Turns a Ray Data batch into the model's batch and refuses bad values, naming shard and row."""

    column: shards.Column
    data_dir: str
    manifest: dict[str, Any]
    sides: tuple[shards.Column, ...] = ()  # side columns the family reads, passed under their names

    @classmethod
    def of(cls, column: dict[str, Any], data_dir: str, manifest: dict[str, Any],
           sides: list[dict[str, Any]] = ()) -> "BatchChecker":
        return cls(shards.Column.from_json(column["name"], column), data_dir, manifest,
                   tuple(shards.Column.from_json(c["name"], c) for c in sides))

    def side_dtypes(self) -> dict[str, torch.dtype]:
        """How side columns reach the model: floats as float32, integers as int64."""
        return {c.name: torch.float32 if c.dtype.startswith("float") else torch.long for c in self.sides}

    def __call__(self, batch: dict[str, torch.Tensor], device: torch.device,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`generator` (CPU) draws from a column of posterior moments: a view and a latent per row."""
        c = self.column
        values = batch[c.name]  # (B, prod(shape)) on the CPU
        if c.kind == "ids":
            bad = (values < 0) | (values >= c.vocab_size)
        elif c.kind == "latents":
            bad = ~torch.isfinite(values)
        else:  # images: any uint8 is a pixel
            bad = torch.zeros_like(values, dtype=torch.bool)
        if bool(bad.any()):
            self._refuse(batch, bad, c)
        data = values if c.kind == "ids" else values.reshape(len(values), *c.stored_shape)  # (B, L, D), (B, H, W, C)
        if c.moments:
            data = draw_latents(data, generator)  # (B, V, 2, L, D) -> (B, L, D)
        out = {"tokens" if c.kind == "ids" else c.name: data.to(device, non_blocking=True),
               "label": batch["label"].to(device, non_blocking=True)}
        for side in self.sides:
            values = batch[side.name]  # (B, prod(shape))
            if side.vocab_size is not None:
                bad = (values < 0) | (values >= side.vocab_size)
            else:
                bad = ~torch.isfinite(values) if values.is_floating_point() else torch.zeros_like(values, dtype=torch.bool)
            if bool(bad.any()):
                self._refuse(batch, bad, side)
            out[side.name] = values.reshape(len(values), *side.shape).to(device, non_blocking=True)
        return out

    def _refuse(self, batch: dict[str, torch.Tensor], bad: torch.Tensor, col: shards.Column) -> None:
        row = int(bad.any(dim=1).nonzero()[0])
        index = int(batch["index"][row])
        value = batch[col.name][row][bad[row]][0]
        what = (f"token id {int(value)} outside [0, {col.vocab_size})" if col.kind == "ids"
                else f"{col.name} value {int(value)} outside [0, {col.vocab_size})" if col.vocab_size is not None
                else f"a non-finite {'latent' if col.kind == 'latents' else col.name} value")
        where = locate(self.data_dir, self.manifest, index)
        raise DataError(f"{where} has {what}; the data set changed after it was written: "
                        f"run `raygen data check {self.data_dir}`")


def draw_latents(moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Posterior moments (B, V, 2, L, D) -> one latent per row: a uniformly drawn view v, then
    mean_v + exp(logvar_v / 2) * noise, all from `generator`."""
    b, views = moments.shape[:2]
    v = torch.randint(views, (b,), generator=generator)  # (B,)
    mean, logvar = moments[torch.arange(b), v].unbind(1)  # (B, L, D) each
    return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)


def locate(data_dir: str, manifest: dict[str, Any], index: int) -> str:
    """'<shard> row R (source row I)' for a source index (reads only the index columns)."""
    import pyarrow.parquet as pq

    for s in manifest["shards"]:
        idx = pq.read_table(Path(data_dir) / s["file"], columns=["index"]).column("index").to_numpy()
        rows = np.nonzero(idx == index)[0]
        if len(rows):
            return f"{Path(data_dir) / s['file']} row {int(rows[0])} (source row {index})"
    return f"source row {index} of '{data_dir}'"

"""ds_config arithmetic, the ZeRO stage choice, the LR schedule, EMA and the plain-torch engine."""

from __future__ import annotations

import math

import pytest
import torch

from raygen.config import TrainConfig, load_config
from raygen.errors import ConfigError
from raygen.platform.train.engine import TorchEngine, batch_split, build_ds_config, resolve_zero_stage
from raygen.platform.train.loop import EMA, lr_at


def test_batch_split():
    assert batch_split(64, None, 2) == (32, 1)
    assert batch_split(64, 8, 2) == (8, 4)
    assert batch_split(64, 32, 2) == (32, 1)
    with pytest.raises(ConfigError, match=r"train.global_batch=64 must equal train.micro_batch=12 x 2 workers"):
        batch_split(64, 12, 2)
    with pytest.raises(ConfigError, match="does not divide over 3 workers"):
        batch_split(64, None, 3)


def test_ds_config_batch_math_and_raw_override_last():
    ds = build_ds_config(global_batch=64, micro_batch=8, world=2, stage=2, bf16=False, grad_clip=1.0,
                         raw={"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5})
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"] == 64
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "reduce_bucket_size": 5e7}
    assert ds["gradient_clipping"] == 0.5 and ds["torch_autocast"]["enabled"] is False
    ds3 = build_ds_config(global_batch=8, micro_batch=None, world=1, stage=3, bf16=True, grad_clip=1.0)
    assert ds3["zero_optimization"]["stage"] == 3
    assert ds3["torch_autocast"] == {"enabled": True, "dtype": "torch.bfloat16"} and not ds3["bf16"]["enabled"]


def test_auto_zero_stage():
    assert resolve_zero_stage("auto", n_params=10**6, world=1, device_mem_bytes=None) == 0
    assert resolve_zero_stage("auto", n_params=10**8, world=2, device_mem_bytes=None) == 1
    assert resolve_zero_stage("auto", n_params=343 * 10**6, world=8, device_mem_bytes=None) == 2
    assert resolve_zero_stage("auto", n_params=775 * 10**6, world=8, device_mem_bytes=None) == 3
    # with a memory figure: the cheapest stage that fits 60% of it (16 B/param whole at stage 0)
    h100 = 80e9
    assert resolve_zero_stage("auto", n_params=343 * 10**6, world=8, device_mem_bytes=h100) == 0  # 5.5 GB
    assert resolve_zero_stage("auto", n_params=3100 * 10**6, world=8, device_mem_bytes=h100) == 2  # 50 GB whole
    assert resolve_zero_stage("auto", n_params=9000 * 10**6, world=8, device_mem_bytes=h100) == 3
    # a model whose weights and grads alone crowd the device goes to stage 3
    assert resolve_zero_stage("auto", n_params=343 * 10**6, world=8, device_mem_bytes=2e9) == 3
    assert resolve_zero_stage(2, n_params=10, world=1, device_mem_bytes=None) == 2


def test_lr_schedule_is_a_pure_function_of_the_step():
    t = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(55, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, t) == pytest.approx(0.1)
    lrs = [lr_at(s, t) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(50, TrainConfig(steps=100, lr=2.0, warmup_steps=0, schedule="constant")) == 2.0
    assert lr_at(50, TrainConfig(steps=100, lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")) == pytest.approx(0.5)


def test_ema_tracks_weights():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], start + 1.0)
    fresh = EMA(m, decay=0.5)
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh.shadow["weight"], ema.shadow["weight"])


class _Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([3.0]))

    def forward(self, batch, **_):
        return {"loss": ((self.w - batch["x"]) ** 2).mean()}


def test_torch_engine_steps_at_accumulation_boundaries(tmp_path):
    m = _Quadratic()
    eng = TorchEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), accumulation=2, grad_clip=0.0)
    stepped = []
    for _ in range(4):
        out = eng({"x": torch.zeros(1)})
        eng.backward(out["loss"])
        stepped.append(eng.step())
    assert stepped == [False, True, False, True] and eng.global_steps == 2
    eng.save(tmp_path, {"step": 2})
    m2 = _Quadratic()
    eng2 = TorchEngine(m2, torch.optim.SGD(m2.parameters(), lr=0.1))
    assert eng2.load(tmp_path) == {"step": 2} and torch.equal(m2.w, m.w)


def test_train_config_knobs_validate():
    with pytest.raises(ConfigError, match="'train.zero_stage'"):
        load_config(overrides=["train.zero_stage=4"])
    cfg = load_config(overrides=["train.ds_config.zero_optimization.overlap_comm=true", "train.ds_config.foo=1"])
    assert cfg.train.ds_config == {"zero_optimization": {"overlap_comm": True}, "foo": 1}


def _digits_epochs(batch: int, seed: int = 0, rows: int | None = None):
    """Real digits (8x8, 16-level palette; the first `rows`) as one shuffled pass per epoch, in memory."""
    from raygen.models.tokenizers import PaletteConfig, PaletteTokenizer
    from raygen.platform.evaluate.digits import digits_split

    data = digits_split()
    images = torch.from_numpy(data["train_x"])  # (N, 8, 8, 1) uint8
    tok = PaletteTokenizer.fit(PaletteConfig(size=16), images[:256], image_size=8, channels=1)
    tokens = tok.encode(images).flatten(1)[:rows]
    labels = torch.from_numpy(data["train_y"]).long()[:rows]

    def epoch_batches(epoch: int):
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            yield {"tokens": tokens[idx], "label": labels[idx]}

    return epoch_batches, len(tokens)


def _digits_engine(lr: float = 2e-3):
    from raygen.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("ar", "debug", vocab_size=16, num_classes=10, grid_size=8)
    return TorchEngine(model, torch.optim.AdamW(model.param_groups(0.05), lr=lr), grad_clip=1.0)


def test_the_step_loop_trains_real_digits_without_ray():
    """The workers' own loop (run_steps) on the plain-torch engine: loss falls, hooks fire on time."""
    from raygen.platform.train.loop import LoopHooks, TrainState, run_steps

    epoch_batches, n = _digits_epochs(64)
    eng = _digits_engine()
    t = TrainConfig(steps=60, lr=2e-3, warmup_steps=5, log_every=10, checkpoint_every=25, global_batch=64)
    logs, checkpoints = {}, []
    hooks = LoopHooks(on_log=lambda step, m: logs.__setitem__(step, dict(m)),
                      on_checkpoint=lambda step, m: checkpoints.append(step))
    state = TrainState(torch.Generator().manual_seed(0))
    assert run_steps(eng, state, epoch_batches, t, hooks) == "done"
    per_epoch = n // 64
    assert (state.step, state.epoch, state.batches) == (60, 60 // per_epoch, 60 % per_epoch)  # data position
    assert sorted(logs) == [10, 20, 30, 40, 50, 60] and checkpoints == [25, 50, 60]
    assert logs[60]["train/lr"] == pytest.approx(lr_at(59, t))
    assert {"perf/samples_per_s", "perf/data_wait_frac", "train/grad_norm"} <= set(logs[10])
    # zero-init head: the first loss is log 16; a model that learns nothing stays there
    assert logs[60]["train/loss"] < 0.65 * math.log(16) < logs[10]["train/loss"]


def test_the_step_loop_stops_every_rank_on_a_non_finite_loss():
    from raygen.platform.train.loop import LoopHooks, TrainState, run_steps

    epoch_batches, _ = _digits_epochs(64)
    eng = _digits_engine(lr=1e6)  # diverges
    aborted = []
    hooks = LoopHooks(on_abort=lambda step, loss: aborted.append((step, loss)))
    state = TrainState(torch.Generator().manual_seed(0))
    t = TrainConfig(steps=50, lr=1e6, warmup_steps=0, grad_clip=0.0, log_every=100, checkpoint_every=100)
    assert run_steps(eng, state, epoch_batches, t, hooks) == "aborted"
    assert len(aborted) == 1 and aborted[0][0] == state.step < 50 and not math.isfinite(aborted[0][1])


def test_a_restored_loop_ends_where_the_uninterrupted_one_does(tmp_path):
    """Exact resume without Ray: checkpoint mid-epoch (engine, data position, RNGs), rebuild, continue."""
    from raygen.platform.train.loop import LoopHooks, TrainState, run_steps

    epoch_batches, n = _digits_epochs(64, rows=320)  # 5 batches per epoch: step 7 is batch 2 of epoch 1
    t = TrainConfig(steps=12, lr=2e-3, warmup_steps=2, log_every=100, checkpoint_every=7, global_batch=64)

    def run(stop_after_checkpoint: bool, state: TrainState, eng):
        saved = {}

        def on_checkpoint(step, metrics):
            if step == 7:
                eng.save(tmp_path / "ckpt", state.client_state())
                saved.update(rng=state.rng_state())
                if stop_after_checkpoint:
                    raise KeyboardInterrupt  # the worker dies right after its checkpoint

        try:
            run_steps(eng, state, epoch_batches, t, LoopHooks(on_checkpoint=on_checkpoint))
        except KeyboardInterrupt:
            pass
        return saved

    whole = _digits_engine()
    run(False, TrainState(torch.Generator().manual_seed(1)), whole)
    first = _digits_engine()
    saved = run(True, TrainState(torch.Generator().manual_seed(1)), first)
    torch.manual_seed(123)  # a restarted process starts from other random state
    again = _digits_engine()
    again.module.load_state_dict(first.module.state_dict())  # anything: the checkpoint overwrites it
    state = TrainState(torch.Generator().manual_seed(99))
    state.restore(again.load(tmp_path / "ckpt"), saved["rng"])
    assert (state.step, state.epoch, state.batches) == (7, 1, 2)
    run(False, state, again)
    for (name, a), b in zip(whole.module.state_dict().items(), again.module.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name

"""Sweep specs, their checks and the sweep's resource arithmetic (no Ray, no MLflow writes)."""

from __future__ import annotations

import pytest
import yaml

from raygen.config import load_config
from raygen.errors import ConfigError, UserError
from raygen.platform.sweep.driver import TrialRow, format_table, plan_resources, plan_sweep
from raygen.platform.sweep.spec import (
    check_space,
    load_spec,
    one_at_a_time,
    parse_spec,
    spec_names,
    trial_config,
)

TRAIN = {"base": "demo", "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}
SAMPLE = {"model": "models:/m@latest", "space": {"sample.cfg_scale": {"grid": [1.5, 2.0, 3.0]}}}


def _error(raw, match, base=None):
    with pytest.raises(ConfigError) as e:
        spec = parse_spec(raw, source="s.yaml")
        check_space(spec, base or load_config("demo"))
    assert match in e.value.message, e.value.message
    assert "\n" not in e.value.message
    return e.value.message


def test_presets_parse_and_their_spaces_fit_their_base_configs():
    assert spec_names() == ["arpg-cfg", "ctf-clusters", "d2it-fine-ratio", "d2it-refine", "emigm-masking",
                            "emigm-sampling", "lr-schedule"]
    for name in ("d2it-fine-ratio", "d2it-refine"):
        d2it = load_spec(name)
        assert d2it.kind == "train" and d2it.trials == 3 and d2it.metric == "eval/class_acc"
        check_space(d2it, load_config("d2it-digits"))
    lr = load_spec("lr-schedule")
    assert lr.kind == "train" and lr.trials == 6 and lr.scheduler.name == "asha"
    assert lr.metric == "eval/class_acc" and lr.mode == "max" and lr.scheduler.metric == "train/loss"
    check_space(lr, load_config("demo"))
    ctf = load_spec("ctf-clusters")
    assert ctf.kind == "train" and ctf.trials == 3 and ctf.scheduler.name == "none"
    check_space(ctf, load_config("ctf-stage1-digits"))
    cfg = load_spec("arpg-cfg")
    assert cfg.kind == "sample" and cfg.trials == 20 and cfg.metric == "eval/fd_digits" and cfg.mode == "min"
    assert cfg.register == {"name": None, "alias": "best-fid"}
    check_space(cfg, load_config("arpg-digits"))
    masking = load_spec("emigm-masking")
    assert masking.kind == "train" and masking.trials == 9 and masking.scheduler.name == "none"
    check_space(masking, load_config("emigm-digits"))
    sampling = load_spec("emigm-sampling")
    assert sampling.kind == "sample" and sampling.trials == 16 and sampling.metric == "eval/fd_digits"
    check_space(sampling, load_config("emigm-digits"))


def test_kind_is_inferred_from_the_keys():
    spec = parse_spec(SAMPLE)
    assert spec.kind == "sample" and spec.scheduler.name == "none" and spec.metric == "eval/fd_digits"
    spec = parse_spec(TRAIN)
    assert spec.kind == "train" and spec.scheduler.name == "asha" and spec.metric == "train/loss" and spec.mode == "min"
    mixed = {"base": "demo", "space": {"sample.cfg_scale": {"grid": [1, 2]}, "train.lr": {"grid": [1e-3]}}}
    assert parse_spec(mixed).kind == "train"  # sample.* keys also steer a train trial's final samples
    _error({"space": {"sample.cfg_scale": {"grid": [1, 2]}}}, "needs 'model: models:/NAME@ALIAS'")
    _error({**SAMPLE, "kind": "sample", "space": {"train.lr": {"grid": [1e-3]}}}, "'train.lr' needs training")
    _error({**TRAIN, "model": "models:/m@x"}, "'model' belongs to sample sweeps")
    _error({**SAMPLE, "base": "demo"}, "'base' belongs to train sweeps")
    _error({**SAMPLE, "model": "digits-ar"}, "'model' must be models:/NAME@ALIAS")


def test_spec_keys_and_distributions_are_checked_with_one_line_errors():
    msg = _error({**TRAIN, "metrc": "train/loss"}, "unknown key 'metrc'")
    assert "did you mean 'metric'" in msg
    _error({"base": "demo"}, "'space' must map config keys")
    msg = _error({"base": "demo", "space": {"train.lr": {"logunif": [1e-4, 1e-2]}}}, "unknown distribution 'logunif'")
    assert "did you mean 'loguniform'" in msg
    _error({"base": "demo", "space": {"train.lr": [1e-4, 1e-2]}}, "must be one distribution")
    _error({"base": "demo", "space": {"train.lr": {"uniform": [1e-2, 1e-4]}}}, "needs low < high")
    _error({"base": "demo", "space": {"train.lr": {"loguniform": [0, 1e-2]}}}, "needs low > 0")
    _error({"base": "demo", "space": {"train.lr": {"uniform": [1e-2]}}}, "takes [low, high] numbers")
    _error({"base": "demo", "space": {"train.lr": {"choice": []}}}, "takes a non-empty list")
    _error({**TRAIN, "mode": "up"}, "'mode' must be min or max")
    _error({**TRAIN, "metric": "eval/fid"}, "metric 'eval/fid' is not one a train trial reports")
    _error({**TRAIN, "num_samples": 0}, "'num_samples' must be an integer >= 1")
    _error({**TRAIN, "name": "a b"}, "bad name 'a b'")
    _error({**TRAIN, "overrides": ["train.lr=1e-3"]}, "both searched (space) and fixed (overrides)")
    _error({"base": "demo", "space": {"train.workers": {"grid": [1, 2]}}}, "says how and where trials run")
    _error({"base": "demo", "space": {"tracking.experiment": {"grid": ["a"]}}}, "says how and where trials run")


def test_config_keys_and_every_candidate_go_through_the_config_loader():
    msg = _error({"base": "demo", "space": {"train.lrr": {"grid": [1e-3]}}}, "unknown config key 'train.lrr'")
    assert "did you mean 'lr'" in msg
    msg = _error({"base": "demo", "space": {"train.schedule": {"grid": ["cosine", "cosne"]}}},
                 "space.train.schedule = 'cosne'")
    assert "'cosine', 'constant', 'linear'" in msg
    _error({"base": "demo", "space": {"ctf.clusters": {"choice": [64, -1]}}}, ">= 1")
    _error({"base": "demo", "space": {"train.schedule": {"uniform": [0, 1]}}}, "is not a number")
    _error({"base": "demo", "space": {"ctf.clusters": {"uniform": [8.5, 64]}}}, "takes integers")
    spec = parse_spec({"base": "demo", "space": {"ctf.clusters": {"loguniform": [8, 256]},
                                                 "train.lr": {"uniform": [1e-4, 1e-3]},
                                                 "sample.knobs.order": {"choice": ["raster", "spiral-in"]}}})
    check_space(spec, load_config("demo"))
    ints = {d.key: d.integer for d in spec.space}
    assert ints == {"ctf.clusters": True, "train.lr": False, "sample.knobs.order": False}
    from ray import tune

    assert isinstance(spec.space[0].to_tune(), type(tune.lograndint(8, 257)))


def test_scheduler_and_register_are_checked():
    _error({**SAMPLE, "scheduler": "asha"}, "ASHA has nothing to stop early")
    _error({**TRAIN, "scheduler": "pbt"}, "scheduler 'pbt' is not supported")
    _error({**TRAIN, "scheduler": {"name": "asha", "grace": 3}}, "unknown scheduler key 'grace'")
    _error({**TRAIN, "scheduler": {"name": "asha", "max_t": 0}}, "in training steps")
    _error({**TRAIN, "scheduler": {"name": "asha", "reduction_factor": 1}}, "a number > 1")
    _error({**TRAIN, "scheduler": {"name": "asha", "metric": "eval/class_acc"}}, "not 'eval/class_acc'")
    _error({**TRAIN, "register": {"alias": "best"}}, "register.name is required")
    _error({**TRAIN, "register": {"name": "m", "alias": "2x"}}, "bad alias '2x'")
    _error({**SAMPLE, "register": {"alias": "latest"}}, "choose another alias")
    s = parse_spec({**TRAIN, "metric": "eval/class_acc", "scheduler": {"name": "asha", "grace_period": 50}})
    assert (s.scheduler.metric, s.scheduler.mode, s.scheduler.grace_period) == ("train/loss", "min", 50)


def test_plan_fixes_the_trial_resources_and_checks_asha_against_the_steps(tmp_path):
    raw = {**TRAIN, "overrides": ["train.steps=100", "train.log_every=5"], "num_samples": 3,
           "scheduler": {"name": "asha", "reduction_factor": 3}}
    plan = plan_sweep(parse_spec(raw), [f"workdir={tmp_path}", "train.workers=1"], cpus=2, gpus=0)
    assert plan.tokenize_first and plan.data_dir.startswith(str(tmp_path))  # no data yet: tokenized first
    assert plan.base.workdir == str(tmp_path.resolve())  # trials run in Tune's trial directories
    assert (plan.base.train.workers, plan.base.train.cpus_per_worker, plan.base.train.use_gpu) == (1, 0.9, False)
    assert plan.asha == {"time_attr": "step", "metric": "train/loss", "mode": "min", "max_t": 100, "grace_period": 25,
                         "reduction_factor": 3.0}
    bad = {**raw, "scheduler": {"name": "asha", "max_t": 50}}
    with pytest.raises(ConfigError, match="max_t=50 is below train.steps=100"):
        plan_sweep(parse_spec(bad), [f"workdir={tmp_path}"], cpus=2, gpus=0)
    with pytest.raises(UserError, match="no data set at"):
        plan_sweep(parse_spec({**raw, "data": str(tmp_path / "none")}), [f"workdir={tmp_path}"], cpus=2, gpus=0)
    with pytest.raises(UserError, match="--model goes with sample-time sweeps"):
        plan_sweep(parse_spec(raw), [f"workdir={tmp_path}"], model="models:/m@x", cpus=2, gpus=0)


def test_the_live_table_of_trials_shows_state_step_loss_and_metric():
    from types import SimpleNamespace

    from raygen.platform.sweep.driver import trial_table

    spec = parse_spec({**TRAIN, "metric": "eval/class_acc"})
    trials = [SimpleNamespace(trial_id="a_00000", status="RUNNING", last_result={"step": 120, "train/loss": 1.23456},
                              config={"train.lr": 0.001}),
              SimpleNamespace(trial_id="a_00001", status="TERMINATED",
                              last_result={"step": 300, "train/loss": 0.9, "eval/class_acc": 0.93},
                              config={"train.lr": 0.002}),
              SimpleNamespace(trial_id="a_00002", status="PENDING", last_result=None, config={"train.lr": 0.004})]
    assert trial_table(spec, trials, 95.0).splitlines() == [
        "sweep: 1 running after 1:35",
        "  trial    state    step  train/loss  eval/class_acc  values",
        "  a_00000  running  120   1.235       -               train.lr=0.001",
        "  a_00001  done     300   0.9         0.93            train.lr=0.002",
        "  a_00002  pending  -     -           -               train.lr=0.004",
    ]


def test_a_sweep_over_tokenizer_keys_tokenizes_one_data_set_per_value(tmp_path):
    raw = {**TRAIN, "space": {"tokenizer.palette.size": {"grid": [8, 16]}, "train.lr": {"grid": [1e-3, 2e-3]}}}
    plan = plan_sweep(parse_spec(raw), [f"workdir={tmp_path}", "train.workers=1"], cpus=2, gpus=0)
    assert plan.data_keys == ["tokenizer.palette.size"] and plan.tokenize_first
    root = tmp_path.resolve() / "data" / f"digits-palette-8-sweep-{plan.spec.name}"
    assert plan.data_dirs == {"palette.size=8": str(root / "palette.size=8"), "palette.size=16": str(root / "palette.size=16")}
    assert plan.data_dir_for({"tokenizer.palette.size": 16, "train.lr": 1e-3}) == str(root / "palette.size=16")
    from raygen.platform.sweep.driver import _tokenizations

    made = _tokenizations(plan)
    assert [(c.tokenizer.palette.size, c.data.shards) for c, _ in made] == [(8, str(root / "palette.size=8")),
                                                                          (16, str(root / "palette.size=16"))]
    with pytest.raises(ConfigError, match="changes the data set, so each value is tokenized"):
        plan_sweep(parse_spec({**raw, "space": {"tokenizer.palette.size": {"uniform": [8, 16]}}}),
                   [f"workdir={tmp_path}"], cpus=2, gpus=0)
    with pytest.raises(UserError, match="searches tokenizer.palette.size, so every trial's data set is tokenized"):
        plan_sweep(parse_spec({**raw, "data": str(tmp_path)}), [f"workdir={tmp_path}"], cpus=2, gpus=0)


@pytest.mark.parametrize("kw, want", [
    # 2 free CPUs (this machine): one CPU kept spare; one 1-worker trial at a time by default...
    (dict(cpus=2, gpus=0, trials=4), (1, 0.9, 1.0)),
    # ... two at once when each worker takes less
    (dict(cpus=2, gpus=0, trials=4, cpus_per_worker=0.4), (2, 0.4, 0.5)),
    (dict(cpus=2, gpus=0, trials=4, workers=2), (1, 0.45, 1.0)),
    (dict(cpus=16, gpus=0, trials=10, workers=2), (6, 1.0, 2.1)),
    (dict(cpus=16, gpus=0, trials=10, workers=2, cap=3), (3, 1.0, 2.1)),
    (dict(cpus=16, gpus=0, trials=2, workers=2), (2, 1.0, 2.1)),
    (dict(cpus=32, gpus=8, trials=10, workers=2), (4, 3.55, 7.2)),  # 2 GPUs + 2 x 3.55 CPUs each
])
def test_trial_concurrency_comes_from_free_resources(kw, want):
    r = plan_resources("train", **kw)
    assert (r.concurrency, r.cpus_per_worker, r.trial_cpus) == want
    assert r.tune == {"CPU": 0.1}
    assert r.concurrency * r.trial_cpus <= kw["cpus"] - r.spare_cpus + 1e-9 or r.concurrency == 1


def test_sample_trials_and_resources_that_do_not_fit():
    r = plan_resources("sample", cpus=2, gpus=0, trials=3)
    assert (r.concurrency, r.threads, r.tune) == (2, 1, {"CPU": 1.0})
    r = plan_resources("sample", cpus=8, gpus=0, trials=2)
    assert (r.concurrency, r.threads) == (2, 4)
    r = plan_resources("sample", cpus=16, gpus=2, trials=5)
    assert (r.concurrency, r.tune) == (2, {"CPU": 1.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="needs 4.1 CPUs"):
        plan_resources("train", cpus=2, gpus=0, trials=1, workers=4, cpus_per_worker=1.0)
    with pytest.raises(ConfigError, match="do not fit the cluster's 1 free GPUs"):
        plan_resources("train", cpus=8, gpus=1, trials=1, workers=2)


def test_trial_config_and_candidates():
    spec = parse_spec({"base": "demo", "space": {"train.lr": {"grid": [1e-3, 2e-3]},
                                                 "train.schedule": {"choice": ["cosine", "linear"]}}})
    assert one_at_a_time(spec) == [{"train.lr": 1e-3, "train.schedule": "cosine"},
                                   {"train.lr": 2e-3, "train.schedule": "cosine"},
                                   {"train.lr": 1e-3, "train.schedule": "linear"}]
    cfg = trial_config(load_config("demo"), {"train.lr": 2e-3, "sample.knobs.order": "raster"})
    assert cfg.train.lr == 2e-3 and cfg.sample.knobs == {"order": "raster"} and cfg.train.steps == 600
    assert spec.trials == 2 and yaml.safe_load(spec.to_yaml())["space"]["train.lr"] == {"grid": [1e-3, 2e-3]}


def test_results_table_puts_the_best_finished_trial_first():
    spec = parse_spec({**TRAIN, "metric": "eval/class_acc"})
    rows = [TrialRow("ab_00000", {"train.lr": 1e-3}, "finished", {"eval/class_acc": 0.5, "train/loss": 1.0}, 8, 30.0, "r0"),
            TrialRow("ab_00001", {"train.lr": 1e-2}, "finished", {"eval/class_acc": 0.9, "train/loss": 1.1}, 8, 31.0, "r1"),
            TrialRow("ab_00002", {"train.lr": 1e-7}, "stopped", {"train/loss": 2.8}, 4, 12.0, "r2"),
            TrialRow("ab_00003", {"train.lr": 5e-2}, "error", {}, None, None, None, "RuntimeError: boom")]
    text = format_table(rows, spec, rows[1])
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "status", "train.lr", "eval/class_acc", "train/loss", "steps", "time", "run"]
    assert lines[2].startswith("00001 *") and lines[3].startswith("00000") and "stopped@4" in lines[4]
    assert "* best: eval/class_acc 0.9 (max) with train.lr=0.01" in text
    assert "trial ab_00003 failed: RuntimeError: boom" in text


def test_cli_errors_are_one_line(run_cli, tmp_path):
    code, _, err = run_cli("sweep", "lr-schedul")
    assert code == 2 and "unknown sweep spec 'lr-schedul'" in err and "did you mean 'lr-schedule'" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "demo", "space": {"train.lr": {"grid": [1e-3]}}, "scheduler": "hyperband"}))
    code, _, err = run_cli("sweep", str(bad))
    assert code == 2 and err.strip().splitlines() == [
        f"raygen: error: sweep spec '{bad}': scheduler 'hyperband' is not supported; use asha or none"]
    code, out, err = run_cli("sweep", "lr-schedule", "--dry-run", f"workdir={tmp_path}", "train.steps=300")
    assert code == 0, err
    assert "trials: 6 (2 sample(s) x 3 grid point(s))" in out and "grace 150 steps, max_t 300" in out
    assert "tracking: sqlite:///" in out and "a local mlflow server fronts it" in out
    assert "register: best trial -> models:/digits-ar@best-lr" in out
    code, _, err = run_cli("sweep", "lr-schedule", "--dry-run", f"workdir={tmp_path}", "train.lr=1e-3")
    assert code == 2 and "'train.lr' is searched by sweep lr-schedule" in err
    code, out, _ = run_cli("config", "--presets")
    assert "sweeps/lr-schedule" in out and "sweeps/arpg-cfg" in out


def test_local_server_that_cannot_start_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from raygen.platform.tracking import LocalServer

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Error: address already in use' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    server = LocalServer(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path), tmp_path / "logs")
    with pytest.raises(UserError) as e:
        server.wait(timeout=20)
    assert "exited with code 3" in e.value.message and "address already in use" in e.value.message
    assert str(server.log_path) in e.value.message

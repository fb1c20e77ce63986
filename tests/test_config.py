"""The typed config tree: presets, overrides and the errors users see."""

from __future__ import annotations

import pytest
import yaml

from raygen.config import Config, describe_keys, load_config, parse_override, preset_names
from raygen.errors import ConfigError


def test_defaults_are_the_embedded_digits_setup():
    cfg = load_config()
    assert (cfg.data.source, cfg.tokenizer.name) == ("digits", "palette")
    assert cfg.data.image_size is None  # resolved from the tokenizer: a 16x16 grid


def test_overrides_are_typed():
    cfg = load_config(overrides=["data.image_size=8", "data.resize=false", "tokenizer.vq.ch_mult=[1,2]",
                                 "ray.address=null", "seed=3"])
    assert cfg.data.image_size == 8 and cfg.data.resize is False
    assert cfg.tokenizer.vq.ch_mult == (1, 2)
    assert cfg.ray.address is None and cfg.seed == 3


def test_override_parsing():
    assert parse_override("a.b=3e-4") == ("a.b", pytest.approx(3e-4))
    assert parse_override("a=hello.png") == ("a", "hello.png")
    assert parse_override("a=None") == ("a", None)
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("novalue")


def test_unknown_key_names_it_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.imag_size=8"])
    msg = str(e.value)
    assert "'data.imag_size'" in msg
    assert "channels, classes, image_size, on_bad_input" in msg
    assert "did you mean 'image_size'" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="valid keys at the top level: ctf, data, dvae, eval, model, ray, sample, seed, tokenizer, tracking, train, vae, workdir"):
        load_config(overrides=["tokeniser.name=vq"])


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("data.source=imagenet", "one of 'digits', 'folder', 'parquet'"),
        ("data.image_size=big", "an integer or null"),
        ("data.image_size=0", ">= 1"),
        ("data.channels=2", "one of 1, 3 or null"),
        ("data.resize=maybe", "true or false"),
        ("tokenizer.vq.ch_mult=4", "a list of an integer"),
    ],
)
def test_bad_value_names_key_value_and_allowed(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert f"'{key}'" in str(e.value) and value in str(e.value) and allowed in str(e.value)


def test_section_validation_runs_after_merge():
    with pytest.raises(ConfigError, match="tokenizer.vq.*multiple of 32"):
        load_config(overrides=["tokenizer.vq.ch=48"])


def test_preset_with_base_and_errors(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data:\n  image_size: 8\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\ndata:\n  rows_per_shard: 100\n")
    cfg = load_config(str(child), ["data.rows_per_shard=7"])
    assert (cfg.data.image_size, cfg.data.rows_per_shard) == (8, 7)
    with pytest.raises(ConfigError, match="unknown preset 'dem'.*did you mean 'demo'"):
        load_config("dem")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2]\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(bad))
    assert "demo" in preset_names()


def test_every_preset_loads():
    for name in preset_names():
        assert isinstance(load_config(name), Config)


def test_every_key_has_help():
    rows = describe_keys()
    assert len(rows) > 15
    missing = [k for k, _, _, h in rows if not h and not k.startswith("tokenizer.vq.")]
    assert missing == []


def test_cli_dry_run_prints_resolved_config(run_cli):
    code, out, _ = run_cli("tokenize", "--dry-run", "--tokenizer", "vq", "data.rows_per_shard=9")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["tokenizer"]["name"] == "vq" and resolved["data"]["rows_per_shard"] == 9
    assert "data.image_size: 256" in out  # 16x16 grid at the VQ's f=16


def test_cli_user_error_is_one_line_exit_2(run_cli):
    code, out, err = run_cli("tokenize", "data.imag_size=8")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("raygen: error: unknown config key 'data.imag_size'")


def test_cli_debug_shows_the_traceback(run_cli):
    with pytest.raises(ConfigError):
        run_cli("tokenize", "data.imag_size=8", "--debug")


def test_cli_usage_error_is_one_line(capsys):
    from raygen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tokenize", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-such-flag" in err


def test_overrides_may_follow_options(run_cli):
    code, out, _ = run_cli("tokenize", "--dry-run", "data.rows_per_shard=9", "--tokenizer", "vq", "seed=4")
    resolved = yaml.safe_load(out)
    assert code == 0 and resolved["seed"] == 4 and resolved["data"]["rows_per_shard"] == 9


def test_models_job_takes_no_overrides(capsys):
    from raygen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["models", "list", "seed=3"])
    assert e.value.code == 2 and "unrecognized arguments: seed=3" in capsys.readouterr().err

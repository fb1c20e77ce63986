"""The family plugin contract: the platform never names a family, plugins declare what it needs."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from raygen import families
from raygen.errors import ConfigError, UserError
from raygen.families import DataInfo

ROOT = Path(__file__).resolve().parents[1]
# the built-in plugins plus the two families still to come
FAMILY_NAMES = sorted({*(n for n in families.FAMILIES if "-" not in n), "emigm", "d2it"})


def test_no_platform_or_jobs_file_names_a_family():
    """A family reaches the platform only through its plugin: no name in code, strings or comments."""
    word = re.compile(r"\b(" + "|".join(FAMILY_NAMES) + r")\b", re.IGNORECASE)
    hits = []
    for part in ("platform", "jobs"):
        for f in sorted((ROOT / "raygen" / part).rglob("*.py")):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if word.search(line):
                    hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []


def test_every_registered_model_family_has_a_plugin_and_back():
    from raygen.models.registry import MODEL_REGISTRY

    assert {"ar", "arpg", "nar", "ctf"} <= set(families.FAMILIES)
    for name in families.FAMILIES:
        assert name in MODEL_REGISTRY
    for name in ("ar", "arpg", "nar", "ctf"):
        assert families.module_of(name) == f"raygen.families.{name}"
    with pytest.raises(ConfigError, match="unknown model family 'nope'; known: .*arpg"):
        families.get("nope")


def test_arpg_knob_choices_are_the_models_own():
    from raygen.families.arpg import ARPGKnobs
    from raygen.models.arpg import CFG_SCHEDULES, ORDERS, SCHEDULES

    hints = typing.get_type_hints(ARPGKnobs)
    assert typing.get_args(hints["order"]) == ORDERS
    assert typing.get_args(hints["schedule"]) == SCHEDULES
    assert typing.get_args(hints["cfg_schedule"]) == CFG_SCHEDULES


@pytest.mark.parametrize("family, knobs, message", [
    ("arpg", {"order": "diagonal"}, r"bad value for 'sample.knobs.order': 'diagonal'; allowed: one of 'random'"),
    ("arpg", {"oder": "raster"}, r"unknown config key 'sample.knobs.oder'.*did you mean 'order'"),
    ("nar", {"cfg_interval": -3}, r"bad value for 'sample.knobs.cfg_interval': -3; allowed: >= -1"),
    ("ctf", {"fine_top_p": 2}, r"bad value for 'sample.knobs.fine_top_p': 2; allowed: 0 <= value <= 1"),
    ("ar", {"order": "raster"}, r"unknown sample.knobs order: family ar has no sampling knobs"),
])
def test_sampling_knobs_are_typed_and_refused_as_config_errors(family, knobs, message):
    with pytest.raises(ConfigError, match=message):
        families.get(family).check_knobs(knobs)


def test_knobs_become_the_models_keywords():
    from raygen.families.arpg import ARPGKnobs

    knobs = families.get("arpg").check_knobs({"order": "SPIRAL-IN"})
    assert knobs == ARPGKnobs(order="spiral-in")
    assert families.get("arpg").generate_kwargs(None, knobs) == {"order": "spiral-in", "schedule": "arccos",
                                                               "cfg_schedule": "linear"}


def test_common_sampling_options_are_bounded_where_the_config_is_parsed():
    from raygen.config import load_config

    with pytest.raises(ConfigError, match=r"'sample.top_p': 2; allowed: 0 <= value <= 1"):
        load_config(None, ["sample.top_p=2"])


def test_a_familys_section_and_path_keys_are_part_of_the_config_tree():
    from raygen.config import Config, describe_keys, load_config
    from raygen.options import path_keys

    keys = {k for k, *_ in describe_keys()}
    assert {"ctf.clusters", "ctf.lookup", "ctf.seed", "ctf.iters"} <= keys
    assert {"data.path", "data.shards", "ctf.lookup", "eval.reference", "eval.inception_weights"} <= set(
        path_keys(Config()))
    with pytest.raises(ConfigError, match=r"bad value for 'ctf.clusters': 0; allowed: >= 1"):
        load_config(None, ["ctf.clusters=0"])


def test_plugins_add_their_cli_verbs_and_register_options():
    from raygen.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["cluster", "--clusters", "8"])
    assert args.clusters == 8 and args.func.__module__ == "raygen.families.ctf"
    args = parser.parse_args(["models", "register", "RUN", "--name", "n", "--stage2", "RUN2"])
    assert args.stage2 == "RUN2"


def test_a_family_refuses_data_of_another_kind():
    ids = DataInfo(kind="ids", column="tokens", grid=(4, 4), num_classes=10, vocab_size=16)
    latents = DataInfo(kind="latents", column="latents", grid=(4, 4), num_classes=10, token_dim=3)
    assert families.get("ar").arch_from_data(ids) == {"vocab_size": 16, "num_classes": 10, "grid_size": 4}
    with pytest.raises(UserError, match=r"holds latents \(latents\); family ar trains on ids"):
        families.get("ar").check_data(latents, "data set 'x'")
    with pytest.raises(UserError, match="the ar models need a square grid"):
        families.get("ar").arch_from_data(DataInfo(kind="ids", column="tokens", grid=(4, 2), num_classes=2,
                                                   vocab_size=3))


def test_a_family_from_outside_raygen_registers_like_the_builtins():
    import latent_family  # noqa: F401 - registers `latent-mean`

    fam = families.get("latent-mean")
    assert fam.data_kind == "latents" and families.module_of("latent-mean") == "latent_family"
    latents = DataInfo(kind="latents", column="latents", grid=(8, 8), num_classes=10, token_dim=1)
    arch = fam.arch_from_data(latents)
    assert arch == {"token_dim": 1, "num_classes": 10, "grid_size": 8}
    model = fam.build("debug", arch)
    assert model.num_params() == 2 * 10 * 64
    with pytest.raises(ValueError, match="already registered"):
        families.register(type("Other", (families.Family,), {"name": "latent-mean"})())

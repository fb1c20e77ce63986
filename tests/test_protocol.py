"""`raygen eval --protocol paper[:KEY]`: which paper row an export gets, the flags it becomes, and
which settings of a final config depart from it (raygen.platform.evaluate.protocol)."""

from __future__ import annotations

import pytest

from raygen import families
from raygen.config import load_config
from raygen.errors import ConfigError, UserError
from raygen.platform.evaluate import protocol


def _meta(family: str, size: str, image_size: int = 256, **extra) -> dict:
    return {"family": family, "size": size, "tokenizer": {"image_size": image_size, "channels": 3},
            "model_config": {}, **extra}


@pytest.mark.parametrize("name", ["ar", "arpg", "nar", "emigm", "d2it"])
def test_paper_takes_the_first_row_of_the_models_size_and_paper_key_another(name):
    rows = families.get(name).paper_rows
    for size in dict.fromkeys(r.size for r in rows):
        mine = [r for r in rows if r.size == size]
        assert protocol.protocol_row(_meta(name, size), "paper") is mine[0]
        assert protocol.protocol_row(_meta(name, size), f"paper:{mine[-1].key}") is mine[-1]


def test_a_ctf_pair_is_its_stage_1_size_and_a_lone_stage_is_refused():
    rows = families.get("ctf").paper_rows
    pair = _meta("ctf", "L+aux-L", kind="ctf-pair")
    assert protocol.protocol_row(pair, "paper") is [r for r in rows if r.size == "L"][0]
    with pytest.raises(UserError, match=r"size B \(stage 1 alone, not a pair\); the paper's table has rows for sizes"):
        protocol.protocol_row(_meta("ctf", "B", model_config={"stage": 1}), "paper")


def test_what_the_protocol_refuses():
    with pytest.raises(ConfigError, match="the protocols are 'paper'"):
        protocol.protocol_row(_meta("arpg", "L"), "adm")
    with pytest.raises(UserError, match="the model is arpg size digits; the paper's table has rows for sizes L, XL, XXL"):
        protocol.protocol_row(_meta("arpg", "digits"), "paper")
    with pytest.raises(UserError, match=r"--protocol paper:nope: arpg L has rows 64-steps, 32-steps"):
        protocol.protocol_row(_meta("arpg", "L"), "paper:nope")
    with pytest.raises(UserError, match="is at 256x256; the model makes 512x512 images"):
        protocol.protocol_row(_meta("arpg", "L", image_size=512), "paper")
    with pytest.raises(UserError, match="family vae declares no paper table rows"):
        protocol.protocol_row(_meta("vae", "digits"), "paper")


def test_the_row_becomes_config_flags_and_overrides_are_reported_as_departures():
    row = protocol.protocol_row(_meta("arpg", "L"), "paper")  # 64 steps, arccos, linear CFG
    flags = protocol.settings(row)
    assert flags["eval.n"] == 50_000 and flags["sample.labels"] == "all" and flags["sample.steps"] == 64
    assert flags["sample.knobs.schedule"] == "arccos" and flags["sample.knobs.cfg_schedule"] == "linear"
    model_defaults = {"sample.cfg_scale": 2.0, "sample.steps": 32, "sample.knobs": {"order": "raster"}}
    cfg = load_config(None, [], **{**model_defaults, **flags})
    assert protocol.departures(cfg, row) == []
    assert cfg.sample.knobs["order"] == "random"  # the row names every knob: the model's own are replaced
    cfg = load_config(None, ["sample.cfg_scale=3", "eval.n=1000"], **{**model_defaults, **flags})
    assert protocol.departures(cfg, row) == ["eval.n=1000 (the paper: 50000)",
                                             f"sample.cfg_scale=3.0 (the paper: {row.sample['cfg_scale']})"]
    rec = protocol.record(row, protocol.departures(cfg, row))
    assert rec["name"] == "paper:64-steps" and rec["scores"]["fid"] == row.fid and len(rec["changed"]) == 2


def test_the_paper_table_puts_each_papers_row_under_the_model_that_reproduced_it():
    from raygen.platform.evaluate.scoring import format_paper_table

    row = protocol.protocol_row(_meta("nar", "L"), "paper")
    entries = [{"model": "raygen nar L (models:/nar-l/3)", "params": 372_000_000, "steps": 31,
                "metrics": {"eval/fid": 3.1234, "eval/sfid": 5.5, "eval/is": 260.04, "eval/precision": 0.8,
                            "eval/recall": 0.5}, "images_per_s": 12.34, "protocol": protocol.record(row, [])},
               {"model": "raygen nar L (runs:/abc)", "params": None, "steps": "default", "metrics": {"eval/fid": 9.0},
                "images_per_s": None, "protocol": protocol.record(row, ["sample.cfg_scale=3.0 (the paper: 2.0)"])}]
    head, ours, paper, ours2, paper2, star, speed = format_paper_table(entries).splitlines()
    assert head.split() == ["model", "params", "steps", "FID", "sFID", "IS", "Prec", "Rec", "img/s"]
    assert ours.split()[-8:] == ["372.0M", "31", "3.12", "5.50", "260.0", "0.80", "0.50", "12.3"]
    assert paper.startswith("  paper NAR-L ") and paper.split()[-8:-6] == [row.params, "31"]
    assert paper.split()[-6] == f"{row.fid:.2f}" and paper.split()[-5] == "-"  # the paper gives no sFID
    assert ours2.split()[-8:] == ["-", "default", "9.00", "-", "-", "-", "-", "-"]
    assert paper2.startswith("  paper NAR-L *") and star.startswith("* evaluated with settings that differ")
    assert speed.startswith("paper img/s come from the paper's hardware")

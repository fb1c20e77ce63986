"""Family `arpg` against the OFFICIAL ARPG code (hp-l33/ARPG): an official state dict, converted by
`from_official`, loads strictly and reproduces the official teacher-forced logits.

`fixtures/arpg_tiny_official.pt` is made by `fixtures/make_arpg_official.py` (run by hand against
the official tree; its docstring has the commit and the command): a tiny official model (V 16,
C 10, 8x8 grid, dim 64, 2 + 2 blocks, 2 heads) with every weight re-drawn, its checkpoint in the
official container ({"model": state_dict}), fixed tokens, labels [1, 7, 10] (10 = the null class),
one generation order per row, and the official training forward's logits and loss for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raygen.models import build_model
from raygen.models.arpg import ARPGModel, from_official, official_arch

FIXTURE = Path(__file__).parent / "fixtures" / "arpg_tiny_official.pt"
NO_DROPOUT = dict(resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0, class_dropout=0.0)


@pytest.fixture(scope="module")
def fx() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def _model(fx: dict) -> ARPGModel:
    c = fx["config"]
    grid = int(c["block_size"] ** 0.5)
    model = build_model("arpg", "debug", vocab_size=c["vocab_size"], num_classes=c["num_classes"], grid_size=grid,
                        dim=c["dim"], n_layer=c["n_layer"], n_head=c["n_head"], **NO_DROPOUT)  # rope_base 1e4 both
    return model.eval()


@pytest.fixture(scope="module")
def converted(fx) -> dict[str, torch.Tensor]:
    return from_official(fx["checkpoint"]["model"], _model(fx).config)


def test_official_checkpoint_loads_strictly_and_matches_the_official_logits(fx, converted):
    model = _model(fx)
    model.load_state_dict(converted, strict=True)
    # the official label convention: label C (= 10) is shifted to V + 1 + C, the null class; ours is the same
    assert fx["labels"][-1].item() == model.config.num_classes
    logits = model.teacher_forced_logits(fx["tokens"], labels=fx["labels"], order=fx["order"])  # (B, N, V)
    assert logits.shape == fx["logits"].shape
    torch.testing.assert_close(logits, fx["logits"], atol=1e-5, rtol=1e-5)
    # the official loss: cross-entropy on the tokens taken in the same order
    targets = fx["tokens"].gather(1, fx["order"])  # (B, N)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, fx["loss"], atol=1e-5, rtol=1e-5)


def test_the_logits_depend_on_every_input(fx, converted):
    """The fixture discriminates: another order, label or q/k/v stacking changes the logits."""
    model = _model(fx)
    model.load_state_dict(converted, strict=True)
    tokens, labels, order = fx["tokens"], fx["labels"], fx["order"]
    for kw in (dict(order=order.flip(1)), dict(labels=labels.roll(1))):
        other = model.teacher_forced_logits(tokens, **{"labels": labels, "order": order, **kw})
        assert (other - fx["logits"]).abs().max() > 0.1
    state = dict(converted)
    q, k, v = state["self_layers.0.attention.wqkv.weight"].chunk(3)
    state["self_layers.0.attention.wqkv.weight"] = torch.cat([k, q, v])  # the wrong row order
    model.load_state_dict(state, strict=True)
    other = model.teacher_forced_logits(tokens, labels=labels, order=order)
    assert (other - fx["logits"]).abs().max() > 0.1


def test_official_arch_reads_the_fixture(fx):
    c = fx["config"]
    arch = official_arch(fx["checkpoint"]["model"])
    assert arch == {"dim": c["dim"], "n_layer": c["n_layer"], "vocab_size": c["vocab_size"],
                    "num_classes": c["num_classes"]}


def test_mapping(fx, converted):
    state = fx["checkpoint"]["model"]
    dim = fx["config"]["dim"]
    assert "self_layers.1.attention.wqkv.weight" in converted and converted["output.weight"] is state["head.weight"]
    torch.testing.assert_close(converted["self_layers.1.attention.wqkv.weight"][dim : 2 * dim],
                               state["layers.self_dec.1.attn.to_k.weight"], atol=0, rtol=0)  # rows [q | k | v]
    assert converted["kv_norm.weight"] is state["layers.norm.weight"]
    assert converted["cross_layers.1.attention.wq.weight"] is state["layers.cross_dec.1.attn.to_q.weight"]
    # a RoPE table is dropped; unknown keys and an incomplete q/k/v trio keep their official names
    extra = {**state, "freqs_cis": torch.zeros(65, 16, 2), "layers.extra.weight": torch.zeros(1)}
    del extra["layers.self_dec.0.attn.to_v.weight"]
    out = from_official(extra, _model(fx).config)
    assert "freqs_cis" not in out and "layers.extra.weight" in out
    assert {"layers.self_dec.0.attn.to_q.weight", "layers.self_dec.0.attn.to_k.weight"} <= set(out)
    assert "self_layers.0.attention.wqkv.weight" not in out


@pytest.mark.parametrize("case", ["wrong_shape", "missing", "unexpected"])
def test_a_bad_state_dict_fails_a_strict_load_naming_the_key(fx, case):
    state = dict(fx["checkpoint"]["model"])
    if case == "wrong_shape":
        state["head.weight"] = state["head.weight"][:-1]  # V - 1 rows
        key = "output.weight"
    elif case == "missing":
        del state["layers.cross_dec.1.ffn.w2.weight"]
        key = "cross_layers.1.feed_forward.w2.weight"
    else:
        state["layers.self_dec.0.attn.rel_bias"] = torch.zeros(2)  # a key the mapping does not know
        key = "layers.self_dec.0.attn.rel_bias"
    model = _model(fx)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        model.load_state_dict(from_official(state, model.config), strict=True)

"""Autoencoder loss parts against the official code: taming's PatchGAN discriminator and GAN losses,
lpips' LPIPS-VGG16.

`fixtures/ae_losses_official.pt` (made by `fixtures/make_ae_losses.py`, run in a scratch venv with
taming-transformers @3ba01b24, lpips 0.1.4, torchvision 0.28, torch 2.13) holds numbers only: the
official discriminator's state dict (ndf 8) with its eval/train-mode outputs, taming's hinge/vanilla
losses on fixed logits, and LPIPS' distances, per-layer terms and input gradient. The LPIPS weights
are not stored: `official_weights` (in the script) redraws them from a seed in the official key
formats, checked here against the stored per-tensor checksums.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from raygen.models.tokenizers.ae_losses import (
    PatchDiscriminator,
    Perceptual,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    main,
    vanilla_d_loss,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_ae_losses", FIXTURES / "make_ae_losses.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fx() -> dict:
    return torch.load(FIXTURES / "ae_losses_official.pt", weights_only=True)


@pytest.fixture(scope="module")
def official(fx) -> tuple[dict, dict]:
    """(lpips-format lin dict, torchvision-format features dict), as the official model had them."""
    lp = fx["lpips"]
    weights = _load_script().official_weights(lp["seed"], lp["listing"])
    for key, total in lp["checksums"].items():
        assert math.isclose(float(weights[key].double().abs().sum()), total, rel_tol=1e-12), key
    return ({k: v for k, v in weights.items() if k.startswith("lin")},
            {k: v for k, v in weights.items() if k.startswith("features.")})


@pytest.fixture(scope="module")
def lpips_file(official, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.pt"
    torch.save(Perceptual.convert_official(*official), path)
    return path


@pytest.fixture(scope="module")
def perceptual(lpips_file) -> Perceptual:
    return Perceptual.from_file(lpips_file)


# --- discriminator -----------------------------------------------------------------------------


def test_official_discriminator_loads_strictly_and_matches(fx):
    d = fx["disc"]
    disc = PatchDiscriminator(**d["config"])
    disc.load_state_dict(d["state_dict"], strict=True)
    with torch.no_grad():
        out = disc.eval()(d["x"])  # (2, 1, 6, 6)
        assert out.shape == (2, 1, 6, 6)
        torch.testing.assert_close(out, d["eval_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(disc.train()(d["x"]), d["train_out"], atol=1e-5, rtol=0)
    state = disc.state_dict()
    for key, value in d["running_after_train"].items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0)


def test_discriminator_layout_and_group_norm():
    disc = PatchDiscriminator(3, ndf=64, n_layers=3)
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.0.bias"] == (64,)
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.8.weight"] == (512, 256, 4, 4) and shapes["main.9.running_var"] == (512,)
    assert shapes["main.11.weight"] == (1, 512, 4, 4)
    # 3*64*16 + 64 + 64*128*16 + 2*128 + 128*256*16 + 2*256 + 256*512*16 + 2*512 + 512*16 + 1
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    g = PatchDiscriminator(1, ndf=48, n_layers=2, norm="group")
    assert [m.num_groups for m in g.modules() if isinstance(m, torch.nn.GroupNorm)] == [32, 32]  # 96, 192 wide
    x = torch.rand(3, 1, 32, 32) * 2 - 1  # (B, C, H, W)
    assert g(x).shape == (3, 1, 6, 6)
    assert g.eval()(x[:1]).shape == (1, 1, 6, 6)
    assert not any("running" in k for k in g.state_dict())
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="instance")


def test_seeded_init_is_deterministic():
    a, b = PatchDiscriminator(ndf=16), PatchDiscriminator(ndf=16)
    torch.manual_seed(99)  # the global RNG plays no part
    c = PatchDiscriminator(ndf=16).initialize_weights(0)
    d = PatchDiscriminator(ndf=16).initialize_weights(1)
    for (k, va), vb, vc, vd in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(),
                                   d.state_dict().values()):
        assert torch.equal(va, vb) and torch.equal(va, vc), k
        if "running" not in k and va.count_nonzero() > 0:  # all but the norm shifts (0) and BN stats
            assert not torch.equal(va, vd), k
    w = torch.cat([a.main[i].weight.flatten() for i in (0, 2, 5, 8, 11)])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert abs(a.main[3].weight.mean().item() - 1) < 0.01 and torch.all(a.main[3].bias == 0)
    assert a.main[0].bias.abs().max() <= 1 / math.sqrt(3 * 16)


# --- GAN losses ----------------------------------------------------------------------------------


def test_gan_losses_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])
    fake = torch.tensor([-2.0, 0.0, 1.0, -0.5])
    # relu(1 - real) = [0, .5, 2, 1] -> .875; relu(1 + fake) = [0, 1, 2, .5] -> .875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.875)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    want = 0.5 * (sum(sp(-r) for r in real.tolist()) / 4 + sum(sp(f) for f in fake.tolist()) / 4)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(want, rel=1e-6)
    assert generator_loss(fake).item() == pytest.approx(0.375)
    assert hinge_d_loss(real, fake).dim() == 0 and generator_loss(fake.view(2, 1, 1, 2)).dim() == 0


def test_gan_losses_match_taming(fx):
    g = fx["gan"]
    torch.testing.assert_close(hinge_d_loss(g["logits_real"], g["logits_fake"]), g["hinge"], atol=1e-6, rtol=0)
    torch.testing.assert_close(vanilla_d_loss(g["logits_real"], g["logits_fake"]), g["vanilla"], atol=1e-6, rtol=0)


def test_adaptive_weight_hand_computed():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (3 * w).sum()  # grad (3, 3): norm 3 sqrt 2
    gen = (w * torch.tensor([4.0, 0.0])).sum()  # grad (4, 0): norm 4
    out = adaptive_weight(rec, gen, w)
    assert out.item() == pytest.approx(3 * math.sqrt(2) / (4 + 1e-4)) and not out.requires_grad
    rec.backward()  # the graphs survive
    assert adaptive_weight((w * 1e9).sum(), (w * 0).sum(), w, max_weight=5.0).item() == 5.0


# --- LPIPS -----------------------------------------------------------------------------------------


def test_lpips_matches_official(fx, perceptual):
    lp = fx["lpips"]
    x0 = lp["x0"].clone().requires_grad_(True)
    per_layer = perceptual.layer_distances(x0, lp["x1"])  # (2, 5)
    torch.testing.assert_close(per_layer, lp["per_layer"], atol=1e-6, rtol=1e-5)
    dist = perceptual(x0, lp["x1"])  # (2,)
    assert dist.shape == (2,)
    torch.testing.assert_close(dist, lp["dist"], atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(dist.sum(), x0)
    torch.testing.assert_close(grad, lp["grad_x0"], atol=1e-7, rtol=1e-4)
    with torch.no_grad():  # a gray x0 against RGB x1: the official ScalingLayer broadcasts the channel
        torch.testing.assert_close(perceptual(lp["x0"][:, :1], lp["x1"]), lp["dist_gray_x0"], atol=1e-5, rtol=1e-5)


def test_lpips_properties(fx, perceptual):
    x0, x1 = fx["lpips"]["x0"], fx["lpips"]["x1"]
    with torch.no_grad():
        assert torch.equal(perceptual(x0, x0), torch.zeros(2))
        torch.testing.assert_close(perceptual(x0, x1), perceptual(x1, x0), atol=1e-6, rtol=1e-6)
        gray0, gray1 = x0[:, :1], x1[:, 1:2]  # (2, 1, 32, 32)
        torch.testing.assert_close(perceptual(gray0, gray1), perceptual(gray0.expand(-1, 3, -1, -1),
                                                                         gray1.expand(-1, 3, -1, -1)), atol=0, rtol=0)
        assert (perceptual(x0, x1) > 0).all()
    with pytest.raises(ValueError, match="differ"):
        perceptual(x0, x1[:, :, :16])
    with pytest.raises(ValueError, match="1 or 3"):
        perceptual(x0[:, :2], x1[:, :2])


def test_lpips_frozen_gradients_reach_inputs_only(fx, perceptual):
    x0, x1 = (fx["lpips"][k].clone().requires_grad_(True) for k in ("x0", "x1"))
    perceptual.train()
    assert not perceptual.training and not any(p.requires_grad for p in perceptual.parameters())
    perceptual(x0, x1).sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0 and x1.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.parameters())


def test_lpips_file_errors(official, lpips_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        Perceptual.from_file(tmp_path / "nowhere.pt")
    good = torch.load(lpips_file, weights_only=True)
    assert len(good) == 31 and list(good)[:2] == ["features.0.weight", "features.0.bias"]
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "lins.3.weight"}, "lins.3.weight (1, 512, 1, 1)"),
        "shape": ({**good, "lins.0.weight": torch.zeros(1, 32, 1, 1)},
                  "lins.0.weight (1, 32, 1, 1) (expected (1, 64, 1, 1))"),
        "official": ({**official[0], **official[1]}, "lin0.model.1.weight"),  # unconverted keys
        "tensor": (torch.zeros(3), "not a state dict"),
    }
    for name, (state, needle) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(ValueError) as info:
            Perceptual.from_file(path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and needle in msg, msg
    (tmp_path / "junk.pt").write_text("not a checkpoint\nsecond line\n")
    with pytest.raises(ValueError, match="junk.pt") as info:
        Perceptual.from_file(tmp_path / "junk.pt")
    assert "\n" not in str(info.value)


def test_convert_accepts_full_official_state_dicts(fx, official, perceptual):
    lins, feats = official
    slice_of = lambda i: 1 + sum(i >= t for t in (4, 9, 16, 23))  # noqa: E731
    full_lpips = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), **lins,
                  **{f"lins.{k[3]}.model.1.weight": v for k, v in lins.items()},
                  **{f"net.slice{slice_of(int(k.split('.')[1]))}.{k.split('.', 1)[1]}": v for k, v in feats.items()}}
    bare_tv = {k.split(".", 1)[1]: v for k, v in feats.items()}  # vgg16().features.state_dict() keys
    tv_full = {**feats, "features.30.weight": torch.zeros(1), "classifier.0.weight": torch.zeros(4096, 25088)}
    for lp, vgg in ((full_lpips, {}), (lins, bare_tv), (lins, tv_full)):
        state = Perceptual.convert_official(lp, vgg)
        assert all(torch.equal(state[k], v) for k, v in perceptual.state_dict().items())
    with pytest.raises(ValueError, match="26 missing: features.0.weight"):
        Perceptual.convert_official(lins, {})


def test_convert_cli(official, tmp_path, capsys):
    torch.save(official[0], tmp_path / "vgg.pth")
    torch.save({**official[1], "classifier.6.bias": torch.zeros(1000)}, tmp_path / "vgg16.pth")
    main(["convert", "--lpips", str(tmp_path / "vgg.pth"), "--vgg", str(tmp_path / "vgg16.pth"),
          "--out", str(tmp_path / "one.pt")])
    assert "31 tensors, 14,716,160 values" in capsys.readouterr().out
    model = Perceptual.from_file(tmp_path / "one.pt")
    assert torch.equal(model.lins[4].weight, official[0]["lin4.model.1.weight"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["convert", "--lpips", str(tmp_path / "absent.pth"), "--vgg", "x", "--out", "y"])

"""MAR's KL-16 autoencoder: official key/shape layout, strict loading, the tokenizer, a known answer.

`fixtures/kl_tiny_official.pt` holds numbers only: MAR's own `models/vae.py` (LTH14/mar @fe470ac),
run outside this repository at a tiny config (ch 32, ch_mult (2, 1), 1 res block, 4 latent
channels, 16 px RGB, encoder attention at 8 px) with seeded random fp16-exact weights, two of the
logvar biases pushed past LDM's clamp; it stores that state dict (fp16), the input, the posterior
mean/logvar and KL, a sample drawn after `torch.manual_seed(123)`, and both decodings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raygen.models.tokenizers.kl import KL_SIZES, KLAutoencoder, KLConfig, KLTokenizer, load_kl_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LISTING_NAME = "mar_kl16_state_dict.txt"
SHARED_LISTING = ROOT.parent / "shared" / "docs" / LISTING_NAME


def _listing_path() -> Path:
    for path in (FIXTURES / LISTING_NAME, SHARED_LISTING):
        if path.exists():
            return path
    pytest.skip(f"no {LISTING_NAME} in {FIXTURES} or {SHARED_LISTING.parent}")


def parse_listing(path: Path) -> tuple[dict[str, tuple[int, ...]], int, int]:
    """-> ({key: shape} in file order, tensor count, value count) from the '# ...: N tensors, M values' header."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    header = re.search(r"(\d+) tensors, (\d+) values", lines[0])
    assert header, lines[0]
    shapes = {}
    for ln in lines[1:]:
        key, shape = ln.split("\t")
        shapes[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return shapes, int(header.group(1)), int(header.group(2))


def debug_tok(**kw) -> KLTokenizer:
    return KLTokenizer(KL_SIZES["debug"], **kw)


def images(b: int = 2, size: int = 16, c: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, c), dtype=torch.uint8, generator=g)


# --- (a) the official layout ------------------------------------------------------------------


def test_kl16_state_dict_matches_official_listing():
    expected, n_tensors, n_values = parse_listing(_listing_path())
    assert len(expected) == n_tensors == 312
    with torch.device("meta"):
        model = KLAutoencoder(KL_SIZES["kl16"])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same keys, same order
    assert got == expected
    assert sum(math.prod(s) for s in got.values()) == n_values == 66_456_019
    assert sum(p.numel() for p in model.parameters()) == 66_456_019
    assert model.config.downsample == 16


@pytest.mark.skipif(not SHARED_LISTING.exists(), reason=f"{SHARED_LISTING} not present (the fixture copy is used)")
def test_fixture_listing_is_the_shared_one():
    assert parse_listing(FIXTURES / LISTING_NAME) == parse_listing(SHARED_LISTING)


# --- (b, c) loading the official checkpoint format --------------------------------------------


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_random_kl16_checkpoint_loads(tmp_path):
    """All 312 tensors of the listing, in MAR's {"model": ...} layout, load strictly (weights_only)."""
    shapes, _, _ = parse_listing(_listing_path())
    sd = _random_state_dict(shapes)
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": sd}, path)
    with torch.device("meta"):
        model = KLAutoencoder(KL_SIZES["kl16"])
    model.load_checkpoint(path)
    loaded = model.state_dict()
    assert not any(v.is_meta for v in loaded.values())
    for key in ("encoder.conv_in.weight", "encoder.down.4.attn.1.q.weight", "decoder.up.3.block.0.nin_shortcut.bias",
                "post_quant_conv.weight"):
        assert torch.equal(loaded[key], sd[key]), key


def test_bare_state_dict_and_tokenizer_checkpoint(tmp_path):
    """A bare state dict (a raygen export) loads too, and the tokenizer's weights come from it."""
    src = KLAutoencoder(KL_SIZES["debug"])
    src.initialize_weights(7)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    tok = debug_tok(checkpoint=tmp_path / "bare.pt")
    for key, value in src.state_dict().items():
        assert torch.equal(tok.autoencoder.state_dict()[key], value), key
    assert tok.fingerprint() != debug_tok(seed=0).fingerprint()
    assert tok.fingerprint() == debug_tok(seed=7).fingerprint()  # same weights, whatever their source


def _load_error(tmp_path, sd) -> str:
    torch.save({"model": sd}, tmp_path / "bad.ckpt")
    model = KLAutoencoder(KL_SIZES["debug"])
    with pytest.raises(ValueError) as info:
        model.load_checkpoint(tmp_path / "bad.ckpt")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "bad.ckpt") in msg
    return msg


def test_bad_checkpoints_fail_with_one_line(tmp_path):
    good = KLAutoencoder(KL_SIZES["debug"]).state_dict()

    sd = dict(good)
    del sd["encoder.conv_in.weight"], sd["quant_conv.bias"]
    msg = _load_error(tmp_path, sd)
    assert "2 missing, 0 unexpected, 0 mis-shaped" in msg
    assert "missing encoder.conv_in.weight (expected (32, 1, 3, 3))" in msg
    assert "missing quant_conv.bias (expected (8,))" in msg

    msg = _load_error(tmp_path, {**good, "loss.discriminator.weight": torch.zeros(3)})
    assert "1 unexpected" in msg and "unexpected loss.discriminator.weight (3,)" in msg

    msg = _load_error(tmp_path, {**good, "post_quant_conv.weight": torch.zeros(4, 4, 3, 3)})
    assert "1 mis-shaped" in msg and "post_quant_conv.weight is (4, 4, 3, 3), expected (4, 4, 1, 1)" in msg

    many = {k: v for k, v in good.items() if not k.startswith("decoder.")}
    msg = _load_error(tmp_path, many)
    assert "+" in msg and "more" in msg and msg.count("missing decoder.") == 3

    # the kl16 listing against the debug model: refused, naming the first offenders
    shapes, _, _ = parse_listing(_listing_path())
    msg = _load_error(tmp_path, {k: torch.zeros(s) for k, s in list(shapes.items())[:3]})
    assert "3 mis-shaped" in msg and "encoder.conv_in.weight is (128, 3, 3, 3), expected (32, 1, 3, 3)" in msg


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_kl_state_dict(tmp_path / "nope.ckpt")
    torch.save({"model": {"a": [1, 2]}}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        load_kl_state_dict(tmp_path / "odd.ckpt")
    torch.save({"model": torch.nn.Identity()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_kl_state_dict(tmp_path / "pickled.ckpt")


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(ch=48), "multiple of 32"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(image_channels=2), "image_channels must be 1 or 3"),
        (dict(image_size=24), "not a multiple of the downsampling factor 16"),
        (dict(encoder_attn_resolutions=(32, 12)), "[12] are not feature-map sides"),
        (dict(decoder_attn_resolutions=(512,)), "decoder_attn_resolutions [512]"),
        (dict(scale=0.0), "scale must be a positive"),
        (dict(scale=float("nan")), "scale must be a positive"),
    ],
)
def test_config_validation(overrides, needle):
    with pytest.raises(ValueError) as info:
        KLConfig(**overrides)
    assert needle in str(info.value)


def test_sizes():
    kl16 = KL_SIZES["kl16"]
    arch = (kl16.ch, kl16.ch_mult, kl16.num_res_blocks, kl16.z_channels, kl16.embed_dim)
    assert arch == (128, (1, 1, 2, 2, 4), 2, 16, 16)
    assert kl16.scale == 0.2325 and kl16.level_sides == (256, 128, 64, 32, 16)
    debug = KL_SIZES["debug"]
    assert debug.downsample == 2 and debug.image_channels == 1
    with torch.device("meta"):
        assert sum(p.numel() for p in KLAutoencoder(debug).parameters()) == 673_989
    assert KLConfig(ch_mult=[1, 2], encoder_attn_resolutions=[128], image_size=256).ch_mult == (1, 2)  # lists from YAML


# --- (d) the tokenizer ------------------------------------------------------------------------


def test_tokenizer_round_trip_shapes_and_scale():
    tok = debug_tok()
    assert tok.grid == (8, 8) and tok.latent_shape == (64, 4) and tok.downsample == 2
    x = images()
    lat = tok.encode(x)
    assert lat.shape == (2, 64, 4) and lat.dtype == torch.float32
    out = tok.decode(lat)
    assert out.shape == (2, 16, 16, 1) and out.dtype == torch.uint8

    # the scale is applied by encode and undone by decode
    cfg = dataclasses.replace(KL_SIZES["debug"], scale=0.25)
    scaled = KLTokenizer(cfg)
    lat_s = scaled.encode(x)
    torch.testing.assert_close(lat_s, lat * 0.25)
    assert torch.equal(scaled.decode(lat_s), out)
    with torch.no_grad():
        mean = tok.autoencoder.encode(x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).mean  # (B, E, h, w)
    torch.testing.assert_close(lat, mean.flatten(2).transpose(1, 2))

    with pytest.raises(ValueError, match="expected latents"):
        tok.decode(lat[:, :10])
    with pytest.raises(ValueError, match="expected images of 16x16x1"):
        tok.encode(images(c=3))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(x.float())


def test_tokenizer_mode_is_deterministic_and_sampling_is_seeded():
    tok, x = debug_tok(), images()
    assert torch.equal(tok.encode(x), tok.encode(x))
    draw = [tok.encode(x, sample=True, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    assert not torch.equal(draw[0], tok.encode(x))
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        tok.encode(x, sample=True)

    mean, logvar = tok.encode_moments(x)
    torch.testing.assert_close(mean, tok.encode(x))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert mean.shape == logvar.shape == (2, 64, 4) and torch.isfinite(mean + (0.5 * logvar).exp() * noise).all()


def test_grayscale_through_rgb_model_and_spec():
    cfg = dataclasses.replace(KL_SIZES["debug"], image_channels=3)
    tok = KLTokenizer(cfg, channels=1)
    out = tok.decode(tok.encode(images()))
    assert out.shape == (2, 16, 16, 1)
    with pytest.raises(ValueError, match="cannot tokenize 3-channel"):
        KLTokenizer(KL_SIZES["debug"], channels=3)

    spec = json.loads(json.dumps(tok.spec()))  # JSON round trip: tuples become lists
    assert spec["name"] == "kl" and spec["config"]["scale"] == 1.0
    assert spec["weights"] == {"checkpoint": None, "seed": 0}
    again = KLTokenizer.from_spec(spec)
    assert again.config == tok.config and again.fingerprint() == tok.fingerprint()
    assert KLTokenizer(cfg, channels=1, seed=1).fingerprint() != tok.fingerprint()


# --- (e) known answer against MAR's own implementation ----------------------------------------


def test_matches_official_implementation():
    ref = torch.load(FIXTURES / "kl_tiny_official.pt", weights_only=True)
    model = KLAutoencoder(KLConfig(**ref["config"]))
    model.load_state_dict({k: v.float() for k, v in ref["state_dict"].items()}, strict=True)
    model.eval()
    x = ref["input"].float()  # (2, 3, 16, 16)
    with torch.no_grad():
        posterior = model.encode(x)
        decoded = model.decode(posterior.mode())
        sample = posterior.sample(torch.Generator().manual_seed(ref["sample_seed"]))
        decoded_sample = model.decode(sample)
    assert ref["logvar"].amax() == 20.0 and ref["logvar"].amin() == -30.0  # the clamp is exercised
    torch.testing.assert_close(posterior.mean, ref["mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, ref["logvar"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(posterior.kl(), ref["kl"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded, ref["decoded"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample, ref["sample"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(decoded_sample, ref["decoded_sample"], rtol=1e-5, atol=1e-4)


# --- a tiny training run ----------------------------------------------------------------------


def test_debug_autoencoder_learns_digits():
    """Reconstruction loss falls over 30 Adam steps on 16 real digits (8 px upscaled to 16 px)."""
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:16], dtype=torch.float32)  # (B, 8, 8) in [0, 16]
    x = F.interpolate(digits[:, None] / 8.0 - 1.0, size=16, mode="bilinear", align_corners=False)  # (B, 1, 16, 16)
    model = KLAutoencoder(KL_SIZES["debug"])
    model.initialize_weights(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0, losses = time.perf_counter(), []
    for _ in range(30):
        recon, posterior = model(x, generator=g)
        rec = F.mse_loss(recon, x)
        loss = rec + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(rec.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert time.perf_counter() - t0 < 30


def test_kl_is_a_registered_latent_codec_built_from_its_config_section():
    from raygen.models.tokenizers import CODECS, KLCodecConfig, LatentCodec, from_spec
    from raygen.models.tokenizers.kl import kl_config_at

    assert CODECS["kl"] is KLTokenizer and issubclass(KLTokenizer, LatentCodec) and KLTokenizer.kind == "latents"
    assert KLTokenizer.downsample_of(KLCodecConfig()) == 16 and KLTokenizer.downsample_of(KLCodecConfig("debug")) == 2
    # the attention level follows the image: KL-16 attends at 16 of 256 px, so at 512 px at 32
    assert kl_config_at("kl16", 512).encoder_attn_resolutions == (32,)
    assert kl_config_at("debug", 32).encoder_attn_resolutions == (16,)
    assert kl_config_at("kl16", 384).encoder_attn_resolutions == (24,)
    with pytest.raises(ValueError, match="image_size 200 is not a multiple of the downsampling factor 16"):
        kl_config_at("kl16", 200)
    with pytest.raises(ValueError, match="unknown KL size 'kl8'; known: debug, kl16"):
        KLCodecConfig("kl8")
    tok = KLTokenizer.from_config(KLCodecConfig("debug", seed=3), image_size=32, channels=1)
    assert tok.grid == (16, 16) and tok.latent_shape == (256, 4) and tok.image_size == 32
    again = from_spec(tok.spec())
    assert isinstance(again, KLTokenizer) and again.fingerprint() == tok.fingerprint()

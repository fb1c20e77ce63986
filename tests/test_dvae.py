"""D2iT's Dynamic VAE (family dvae) and the `dvae` codec: the grain merge, the objective, the
fitted entropy threshold (r_f honoured on real digits) and the side columns tokenizing writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raygen.models.dvae import DVAE, DVAE_SIZES, DVAEConfig
from raygen.models.grain import region_entropy
from raygen.models.registry import build_model
from raygen.models.tokenizers import DVAECodec, DVAECodecConfig, from_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits16(n: int = 256) -> torch.Tensor:
    """n real digits upscaled to 16 px, uint8 (n, 16, 16, 1)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images[:n] * 255 / 16).astype(np.uint8))
    return x.repeat_interleave(2, 1).repeat_interleave(2, 2)[..., None]


def _model(**arch) -> DVAE:
    torch.manual_seed(0)
    return build_model("dvae", "debug", image_size=16, image_channels=1, **arch)


def test_shapes_and_each_grain_decodes_only_where_the_map_says():
    ae = _model().autoencoder.eval()
    x = _digits16(3).permute(0, 3, 1, 2).float() / 127.5 - 1
    post_c, post_f = ae.encode(x)
    assert post_c.mean.shape == (3, 4, 4, 4) and post_f.mean.shape == (3, 4, 8, 8)
    z_c, z_f = post_c.mean, post_f.mean
    noise_c, noise_f = torch.randn_like(z_c), torch.randn_like(z_f)
    coarse = torch.zeros(3, 4, 4, dtype=torch.bool)
    fine = torch.ones(3, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        # all coarse: the fine latents never reach the image; all fine: the coarse ones never do
        assert torch.equal(ae.decode(z_c, z_f, coarse), ae.decode(z_c, noise_f, coarse))
        assert torch.equal(ae.decode(z_c, z_f, fine), ae.decode(noise_c, z_f, fine))
        mixed = torch.zeros(3, 4, 4, dtype=torch.bool)
        mixed[:, :2] = True  # top half fine
        assert not torch.equal(ae.decode(z_c, z_f, mixed), ae.decode(noise_c, z_f, mixed))
        assert not torch.equal(ae.decode(z_c, z_f, mixed), ae.decode(z_c, noise_f, mixed))
        assert ae.decode(z_c, z_f, mixed).shape == (3, 1, 16, 16)


def test_the_objective_sums_both_grains_kl_and_decodes_through_a_drawn_map():
    model = _model(sample_posterior=False, kl_weight=0.5, fine_ratio=0.5)
    images = _digits16(8)
    g = torch.Generator().manual_seed(3)
    out = model({"images": images}, generator=g)
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    fine = torch.rand(8, 4, 4, generator=torch.Generator().manual_seed(3)) < 0.5  # the first draw
    post_c, post_f = model.autoencoder.encode(x)
    x_hat = model.autoencoder.decode(post_c.mean, post_f.mean, fine)
    kl = (post_c.kl() + post_f.kl()).mean()
    torch.testing.assert_close(out["loss"], (x_hat - x).abs().mean() + 0.5 * kl / 256, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing  # a mixed map trains both paths
    with pytest.raises(ValueError, match="fine_ratio"):
        DVAEConfig(fine_ratio=1.5)
    with pytest.raises(ValueError, match="coarse factor"):
        build_model("dvae", "debug", image_size=18, encoder_attn_resolutions=(9,))


def test_sizes_state_the_two_factors():
    for size, (fine, coarse) in {"debug": (2, 4), "photos": (4, 8), "f16": (8, 16)}.items():
        cfg = DVAE_SIZES[size]
        assert (cfg.downsample, cfg.coarse_downsample) == (fine, coarse)
    assert DVAE_SIZES["f16"].image_size // DVAE_SIZES["f16"].coarse_downsample == 16  # D2iT's 16x16 at 256 px
    assert _model().flops_per_sample() > 0


@pytest.mark.parametrize("fine_ratio", [0.25, 0.5, 0.75])
def test_the_codec_fits_the_threshold_so_r_f_of_the_regions_are_fine(fine_ratio):
    images = _digits16(512)
    codec = DVAECodec.from_config(DVAECodecConfig(fine_ratio=fine_ratio, fit_images=512), image_size=16, channels=1,
                                  fit_images=lambda n, seed: images[:n])
    grain = codec.grain(images).float()  # (512, 16)
    ent = region_entropy(images, 4).flatten()
    # the quantile can sit on tied entropies (flat digit corners): within the tie's mass of r_f
    ties = float((ent == ent.flatten().quantile(1 - fine_ratio)).float().mean())
    assert abs(grain.mean().item() - fine_ratio) <= ties + 1 / ent.numel() + 1e-6
    assert codec.spec()["state"] == {"threshold": codec.threshold, "fine_ratio": fine_ratio}
    rebuilt = from_spec(codec.spec())
    assert rebuilt.fingerprint() == codec.fingerprint() and torch.equal(rebuilt.grain(images), codec.grain(images))


def test_the_codec_writes_both_grains_and_the_map_and_decodes_them_back():
    images = _digits16(16)
    codec = DVAECodec.from_config(DVAECodecConfig(fit_images=16), image_size=16, channels=1,
                                  fit_images=lambda n, seed: images[:n])
    assert codec.grid == (4, 4) and codec.latent_shape == (16, 4)
    assert codec.side_layout() == {"fine": {"shape": (64, 4), "dtype": "latent"},
                                   "grain": {"shape": (16,), "dtype": "uint8", "vocab_size": 2}}
    coarse, sides = codec.encode_with_sides(images)
    assert coarse.shape == (16, 16, 4) and sides["fine"].shape == (16, 64, 4) and sides["grain"].dtype == torch.uint8
    assert torch.equal(codec.encode(images), coarse)
    out = codec.decode(coarse, **sides)
    assert out.shape == (16, 16, 16, 1) and out.dtype == torch.uint8
    # the decode is the network's on the unscaled latents through the map
    z_c = coarse.reshape(16, 4, 4, 4).permute(0, 3, 1, 2) / codec.scale
    z_f = sides["fine"].reshape(16, 8, 8, 4).permute(0, 3, 1, 2) / codec.scale
    with torch.no_grad():
        x = codec.autoencoder.decode(z_c, z_f, sides["grain"].reshape(16, 4, 4).bool()).clamp(-1, 1)
    assert torch.equal(out[..., 0], torch.round((x[:, 0] + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match="needs the fine latents"):
        codec.decode(coarse, grain=torch.ones(16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="dvae run's export"):
        DVAECodec.downsample_of(DVAECodecConfig(checkpoint=str(images.numpy().shape)))

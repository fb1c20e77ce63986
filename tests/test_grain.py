"""D2iT's entropy grain map (raygen/models/grain.py) against known answers and a brute-force KDE."""

from __future__ import annotations

import math

import pytest
import torch
from einops import repeat

from raygen.models.grain import (
    GRAIN_COLORS,
    entropy_threshold,
    gray_entropy,
    grain_map,
    grain_map_image,
    overlay,
    region_entropy,
    to_gray,
)

CENTRES = torch.linspace(-1.0, 1.0, 32)  # (32,) the bin centres b_j
SPACING = 2.0 / 31  # distance between neighbouring centres


def _closed_form_flat(v: float, sigma: float = 0.01) -> float:
    """Entropy of a flat region at gray value v: p_j proportional to exp(-(v - b_j)^2 / (2 sigma^2))."""
    w = [math.exp(-((v - b) ** 2) / (2 * sigma**2)) for b in CENTRES.double().tolist()]
    p = [x / sum(w) for x in w]
    return -sum(x * math.log(x) for x in p if x > 0)


def _brute_force(gray: torch.Tensor, region: int, bins: int = 32, sigma: float = 0.01) -> torch.Tensor:
    """Loop-by-loop KDE entropy in Python floats (float64) on the same gray values and bin centres."""
    centres = torch.linspace(-1.0, 1.0, bins, dtype=gray.dtype).tolist()
    b_, height, width = gray.shape
    out = torch.zeros(b_, height // region, width // region, dtype=torch.float64)
    for b in range(b_):
        for i in range(height // region):
            for j in range(width // region):
                xs = [
                    float(gray[b, i * region + y, j * region + x]) for y in range(region) for x in range(region)
                ]
                pdf = [sum(math.exp(-((x - c) ** 2) / (2 * sigma**2)) for x in xs) for c in centres]
                total = sum(pdf)
                out[b, i, j] = -sum(q / total * math.log(q / total) for q in pdf if q > 0)
    return out


def _mixed_batch(gen: torch.Generator, batch: int = 4, side: int = 32, region: int = 8):
    """RGB batch whose regions alternate (checkerboard) uniform noise and flat colour; returns images, noise mask."""
    h = w = side // region
    noise = torch.randint(0, 256, (batch, side, side, 3), generator=gen, dtype=torch.uint8)  # (B, H, W, 3)
    flat = torch.randint(0, 256, (batch, h, w, 3), generator=gen, dtype=torch.uint8)  # (B, h, w, 3)
    flat = repeat(flat, "b h w c -> b (h s1) (w s2) c", s1=region, s2=region)  # (B, H, W, 3)
    is_noise = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0  # (h, w) checkerboard
    is_noise = is_noise.expand(batch, h, w)  # (B, h, w)
    pixel_noise = repeat(is_noise, "b h w -> b (h s1) (w s2) 1", s1=region, s2=region)  # (B, H, W, 1)
    return torch.where(pixel_noise, noise, flat), is_noise


# --- entropy known answers -------------------------------------------------------------------


def test_flat_region_at_a_bin_centre_has_zero_entropy():
    # uint8 0 -> -1 = b_0 and 255 -> 1 = b_31 exactly; every other bin is >= 6.45 sigma away.
    images = torch.zeros(2, 8, 8, 1, dtype=torch.uint8)  # (2, 8, 8, 1)
    images[1] = 255
    e = region_entropy(images, 4)  # (2, 2, 2)
    assert e.shape == (2, 2, 2) and e.dtype == torch.float32
    expected = _closed_form_flat(-1.0)  # one neighbour with weight exp(-20.8): ~2e-8
    assert expected < 1e-7
    torch.testing.assert_close(e, torch.full_like(e, expected), atol=1e-8, rtol=0)
    # an interior centre (two neighbours) in float gray: the closed form is ~4e-8
    v = CENTRES[12].item()
    e_mid = gray_entropy(torch.full((1, 4, 4), v), 4)
    assert abs(e_mid.item() - _closed_form_flat(v)) < 1e-8 and e_mid.item() < 1e-7


def test_flat_region_midway_between_centres_has_entropy_log2():
    v = (CENTRES[5].item() + CENTRES[6].item()) / 2  # the two nearest bins get equal mass
    e = gray_entropy(torch.full((1, 8, 8), v), 8)
    assert e.item() == pytest.approx(math.log(2), abs=1e-5)
    assert e.item() == pytest.approx(_closed_form_flat(v), abs=1e-6)


def test_region_spread_evenly_over_the_centres_has_entropy_log32():
    gen = torch.Generator().manual_seed(1)
    values = CENTRES.repeat(2)[torch.randperm(64, generator=gen)]  # (64,) each centre twice, shuffled
    e = gray_entropy(values.reshape(1, 8, 8), 8)  # (1, 1, 1)
    assert e.item() == pytest.approx(math.log(32), abs=1e-5)
    # the nearest uint8 levels to the centres (at most 0.39 sigma off) still give ~log 32
    levels = (CENTRES * 127.5 + 127.5).round().to(torch.uint8).repeat(2)  # (64,)
    images = levels[torch.randperm(64, generator=gen)].reshape(1, 8, 8, 1)
    assert region_entropy(images, 8).item() == pytest.approx(math.log(32), abs=1e-2)


def test_vectorised_kde_equals_brute_force_loops():
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 8, 12, 3), generator=gen, dtype=torch.uint8)  # (2, 8, 12, 3)
    images[1] = images[1] // 17 * 17  # 16 levels: fewer, sharper modes
    gray = to_gray(images)  # (2, 8, 12)
    expected = _brute_force(gray, 4)  # (2, 2, 3)
    got = region_entropy(images, 4)  # (2, 2, 3)
    assert got.shape == (2, 2, 3)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    # the same code in float64 (float64 centres too) matches the loops to rounding
    torch.testing.assert_close(gray_entropy(gray.double(), 4), _brute_force(gray.double(), 4), atol=1e-12, rtol=0)


def test_gray_conversion_and_rgb_with_equal_channels():
    px = torch.tensor([[[[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]]]], dtype=torch.uint8)  # (1, 1, 4, 3)
    wr, wg, wb = 0.2989, 0.587, 0.114  # on [-1, 1]: a full channel is +1, an empty one -1
    expected = torch.tensor([[[wr - wg - wb, wg - wr - wb, wb - wr - wg, -(wr + wg + wb)]]])
    torch.testing.assert_close(to_gray(px), expected, atol=1e-6, rtol=0)
    gray_img = torch.tensor([[[[0], [255]]]], dtype=torch.uint8)  # 1 channel is its own gray
    torch.testing.assert_close(to_gray(gray_img), torch.tensor([[[-1.0, 1.0]]]))


def test_rgb_with_equal_channels_gives_the_gray_image_map():
    gen = torch.Generator().manual_seed(3)
    rgb, is_noise = _mixed_batch(gen)
    gray1 = rgb[..., :1].contiguous()  # (B, H, W, 1)
    grey_rgb = gray1.expand(-1, -1, -1, 3).contiguous()  # (B, H, W, 3) with R = G = B
    e_rgb, e_gray = region_entropy(grey_rgb, 8), region_entropy(gray1, 8)
    # 0.2989 + 0.587 + 0.114 = 0.9999, so R = G = B is gray 0.9999 x (a shift of up to 0.01 sigma):
    # close, not bit-equal, and far inside the gap between flat (<= log 2) and noise (> 2) regions
    assert (e_rgb - e_gray).abs().max() < 0.05
    m_rgb = grain_map(e_rgb, entropy_threshold(e_rgb, 0.5))
    m_gray = grain_map(e_gray, entropy_threshold(e_gray, 0.5))
    assert torch.equal(m_rgb, m_gray)
    assert torch.equal(m_gray, is_noise.to(torch.uint8))


def test_noise_regions_are_fine_and_flat_regions_coarse_at_half():
    gen = torch.Generator().manual_seed(4)
    images, is_noise = _mixed_batch(gen)  # (4, 32, 32, 3), half the 64 regions noise
    e = region_entropy(images, 8)  # (4, 4, 4)
    assert e[~is_noise].max() <= math.log(2) + 1e-5  # a constant has mass on at most two bins
    assert e[is_noise].min() > 2.0  # 64 uniform pixels over 256 levels
    grain = grain_map(e, entropy_threshold(e, 0.5))  # (4, 4, 4)
    assert grain.dtype == torch.uint8 and grain.shape == (4, 4, 4)
    assert torch.equal(grain, is_noise.to(torch.uint8))


def test_chunking_over_the_batch_changes_nothing():
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (5, 16, 16, 3), generator=gen, dtype=torch.uint8)
    whole = region_entropy(images, 4)  # (5, 4, 4)
    per_image = 16 * 16 * 32
    assert torch.equal(region_entropy(images, 4, chunk_elems=2 * per_image), whole)  # chunks of 2, 2, 1
    assert torch.equal(region_entropy(images, 4, chunk_elems=1), whole)  # one image per chunk


# --- threshold ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fine_ratio", [0.0, 0.1, 0.25, 0.5, 0.7, 0.93, 1.0])
def test_fine_ratio_is_honoured(fine_ratio):
    gen = torch.Generator().manual_seed(6)
    e = torch.rand(3, 7, 5, generator=gen, dtype=torch.float64) * math.log(32)  # (3, 7, 5): 105 varied entropies
    grain = grain_map(e, entropy_threshold(e, fine_ratio))
    n_fine, n = int(grain.sum()), grain.numel()
    assert abs(n_fine - fine_ratio * n) <= 1
    if fine_ratio in (0.0, 1.0):
        assert n_fine == fine_ratio * n


def test_ends_hold_with_ties_and_threshold_matches_quantile():
    ties = torch.zeros(2, 4, 4)  # all flat regions: E = 0 everywhere
    assert entropy_threshold(ties, 1.0) == -math.inf and grain_map(ties, -math.inf).all()
    assert entropy_threshold(ties, 0.0) == math.inf and not grain_map(ties, math.inf).any()
    gen = torch.Generator().manual_seed(7)
    e = torch.rand(1000, generator=gen, dtype=torch.float64)
    for r in (0.1, 0.37, 0.5, 0.9):
        assert entropy_threshold(e, r) == pytest.approx(torch.quantile(e, 1 - r).item(), abs=1e-12)


def test_threshold_rejects_bad_ratios_and_inputs():
    e = torch.rand(10)
    for r in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="fine_ratio"):
            entropy_threshold(e, r)
    with pytest.raises(ValueError, match="no entropies"):
        entropy_threshold(torch.zeros(0), 0.5)


def test_region_must_divide_height_and_width():
    images = torch.zeros(1, 16, 12, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"H=16.*W=12"):
        region_entropy(images, 8)  # 12 % 8 != 0
    with pytest.raises(ValueError, match=r"H=12.*W=16"):
        region_entropy(images.transpose(1, 2), 8)
    with pytest.raises(ValueError):
        region_entropy(images, 0)
    with pytest.raises(ValueError):
        region_entropy(torch.zeros(1, 8, 8, 2, dtype=torch.uint8), 4)  # C must be 1 or 3
    with pytest.raises(TypeError):
        region_entropy(torch.zeros(1, 8, 8, 3), 4)  # float images are not uint8
    assert region_entropy(images, 4).shape == (1, 4, 3)


# --- pictures ----------------------------------------------------------------------------------


def test_grain_picture_colours_and_shape():
    assert GRAIN_COLORS[1] == (255, 0, 0) and GRAIN_COLORS[0] == (0, 0, 255)
    grain = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.uint8)  # (2, 3)
    pic = grain_map_image(grain, 4)  # (8, 12, 3)
    assert pic.shape == (8, 12, 3) and pic.dtype == torch.uint8
    red, blue = torch.tensor([255, 0, 0], dtype=torch.uint8), torch.tensor([0, 0, 255], dtype=torch.uint8)
    for i in range(2):
        for j in range(3):
            block = pic[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]  # (4, 4, 3)
            assert (block == (red if grain[i, j] else blue)).all()
    with pytest.raises(ValueError):
        grain_map_image(torch.tensor([[2]]), 1)


def test_overlay_blends_the_colours():
    grain = torch.tensor([[1, 0]], dtype=torch.uint8)  # (1, 2)
    black = torch.zeros(4, 8, 1, dtype=torch.uint8)  # (4, 8, 1) gray image
    out = overlay(black, grain, alpha=0.4)  # (4, 8, 3)
    assert out.shape == (4, 8, 3) and out.dtype == torch.uint8
    assert (out[:, :4] == torch.tensor([102, 0, 0], dtype=torch.uint8)).all()  # 0.4 * 255
    assert (out[:, 4:] == torch.tensor([0, 0, 102], dtype=torch.uint8)).all()
    white = torch.full((4, 8, 3), 255, dtype=torch.uint8)
    assert (overlay(white, grain, alpha=0.4)[:, :4] == torch.tensor([255, 153, 153], dtype=torch.uint8)).all()
    assert torch.equal(overlay(white, grain, alpha=0.0), white)
    with pytest.raises(ValueError):
        overlay(white, torch.zeros(3, 3, dtype=torch.uint8))  # 4 x 8 is not a multiple of 3 x 3

"""Palette tokenizer and the seeded k-means behind it."""

from __future__ import annotations

import pytest
import torch

from raygen.models.kmeans import kmeans
from raygen.models.tokenizers import PaletteConfig, PaletteTokenizer, from_spec


def _quantized_images(n=6, size=8, channels=3, levels=(0, 85, 170, 255), seed=0):
    g = torch.Generator().manual_seed(seed)
    lv = torch.tensor(levels, dtype=torch.uint8)
    return lv[torch.randint(len(levels), (n, size, size, channels), generator=g)]


def test_round_trip_is_exact_for_quantized_pixels():
    images = _quantized_images(channels=1)  # 4 grey levels, palette of 8
    tok = PaletteTokenizer.fit(PaletteConfig(size=8), images, image_size=8, channels=1)
    ids = tok.encode(images)
    assert ids.shape == (6, 8, 8) and ids.dtype == torch.int64
    assert torch.equal(tok.decode(ids), images)


def test_rgb_round_trip_and_grid():
    images = _quantized_images(channels=3, levels=(0, 255))  # 8 colours
    tok = PaletteTokenizer.fit(PaletteConfig(size=8), images, image_size=8, channels=3)
    assert tok.grid == (8, 8) and tok.vocab_size == 8
    assert torch.equal(tok.decode(tok.encode(images)), images)


def test_ids_are_ordered_by_brightness():
    images = _quantized_images(channels=1)
    tok = PaletteTokenizer.fit(PaletteConfig(size=4), images, image_size=8, channels=1)
    assert tok.palette[:, 0].tolist() == [0, 85, 170, 255]


def test_nearest_colour_for_unseen_pixels():
    images = _quantized_images(channels=1)
    tok = PaletteTokenizer.fit(PaletteConfig(size=4), images, image_size=8, channels=1)
    probe = torch.full((1, 8, 8, 1), 90, dtype=torch.uint8)
    assert int(tok.encode(probe).unique()) == 1  # 90 is nearest to 85


def test_fit_is_deterministic_and_spec_rebuilds():
    images = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a = PaletteTokenizer.fit(PaletteConfig(size=16, seed=3), images, image_size=8, channels=3)
    b = PaletteTokenizer.fit(PaletteConfig(size=16, seed=3), images, image_size=8, channels=3)
    c = PaletteTokenizer.fit(PaletteConfig(size=16, seed=4), images, image_size=8, channels=3)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    rebuilt = from_spec(a.spec())
    assert rebuilt.fingerprint() == a.fingerprint()
    assert torch.equal(rebuilt.encode(images), a.encode(images))


def test_bad_inputs_are_rejected():
    tok = PaletteTokenizer.fit(PaletteConfig(size=4), _quantized_images(channels=1), image_size=8, channels=1)
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(torch.zeros(1, 8, 8, 1))
    with pytest.raises(ValueError, match="8x8x1"):
        tok.encode(torch.zeros(1, 4, 4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        tok.decode(torch.full((1, 8, 8), 4))


def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    c1, a1 = kmeans(x, 3, generator=torch.Generator().manual_seed(7))
    c2, a2 = kmeans(x, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    found = sorted(tuple(round(v) for v in row) for row in c1.tolist())
    assert found == [(0, 0), (0, 10), (10, 0)]
    # every point of a true cluster lands in one found cluster
    assert all(len(a1[i * 50 : (i + 1) * 50].unique()) == 1 for i in range(3))


def test_kmeans_with_fewer_distinct_points_than_k():
    x = torch.tensor([[1.0], [1.0], [5.0]])
    c, a = kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    assert sorted(set(c[:, 0].tolist())) == [1.0, 5.0]
    assert torch.equal(c[a], x)


def test_patch_palette_is_a_kmeans_vq_with_downsampling():
    # 2x2 patches drawn from 5 fixed patterns: a 5-entry patch palette reproduces them exactly.
    g = torch.Generator().manual_seed(1)
    patterns = torch.randint(0, 256, (5, 2, 2, 1), generator=g, dtype=torch.uint8)
    picks = torch.randint(5, (6, 4, 4), generator=g)
    from einops import rearrange

    images = rearrange(patterns[picks], "n h w p q c -> n (h p) (w q) c")  # (6, 8, 8, 1)
    tok = PaletteTokenizer.fit(PaletteConfig(size=5, patch=2), images, image_size=8, channels=1)
    assert tok.grid == (4, 4) and tok.downsample == 2 and tok.codebook().shape == (5, 4)
    ids = tok.encode(images)
    assert ids.shape == (6, 4, 4)
    assert torch.equal(tok.decode(ids), images)
    again = from_spec(tok.spec())
    assert again.fingerprint() == tok.fingerprint() and torch.equal(again.encode(images), ids)


def test_patch_one_keeps_the_pre_patch_fingerprint_spec():
    tok = PaletteTokenizer.fit(PaletteConfig(size=4), _quantized_images(channels=1), image_size=8, channels=1)
    assert "patch" not in tok.spec()["config"]
    assert "patch" in PaletteTokenizer.fit(PaletteConfig(size=4, patch=2), _quantized_images(channels=1),
                                           image_size=8, channels=1).spec()["config"]

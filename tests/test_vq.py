"""LlamaGen VQ-16 tokenizer: checkpoint-compatible layout, shapes, seeding, loading, quantization."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from raygen.models.tokenizers.vq import VQConfig, VQTokenizer

LISTING = Path("/work/shared/docs/llamagen_vq16_state_dict.txt")
TINY = dict(ch=32, ch_mult=(1, 2), z_channels=32, codebook_size=64, embed_dim=4)


def tiny(seed: int = 0, channels: int = 3, image_size: int = 16, **kw) -> VQTokenizer:
    return VQTokenizer(VQConfig(**{**TINY, "seed": seed, **kw}), image_size=image_size, channels=channels)


def images(b: int = 2, size: int = 16, c: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, c), dtype=torch.uint8, generator=g)


@pytest.mark.skipif(not LISTING.exists(), reason="official state-dict listing not available")
def test_default_state_dict_matches_official_listing():
    lines = [ln for ln in LISTING.read_text().splitlines() if ln.strip()]
    header = re.search(r"(\d+) tensors, (\d+) values", lines[0])
    expected = {}
    for ln in lines[1:]:
        key, shape = ln.split("\t")
        expected[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    assert len(expected) == int(header.group(1)) == 344

    with torch.device("meta"):
        tok = VQTokenizer(VQConfig(), image_size=256, channels=3)
    got = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert list(got) == list(expected)  # same keys, same order
    assert got == expected
    total = sum(math.prod(s) for s in got.values())
    assert total == int(header.group(2)) == 71_948_939
    assert tok.downsample == 16 and tok.vocab_size == 16384 and tok.grid == (16, 16)


@pytest.mark.parametrize("channels", [1, 3])
def test_tiny_encode_decode_shapes(channels):
    tok = tiny(channels=channels)
    assert tok.downsample == 2 and tok.grid == (8, 8)
    ids = tok.encode(images(c=channels))
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < 64
    out = tok.decode(ids)
    assert out.shape == (2, 16, 16, channels) and out.dtype == torch.uint8
    assert torch.equal(tok.encode(images(c=channels)), ids)  # deterministic


def test_spec_and_codebook():
    tok = tiny()
    spec = tok.spec()
    json.dumps(spec)  # JSON-serializable
    assert spec["name"] == "vq" and spec["config"] == dataclasses.asdict(tok.config)
    assert tok.fitted_state() == {}
    cb = tok.codebook()
    assert cb.shape == (64, 4) and cb.dtype == torch.float32
    torch.testing.assert_close(cb.norm(dim=1), torch.ones(64))


def test_seed_reproducible():
    a, b, c = tiny(seed=0), tiny(seed=0), tiny(seed=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert not torch.equal(a.codebook(), c.codebook())


def test_quantize_picks_nearest_code():
    tok = tiny()
    cb = tok.codebook()  # (64, 4)
    want = torch.tensor([[5, 17], [63, 0]])  # (1, 2, 2) grid of ids
    z = cb[want.flatten()].reshape(2, 2, 4).permute(2, 0, 1)[None] * 3.0  # scale: codes are normalized
    assert torch.equal(tok.quantize_latents(z), want[None])


def test_load_official_format_checkpoint(tmp_path):
    src = tiny(seed=0)
    path = tmp_path / "vq.pt"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(codebook_size=64)}, path)
    dst = tiny(seed=7, checkpoint=str(path))
    assert dst.config.checkpoint == str(path)
    x = images()
    assert torch.equal(dst.encode(x), src.encode(x))
    assert dst.fingerprint() == src.fingerprint()
    assert dst.fingerprint() != tiny(seed=7).fingerprint()


def test_load_raw_state_dict(tmp_path):
    src = tiny(seed=3)
    path = tmp_path / "raw.pt"
    torch.save(src.state_dict(), path)
    assert tiny(checkpoint=str(path)).fingerprint() == src.fingerprint()


def test_mismatched_checkpoint_names_path(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": tiny(codebook_size=32).state_dict()}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        tiny(checkpoint=str(path))
    assert "quantize.embedding.weight" in str(err.value)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        tiny(checkpoint=str(path))


def test_invalid_config_and_inputs():
    with pytest.raises(ValueError, match="multiple of 32"):
        VQConfig(ch=48)
    with pytest.raises(ValueError, match="multiple"):
        tiny(image_size=15)
    tok = tiny()
    with pytest.raises(ValueError):
        tok.encode(images(size=8))
    with pytest.raises(ValueError):
        tok.decode(torch.full((1, 8, 8), 64))

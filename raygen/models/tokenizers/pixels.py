"""`pixels`: the continuous codec that needs no weights. Each token is a p x p x C patch of the
image's own pixels, mapped from [0, 255] to [-1, 1], in raster order; decoding is exact.

It is to the continuous families what `palette` is to the discrete ones: the embedded default
on digits, and a codec whose round trip can be tested to the bit.

    codec = PixelsCodec(PixelsConfig(patch=2), image_size=16, channels=1)
    z = codec.encode(images)        # (B, 64, 4) float32 in [-1, 1]
    assert torch.equal(codec.decode(z), images)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from raygen.models.tokenizers.base import LatentCodec


@dataclass
class PixelsConfig:
    patch: int = field(default=1, metadata={"help": "pixels per token side: a token is a p x p x C patch", "min": 1})


class PixelsCodec(LatentCodec):
    """Patches of pixels as latents: x = u / 127.5 - 1 for a pixel value u (exact round trip)."""

    name = "pixels"
    config_cls = PixelsConfig

    @property
    def latent_dim(self) -> int:
        return self.config.patch**2 * self.channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, h*w, p*p*C) float32 in [-1, 1]."""
        self._check_images(images)
        p = self.config.patch
        x = images.float() / 127.5 - 1.0  # (B, H, W, C)
        return rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, h*w, p*p*C) float -> (B, H, W, C) uint8 (values outside [-1, 1] are clipped)."""
        self._check_latents(latents)
        p, (h, w) = self.config.patch, self.grid
        u = ((latents.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (B, L, D)
        return rearrange(u, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=p, q=p)

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

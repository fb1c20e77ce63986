"""ImageGPT-style palette tokenizer: one token per pixel, the id of its nearest palette colour."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from raygen.models.kmeans import kmeans
from raygen.models.tokenizers.base import Tokenizer


@dataclass
class PaletteConfig:
    size: int = field(default=16, metadata={"help": "palette entries K (the vocabulary size)", "min": 2})
    fit_images: int = field(default=256, metadata={"help": "images sampled to fit the palette", "min": 1})
    seed: int = field(default=0, metadata={"help": "k-means++ seed"})


class PaletteTokenizer(Tokenizer):
    """K colours (or intensities) fitted with k-means; exact for already-quantized pixels."""

    name = "palette"

    def __init__(self, config: PaletteConfig, *, image_size: int, channels: int, palette: torch.Tensor):
        super().__init__(image_size=image_size, channels=channels)
        if tuple(palette.shape) != (config.size, channels):
            raise ValueError(f"palette must be ({config.size}, {channels}), got {tuple(palette.shape)}")
        self.config = config
        self.register_buffer("palette", palette.float().round().clamp(0, 255))  # (K, C)

    @classmethod
    def fit(cls, config: PaletteConfig, images: torch.Tensor, *, image_size: int, channels: int) -> "PaletteTokenizer":
        """Fit the palette on uint8 images (N, H, W, C) with seeded k-means++."""
        if images.ndim != 4 or images.shape[-1] != channels or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (N, H, W, {channels}), got {images.dtype} {tuple(images.shape)}")
        g = torch.Generator().manual_seed(config.seed)
        pixels = rearrange(images, "n h w c -> (n h w) c").float()
        centres, _ = kmeans(pixels, config.size, generator=g)
        centres = centres.round().clamp(0, 255)
        # Sort by brightness so ids are ordered and the palette does not depend on k-means' labelling.
        order = torch.argsort(_brightness_key(centres))
        return cls(config, image_size=image_size, channels=channels, palette=centres[order])

    @property
    def downsample(self) -> int:
        return 1

    @property
    def vocab_size(self) -> int:
        return self.config.size

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        b = images.shape[0]
        pixels = rearrange(images, "b h w c -> (b h w) c").to(self.palette.device, torch.float32)
        ids = torch.cdist(pixels, self.palette).argmin(dim=1)  # nearest colour, first on ties
        return rearrange(ids, "(b h w) -> b h w", b=b, h=self.image_size).to(images.device)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        return self.palette[tokens.to(self.palette.device).long()].to(torch.uint8).to(tokens.device)  # (B, H, W, C)

    def codebook(self) -> torch.Tensor:
        return self.palette.clone()

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def fitted_state(self) -> dict[str, Any]:
        return {"palette": [[int(v) for v in row] for row in self.palette.tolist()]}


def _brightness_key(c: torch.Tensor) -> torch.Tensor:
    """An int64 key ordering colours by channel sum, ties broken by the channels in order."""
    v = c.long()
    lex = torch.zeros(v.shape[0], dtype=torch.long)
    for ch in range(v.shape[1]):
        lex = lex * 256 + v[:, ch]
    return v.sum(dim=1) * 256 ** v.shape[1] + lex

"""ImageGPT-style palette tokenizer: one token per pixel (or per p x p patch), the id of its nearest palette entry.

With `patch=1` (the default) a palette entry is a colour and the tokenizer is exact for
already-quantized pixels. With `patch=p > 1` an entry is a whole p x p x C patch, fitted with
the same seeded k-means over the data's patches: a k-means VQ with downsampling p, which gives
a codebook of hundreds of entries on small images (what CTF's codebook clustering needs).
"""

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
    patch: int = field(default=1, metadata={"help": "pixels per token side; >1 makes each entry a patch", "min": 1})


class PaletteTokenizer(Tokenizer):
    """K colours (or p x p patches) fitted with k-means; exact for already-quantized pixels."""

    name = "palette"
    config_cls = PaletteConfig

    def __init__(self, config: PaletteConfig, *, image_size: int, channels: int, palette: torch.Tensor):
        super().__init__(config, image_size=image_size, channels=channels)
        dim = config.patch**2 * channels
        if tuple(palette.shape) != (config.size, dim):
            raise ValueError(f"palette must be ({config.size}, {dim}), got {tuple(palette.shape)}")
        self.register_buffer("palette", palette.float().round().clamp(0, 255))  # (K, p*p*C)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "PaletteTokenizer":
        return cls(PaletteConfig(**spec["config"]), image_size=spec["image_size"], channels=spec["channels"],
                   palette=torch.tensor(spec["state"]["palette"], dtype=torch.float32))

    @classmethod
    def from_config(cls, section: PaletteConfig, *, image_size: int, channels: int,
                    fit_images=None) -> "PaletteTokenizer":
        """Fit on `section.fit_images` source images drawn with `section.seed`."""
        return cls.fit(section, fit_images(section.fit_images, section.seed), image_size=image_size, channels=channels)

    @classmethod
    def fit(cls, config: PaletteConfig, images: torch.Tensor, *, image_size: int, channels: int) -> "PaletteTokenizer":
        """Fit the palette on uint8 images (N, H, W, C) with seeded k-means++."""
        if images.ndim != 4 or images.shape[-1] != channels or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images (N, H, W, {channels}), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] % config.patch:
            raise ValueError(f"image size {images.shape[1]} is not a multiple of the palette patch {config.patch}")
        g = torch.Generator().manual_seed(config.seed)
        p = config.patch
        vectors = rearrange(images, "n (h p) (w q) c -> (n h w) (p q c)", p=p, q=p).float()  # (M, p*p*C)
        centres, _ = kmeans(vectors, config.size, generator=g)
        centres = centres.round().clamp(0, 255)
        # Sort by brightness so ids are ordered and the palette does not depend on k-means' labelling.
        order = _brightness_order(centres)
        return cls(config, image_size=image_size, channels=channels, palette=centres[order])

    @property
    def vocab_size(self) -> int:
        return self.config.size

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        b, p = images.shape[0], self.config.patch
        vectors = rearrange(images, "b (h p) (w q) c -> (b h w) (p q c)", p=p, q=p)  # (B*h*w, p*p*C)
        vectors = vectors.to(self.palette.device, torch.float32)
        ids = torch.cdist(vectors, self.palette).argmin(dim=1)  # nearest entry, first on ties
        return rearrange(ids, "(b h w) -> b h w", b=b, h=self.grid[0]).to(images.device)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens)
        p = self.config.patch
        patches = self.palette[tokens.to(self.palette.device).long()].to(torch.uint8)  # (B, h, w, p*p*C)
        images = rearrange(patches, "b h w (p q c) -> b (h p) (w q) c", p=p, q=p)
        return images.to(tokens.device)  # (B, H, W, C)

    def codebook(self) -> torch.Tensor:
        return self.palette.clone()

    def config_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.config)
        if out["patch"] == 1:  # data sets tokenized before patches existed keep their fingerprint
            del out["patch"]
        return out

    def fitted_state(self) -> dict[str, Any]:
        return {"palette": [[int(v) for v in row] for row in self.palette.tolist()]}


def _brightness_order(c: torch.Tensor) -> torch.Tensor:
    """Indices ordering entries (K, E) by their sum, ties broken by the components in order."""
    v = c.long()
    order = torch.arange(v.shape[0])
    # Stable sorts from the least to the most significant key: last component, ..., first, sum.
    for key in [v[:, j] for j in reversed(range(v.shape[1]))] + [v.sum(dim=1)]:
        order = order[torch.sort(key[order], stable=True).indices]
    return order

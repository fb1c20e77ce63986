"""`images`: the identity codec. Shards keep the decoded images themselves (uint8 H x W x C), the
data kind an autoencoder trains on (`raygen tokenize --tokenizer images`, then `raygen train
--preset kl-digits`).

    codec = ImagesCodec(ImagesConfig(), image_size=16, channels=1)
    assert torch.equal(codec.decode(codec.encode(images)), images)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raygen.models.tokenizers.base import Codec


@dataclass
class ImagesConfig:
    """`tokenizer.images` has no options: the images are stored as decoded (data.image_size, data.channels)."""


class ImagesCodec(Codec):
    """uint8 images (B, H, W, C) in and out, unchanged; one "token" per pixel."""

    name = "images"
    kind = "images"
    config_cls = ImagesConfig

    @classmethod
    def downsample_of(cls, section: Any) -> int:
        return 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every stored image."""
        return (self.image_size, self.image_size, self.channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return images

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_images(tokens)
        return tokens

    def config_dict(self) -> dict[str, Any]:
        return {}

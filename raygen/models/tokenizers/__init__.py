"""Codecs: images <-> token ids (`palette`, `vq`), latents (`pixels`, `kl`; `dvae`: two grains + a grain map) or the images themselves
(`images`, what an autoencoder trains on).

`CODECS` names every codec class. Each class declares its config section (`config_cls`, at
`tokenizer.<name>`), its data kind (`kind`), the downsampling its section implies
(`downsample_of`), how it is built for a data set (`from_config`) and rebuilt from a
manifest's spec (`from_spec`: config, fitted state, where its weights come from), and its
`fingerprint`.
"""

from __future__ import annotations

from typing import Any

from raygen.models.tokenizers.base import Codec, LatentCodec, Tokenizer
from raygen.models.tokenizers.dvae import DVAECodec, DVAECodecConfig
from raygen.models.tokenizers.images import ImagesCodec, ImagesConfig
from raygen.models.tokenizers.kl import KLCodecConfig, KLTokenizer
from raygen.models.tokenizers.palette import PaletteConfig, PaletteTokenizer
from raygen.models.tokenizers.pixels import PixelsCodec, PixelsConfig
from raygen.models.tokenizers.vq import VQTokenizer

CODECS: dict[str, type[Codec]] = {c.name: c for c in (PaletteTokenizer, VQTokenizer, PixelsCodec, KLTokenizer,
                                                       DVAECodec, ImagesCodec)}
TOKENIZERS = tuple(CODECS)


def from_spec(spec: dict[str, Any]) -> Codec:
    """Rebuild the codec a manifest names (config, fitted state and weights)."""
    cls = CODECS.get(spec.get("name"))
    if cls is None:
        raise ValueError(f"unknown tokenizer '{spec.get('name')}'; known: {', '.join(CODECS)}")
    return cls.from_spec(spec)


__all__ = ["Codec", "DVAECodec", "DVAECodecConfig", "ImagesCodec", "ImagesConfig", "LatentCodec", "Tokenizer", "KLCodecConfig", "KLTokenizer", "PaletteConfig", "PaletteTokenizer",
           "PixelsCodec", "PixelsConfig", "VQTokenizer", "CODECS", "TOKENIZERS", "from_spec"]

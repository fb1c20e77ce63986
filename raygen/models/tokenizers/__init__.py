"""Codecs: images <-> token ids (`palette`, `vq`) or latents (`pixels`).

`CODECS` names every codec class; `from_spec` rebuilds one from a manifest's spec (config,
fitted state, weights) through the class's own `from_spec`.
"""

from __future__ import annotations

from typing import Any

from raygen.models.tokenizers.base import Codec, LatentCodec, Tokenizer
from raygen.models.tokenizers.palette import PaletteConfig, PaletteTokenizer
from raygen.models.tokenizers.pixels import PixelsCodec, PixelsConfig
from raygen.models.tokenizers.vq import VQTokenizer

CODECS: dict[str, type[Codec]] = {c.name: c for c in (PaletteTokenizer, VQTokenizer, PixelsCodec)}
TOKENIZERS = tuple(CODECS)


def from_spec(spec: dict[str, Any]) -> Codec:
    """Rebuild the codec a manifest names (config, fitted state and weights)."""
    cls = CODECS.get(spec.get("name"))
    if cls is None:
        raise ValueError(f"unknown tokenizer '{spec.get('name')}'; known: {', '.join(CODECS)}")
    return cls.from_spec(spec)


__all__ = ["Codec", "LatentCodec", "Tokenizer", "PaletteConfig", "PaletteTokenizer", "PixelsCodec", "PixelsConfig",
           "VQTokenizer", "CODECS", "TOKENIZERS", "from_spec"]

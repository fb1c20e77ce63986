"""Tokenizers: images <-> token ids. `from_spec` rebuilds one from a manifest's spec."""

from __future__ import annotations

from typing import Any

import torch

from raygen.models.tokenizers.base import Tokenizer
from raygen.models.tokenizers.palette import PaletteConfig, PaletteTokenizer

TOKENIZERS = ("palette", "vq")


def from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a manifest names (config, fitted state and weights)."""
    name = spec.get("name")
    if name == "palette":
        return PaletteTokenizer(
            PaletteConfig(**spec["config"]),
            image_size=spec["image_size"],
            channels=spec["channels"],
            palette=torch.tensor(spec["state"]["palette"], dtype=torch.float32),
        )
    if name == "vq":
        from raygen.models.tokenizers.vq import VQConfig, VQTokenizer

        return VQTokenizer(VQConfig(**spec["config"]), image_size=spec["image_size"], channels=spec["channels"])
    raise ValueError(f"unknown tokenizer '{name}'; known: {', '.join(TOKENIZERS)}")


__all__ = ["Tokenizer", "PaletteConfig", "PaletteTokenizer", "from_spec", "TOKENIZERS"]

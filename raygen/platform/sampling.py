"""Sampling from an exported model: tokens -> images with the data set's tokenizer -> a grid PNG.

An export directory holds `model.pt` (fp32 weights; `torch.load(weights_only=True)`) and
`config.json` (family, size, architecture, tokenizer spec, data summary), so a model
samples without DeepSpeed, Ray or the training code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raygen.config import SampleConfig, parse_labels
from raygen.errors import UserError
from raygen.models.registry import build_model
from raygen.models.tokenizers import from_spec

EXPORT_FORMAT = 1


def write_export(directory: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, directory / "model.pt")
    (directory / "config.json").write_text(json.dumps({"format": EXPORT_FORMAT, **meta}, indent=1))
    return directory


def read_export_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the model config '{path}': {e}") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"'{path}' has export format {meta.get('format')!r}; this raygen reads {EXPORT_FORMAT}")
    return meta


def load_export(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from config.json and load its weights (no DeepSpeed needed)."""
    meta = read_export_meta(directory)
    model = build_model(meta["family"], meta["size"], **meta["arch"])
    state = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


@torch.inference_mode()
def generate(model, labels: list[int], sample: SampleConfig, device: str | torch.device = "cpu") -> torch.Tensor:
    """Token grids (B, h, w) for `labels`, in batches of sample.batch_size, seeded by sample.seed."""
    g = torch.Generator(device=device).manual_seed(sample.seed)
    out = []
    for i in range(0, len(labels), sample.batch_size):
        chunk = torch.tensor(labels[i : i + sample.batch_size], device=device)
        out.append(model.generate(chunk, cfg_scale=sample.cfg_scale, steps=sample.steps,
                                  temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p,
                                  generator=g).cpu())
    return torch.cat(out)


def decode(meta: dict[str, Any], tokens: torch.Tensor) -> torch.Tensor:
    """Token grids -> uint8 images (B, H, W, C) with the tokenizer the data was made with."""
    tok = from_spec(meta["tokenizer"])
    return tok.decode(tokens)


def grid_image(images: torch.Tensor, rows: int, scale: int | None = None):
    """uint8 (B, H, W, C) -> one PIL image, `rows` rows, upscaled so small digits stay visible."""
    from PIL import Image

    b, h, w, c = images.shape
    cols = math.ceil(b / rows)
    scale = scale or max(1, 64 // max(h, w))
    pad = 1
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images.numpy()):
        r, col = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    pil = Image.fromarray(canvas[..., 0] if c == 1 else canvas, "L" if c == 1 else "RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)


def sample_grid(model, meta: dict[str, Any], sample: SampleConfig, out: str | Path | None,
                device: str | torch.device = "cpu") -> dict[str, Any]:
    """Draw sample.per_label samples of each requested class; one row per class; optional PNG."""
    classes = parse_labels(sample.labels, meta["data"]["num_classes"])
    labels = [c for c in classes for _ in range(sample.per_label)]
    tokens = generate(model, labels, sample, device)
    images = decode(meta, tokens)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        grid_image(images, rows=len(classes)).save(out)
    return {"labels": torch.tensor(labels), "tokens": tokens, "images": images, "sample": asdict(sample)}


def is_digits(meta: dict[str, Any]) -> bool:
    return meta["data"].get("source") == "digits"

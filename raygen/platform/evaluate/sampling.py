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

from raygen import families
from raygen.config import SampleConfig, parse_labels
from raygen.errors import UserError
from raygen.families import Family
from raygen.models.tokenizers import from_spec
from raygen.models.tokenizers.base import CODEC_EXPORT

EXPORT_FORMAT = 1


def write_export(directory: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, directory / "model.pt")
    (directory / "config.json").write_text(json.dumps({"format": EXPORT_FORMAT, **meta}, indent=1))
    return directory


def write_export_meta(directory: str | Path, meta: dict[str, Any]) -> Path:
    """config.json alone: an export composed of other exports (its family's `load` reads it)."""
    directory = Path(directory)
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
    """Rebuild the model from config.json and its weights (no DeepSpeed needed), the way its
    family composes it (one model.pt, or parts made by several runs)."""
    meta = read_export_meta(directory)
    return family_of(meta).load(Path(directory), meta, device), meta


def family_of(meta: dict[str, Any]) -> Family:
    if CODEC_EXPORT in meta:  # `raygen models import vq|kl FILE` made it: weights for a codec, not a model
        raise UserError(f"this is an imported {meta[CODEC_EXPORT]} tokenizer: it tokenizes data sets "
                        f"(tokenizer.{meta[CODEC_EXPORT]}.checkpoint=models:/NAME@ALIAS); it does not sample")
    return families.get(meta["family"])


def check_samples_alone(meta: dict[str, Any]) -> None:
    """A UserError unless the export samples on its own (a codec reconstructs; a part of a
    composite export needs the export that composes it)."""
    family = family_of(meta)
    if family.can_sample(meta):
        return
    what = f"this {meta['family']} {meta['size']} model"
    if family.can_reconstruct(meta):
        raise UserError(f"{what} is a codec: it reconstructs images and does not sample; register it and "
                        "tokenize a data set with it (README: Train a tokenizer)")
    raise UserError(f"{what} does not sample on its own; use the export that composes it "
                    "(see `raygen models register --help`)")


def check_knobs(meta: dict[str, Any], knobs: dict[str, Any]) -> Any:
    """sample.knobs as the export's family's typed knobs (ConfigError on a bad key or value)."""
    return family_of(meta).check_knobs(knobs, meta)


@torch.inference_mode()
def generate(model, meta: dict[str, Any], labels: list[int], sample: SampleConfig,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """The model's outputs for `labels` (token grids (B, h, w), latents, or a dict of the data
    column and side columns), in batches of sample.batch_size, seeded by sample.seed."""
    family = family_of(meta)
    family.check_sample(sample)
    knobs = family.check_knobs(sample.knobs, meta)  # once, not per batch
    g = torch.Generator(device=device).manual_seed(sample.seed)
    out = []
    for i in range(0, len(labels), sample.batch_size):
        chunk = torch.tensor(labels[i : i + sample.batch_size], device=device)
        got = family.generate(model, chunk, sample, g, knobs)
        out.append({k: v.cpu() for k, v in got.items()} if isinstance(got, dict) else got.cpu())
    if isinstance(out[0], dict):
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}
    return torch.cat(out)


def decode_with(tok, meta: dict[str, Any], outputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """A model's outputs -> uint8 images (B, H, W, C) with codec `tok`; dict outputs hold the data
    column under its name and side columns (a second grain, a grain map) the codec decodes with."""
    if isinstance(outputs, dict):
        name = meta["data"]["column"]["name"]
        return tok.decode(outputs[name], **{k: v for k, v in outputs.items() if k != name})
    return tok.decode(outputs)


def decode(meta: dict[str, Any], tokens: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Model outputs -> uint8 images (B, H, W, C) with the tokenizer the data was made with."""
    return decode_with(from_spec(meta["tokenizer"]), meta, tokens)


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


def reconstruction_grid(model, images: np.ndarray | torch.Tensor):
    """Originals (a row of uint8 (B, H, W, C) images) above the codec model's reconstructions."""
    images = torch.as_tensor(images)
    recon = model.reconstruct(images)  # (B, H, W, C) uint8
    return grid_image(torch.cat([images, recon.to(images.dtype)]), rows=2)


def sample_grid(model, meta: dict[str, Any], sample: SampleConfig, out: str | Path | None,
                device: str | torch.device = "cpu") -> dict[str, Any]:
    """Draw sample.per_label samples of each requested class; one row per class; optional PNG."""
    classes = parse_labels(sample.labels, meta["data"]["num_classes"])
    labels = [c for c in classes for _ in range(sample.per_label)]
    tokens = generate(model, meta, labels, sample, device)
    images = decode(meta, tokens)
    pictures = family_of(meta).pictures(meta, tokens, images)  # e.g. grain maps beside the samples
    written = []
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        grid_image(images, rows=len(classes)).save(out)
        for name, picture in pictures.items():
            path = Path(out).with_name(f"{Path(out).stem}-{name}{Path(out).suffix or '.png'}")
            grid_image(picture, rows=len(classes)).save(path)
            written.append(str(path))
    return {"labels": torch.tensor(labels), "tokens": tokens, "images": images, "sample": asdict(sample),
            "pictures": written}


def is_digits(meta: dict[str, Any]) -> bool:
    return meta["data"].get("source") == "digits"


def load_edit_inputs(meta: dict[str, Any], image_path: str | Path, mask_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An image and a mask for zero-shot editing -> (tokens (1, h, w), keep (h, w) bool).

    The image is resized and centre-cropped to the model's image size and tokenized with the
    data set's tokenizer. The mask is read as grayscale and resized to the token grid: white
    (>= 128) marks tokens to regenerate, black marks tokens to keep.
    """
    from PIL import Image

    from raygen.platform.data.sources import fit_image

    tok = from_spec(meta["tokenizer"])
    try:
        with Image.open(image_path) as im:
            arr = fit_image(im, tok.image_size, "L" if tok.channels == 1 else "RGB", True, str(image_path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the image to edit '{image_path}': {e}") from None
    try:
        with Image.open(mask_path) as m:
            h, w = tok.grid
            mask = np.asarray(m.convert("L").resize((w, h), Image.Resampling.NEAREST))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the mask '{mask_path}': {e}") from None
    keep = torch.from_numpy(mask < 128)
    if bool(keep.all()) or not bool(keep.any()):
        what = "nothing to regenerate (the mask is all black)" if keep.all() else "nothing to keep (the mask is all white)"
        raise UserError(f"the mask '{mask_path}' leaves {what}; white marks what to regenerate")
    tokens = tok.encode(torch.from_numpy(arr)[None])
    return tokens, keep


@torch.inference_mode()
def edit_grid(model, meta: dict[str, Any], tokens: torch.Tensor, keep: torch.Tensor, sample: SampleConfig,
              out: str | Path | None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Regenerate the masked tokens under each requested label, sample.per_label times each.

    Row r of the grid is label r: the original (with the region blanked) first, then its edits.
    """
    family = family_of(meta)
    if not family.can_edit(meta):
        able = ", ".join(f.name for f in families.all_families() if f.can_edit(meta)) or "none"
        raise UserError(f"the {meta['family']} family cannot edit images: editing needs any-order decoding "
                        f"(families that edit: {able})")
    knobs = family.check_knobs(sample.knobs, meta)
    classes = parse_labels(sample.labels, meta["data"]["num_classes"])
    labels = torch.tensor([c for c in classes for _ in range(sample.per_label)], device=device)
    g = torch.Generator(device=device).manual_seed(sample.seed)
    base = tokens.to(device).expand(len(labels), -1, -1)
    edited = model.edit(labels, base, keep.to(device), cfg_scale=sample.cfg_scale, steps=sample.steps,
                        temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p, generator=g,
                        **family.generate_kwargs(model, knobs)).cpu()
    images = decode(meta, edited)
    if out is not None:
        original = decode(meta, tokens.cpu())[0]
        scale = original.shape[0] // keep.shape[0]
        hole = keep.repeat_interleave(scale, 0).repeat_interleave(scale, 1)[..., None]
        shown = torch.where(hole, original, torch.full_like(original, 128))
        rows = []
        for r in range(len(classes)):
            rows.append(shown[None])
            rows.append(images[r * sample.per_label : (r + 1) * sample.per_label])
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        grid_image(torch.cat(rows), rows=len(classes)).save(out)
    return {"labels": labels.cpu(), "tokens": edited, "images": images, "keep": keep}

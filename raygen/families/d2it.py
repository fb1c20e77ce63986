"""Family `d2it`: D2iT's Dynamic Grain Transformer and Dynamic Content Transformer as one model
(raygen/models/d2it.py), trained on a data set tokenized by the `dvae` codec.

It reads the coarse latents (the data column) and two side columns, `fine` (the fine latents)
and `grain` (the entropy grain map): one run trains both transformers. Sampling draws a grain map
per image (predicted by the DGT, random, or the ground truth of a data-set image of the same class,
the paper's three cases: `sample.knobs.grain_source`), then the content for it; the codec decodes
both grains through the map, and `raygen sample` writes the grain maps beside the samples (fine
red, coarse blue).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from raygen.errors import ConfigError, UserError
from raygen.families import register
from raygen.families.base import Family
from raygen.models.grain import grain_map_image
from raygen.options import option


@dataclass
class D2iTKnobs:
    grain_source: Literal["predicted", "random", "data"] = option(
        "predicted", help="where each sample's grain map comes from: the DGT, random cells, or the ground truth "
                          "of a data-set image of the same class (the paper's three cases)")
    grain_cfg_scale: float = option(1.0, min=0, help="the DGT's classifier-free guidance scale")
    grain_temperature: float = option(1.0, min=0, help="the DGT's sampling temperature (0 = greedy)")
    random_fine_ratio: float = option(0.5, min=0, max=1, help="grain_source=random: P(a cell is fine)")
    sampler: Literal["ddpm", "ddim"] = option("ddpm", help="the content sampler: DDPM with learned variance (DiT) "
                                                           "or DDIM")
    eta: float = option(0.0, min=0, help="DDIM's eta (0 = deterministic)")
    cfg_schedule: Literal["constant", "linear"] = option("constant", help="the content's guidance schedule")


class GrainBank:
    """Ground-truth grain maps of a data set's rows, by class (read once, on first use)."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self._by_class: dict[int, torch.Tensor] | None = None
        self._next: dict[int, int] = {}  # the next row of each class (successive calls continue)

    def maps(self, labels: torch.Tensor, grid: int) -> torch.Tensor:
        """labels (B,) -> (B, grid, grid): for each label the next data-set row of its class (cycling)."""
        import numpy as np
        import pyarrow.parquet as pq

        from raygen.platform.data import shards

        if self._by_class is None:
            root = Path(self.data_dir)
            try:
                manifest = shards.read_manifest(root)
            except Exception as e:  # noqa: BLE001 - a moved or deleted data set: say which
                raise UserError(f"sample.knobs.grain_source=data reads the training data set's grain maps: "
                                f"{e}") from None
            grains, labels_all = [], []
            for s in manifest["shards"]:
                table = pq.read_table(root / s["file"], columns=["grain", "label"])
                grains.append(np.stack(table.column("grain").to_numpy(zero_copy_only=False)))
                labels_all.append(table.column("label").to_numpy())
            g, lab = torch.from_numpy(np.concatenate(grains)).long(), torch.from_numpy(np.concatenate(labels_all))
            self._by_class = {int(c): g[lab == c] for c in lab.unique()}
        out = []
        for label in labels.tolist():
            rows = self._by_class.get(int(label))
            if rows is None or not len(rows):
                raise UserError(f"sample.knobs.grain_source=data: the data set has no image of class {label}")
            i = self._next.get(label, 0)
            self._next[label] = i + 1
            out.append(rows[i % len(rows)].reshape(grid, grid))
        return torch.stack(out)


class D2iTFamily(Family):
    name = "d2it"
    data_kind = "latents"
    side_columns = ("fine", "grain")
    knobs = D2iTKnobs

    def generate_kwargs(self, model, knobs: D2iTKnobs) -> dict[str, Any]:
        kw = {k: v for k, v in vars(knobs).items() if k != "grain_source"}
        return {**kw, "grain_source": "predicted" if knobs.grain_source == "data" else knobs.grain_source}

    def generate(self, model, labels: torch.Tensor, sample, generator: torch.Generator, knobs: D2iTKnobs, **extra):
        if knobs.grain_source == "data":
            bank = getattr(model, "grain_bank", None)
            if bank is None:
                raise ConfigError("sample.knobs.grain_source=data needs the model's training data set (load an export)")
            extra["grain"] = bank.maps(labels.cpu(), model.config.grid_size).to(labels.device)
        return super().generate(model, labels, sample, generator, knobs, **extra)

    def load(self, directory: Path, meta: dict[str, Any], device):
        model = super().load(directory, meta, device)
        model.grain_bank = GrainBank(meta["data"]["dir"])  # read only if grain_source=data asks for it
        return model

    def pictures(self, meta: dict[str, Any], outputs: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each sample's grain map at the image's size: fine red, coarse blue (the paper's figures)."""
        grid = int(meta["data"]["grid"][0])
        grain = outputs["grain"].reshape(-1, grid, grid)
        return {"grain": grain_map_image(grain, images.shape[1] // grid)}


register(D2iTFamily())

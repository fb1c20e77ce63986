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
from raygen.families.base import Family, PaperRow
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


# D2iT's Table 2 (ImageNet 256, FID-50K): D2iT-XL with and without classifier-free guidance ("-G"). The
# sources give no sampler, step count, guidance scale or grain-map setting: DiT's (docs/models.md sec. 5),
# 250 DDPM steps with learned variance, CFG 1.5, is assumed, with the grain map predicted by the DGT
# (Table 5: the paper's pipeline) without guidance at temperature 1. Left out: D2iT-L and D2iT-B (FFHQ
# results only: Tables 1, 3-5).
TABLE_2 = "D2iT (arXiv 2504.09454), Table 2"
ASSUMED = ("Assumed (not in the sources): DiT's sampler, 250 respaced DDPM steps with learned variance, temperature "
           "1; the grain map predicted by the Dynamic Grain Transformer without guidance at temperature 1.")


def _sample(cfg: float) -> dict:
    knobs = {"grain_source": "predicted", "grain_cfg_scale": 1.0, "grain_temperature": 1.0, "random_fine_ratio": 0.5,
             "sampler": "ddpm", "eta": 0.0, "cfg_schedule": "constant"}
    return {"cfg_scale": cfg, "steps": 250, "temperature": 1.0, "knobs": knobs}


D2IT_PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow(key="cfg", size="XL", paper=TABLE_2, model="D2iT-XL-G", params="687M", sample=_sample(1.5), fid=1.73,
             inception_score=307.89, precision=0.87, recall=0.56,
             note="With classifier-free guidance; the scale is not in the sources: DiT's 1.5 (constant) is assumed. "
                  + ASSUMED),
    PaperRow(key="no-cfg", size="XL", paper=TABLE_2, model="D2iT-XL", params="687M", sample=_sample(1.0), fid=5.74,
             inception_score=156.29, precision=0.72, recall=0.66,
             note="Without guidance (CFG 1: the table's rows without -G). " + ASSUMED),
)


class D2iTFamily(Family):
    name = "d2it"
    data_kind = "latents"
    side_columns = ("fine", "grain")
    knobs = D2iTKnobs
    paper_rows = D2IT_PAPER_ROWS

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

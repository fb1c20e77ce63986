"""The extension point: everything the platform needs from a model family, declared in one class.

The platform (`raygen/platform/`) and the jobs (`raygen/jobs/`) never name a family. They look
one up by name (`raygen.families.get(cfg.model.family)`, or from an export's config.json) and
ask it:

    data_kind, side_columns   which shard columns it trains on (checked against the manifest)
    arch_from_data(data)      model config fields the data decides (vocab, grid, classes, latent width)
    settings / settings_help  its typed config section, at cfg.<name> (e.g. cfg.ctf.clusters)
    prepare(...) -> Prepared  what it makes on the driver before workers start (CTF's lookup):
                              arch fields, a payload for the workers, params, artifacts, export meta
    bind(model, payload)      install that payload in a freshly built model on a worker
    knobs / knobs_for(meta)   its typed sampling knobs (sample.knobs.*), checked like config keys
    generate(...)             one call of the model's sampler with the common options and the knobs
    pictures(...)             pictures written beside a sample grid (a grain map per sample)
    load(directory, meta)     how an export is composed (one model, or parts such as two stages)
    can_sample / can_edit     capabilities of a model of this family
    can_reconstruct           its models are codecs (an autoencoder): reconstruction grids and metrics
    paper_rows                the rows of its paper's results table an evaluation can reproduce
                              (`raygen eval MODEL --protocol paper`): size, sampling settings, scores
    finalize_export           export fields measured after training (a codec's latent scale)
    add_commands(sub)         extra CLI verbs (`raygen cluster`); add_register_args / compose for
                              exports made of several runs (`raygen models register A --stage2 B`)

A family that needs none of the optional parts is a few lines (see `raygen/families/ar.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from raygen.errors import ConfigError, UserError
from raygen.models.base import GenerativeModel
from raygen.models.registry import build_model, family_spec
from raygen.options import section_from

if TYPE_CHECKING:  # the config tree imports the families (their sections), not the other way round
    from raygen.config import Config, SampleConfig

DATA_KINDS = ("ids", "latents", "images")  # what a data set's one data column can hold


@dataclass(frozen=True)
class DataInfo:
    """What a data set's manifest says about its rows, in the terms families use."""

    kind: str  # "ids", "latents" or "images": the data column's kind
    column: str  # the data column's name ("tokens", "latents" or "images")
    grid: tuple[int, int]  # tokens per side (h, w); images: pixels per side
    num_classes: int
    vocab_size: int | None = None  # ids: values lie in [0, vocab_size)
    token_dim: int | None = None  # latents: channels per token; images: channels per pixel
    side_columns: tuple[str, ...] = ()


@dataclass
class Prepared:
    """What a family made on the driver before the workers start; shipped, logged and exported."""

    arch: dict[str, Any] = field(default_factory=dict)  # model config fields (merged into the run's arch)
    payload: dict[str, Any] | None = None  # JSON for every worker; bind() installs it
    params: dict[str, Any] = field(default_factory=dict)  # MLflow params, e.g. {"derived.ctf_lookup": ...}
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (local file, artifact dir)
    export: dict[str, Any] = field(default_factory=dict)  # added to the export's config.json


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper's results table, as an evaluation preset (`raygen eval --protocol paper[:KEY]`).

    `sample` holds the sample.* settings the paper evaluated with (cfg_scale, steps, temperature,
    top_k, top_p and the family's knobs as {"knobs": {...}}); the scores are the paper's own,
    printed beside raygen's by `raygen report`. None = the paper does not give it.
    """

    key: str  # how --protocol paper:KEY names it, e.g. "64-steps"; the first row of a size is its default
    size: str  # the raygen size the row's model is (e.g. "L")
    paper: str  # where the numbers are: "ARPG (arXiv 2503.10568 v5), Table 2"
    model: str  # the row's model as the table names it: "ARPG-L"
    params: str  # as the paper prints it: "320M"
    sample: dict[str, Any]
    fid: float | None
    inception_score: float | None = None
    precision: float | None = None
    recall: float | None = None
    images_per_s: float | None = None
    throughput_setup: str = ""  # the hardware and batch behind images_per_s: "1xA800, batch 64, bf16"
    resolution: int = 256  # image side in pixels
    n: int = 50_000  # samples the paper's FID uses (FID-50K), balanced over the classes
    note: str = ""


@dataclass
class NoKnobs:
    """A family whose sampler has no options beyond the common ones."""


class Family:
    """One model family as the platform sees it. Subclass, set `name`, override what differs."""

    name: ClassVar[str]
    data_kind: ClassVar[str] = "ids"
    side_columns: ClassVar[tuple[str, ...]] = ()
    settings: ClassVar[type | None] = None  # the typed section at cfg.<name>; None: no section
    settings_help: ClassVar[str] = ""
    knobs: ClassVar[type] = NoKnobs  # typed sample.knobs
    paper_rows: ClassVar[tuple[PaperRow, ...]] = ()  # the paper's table rows (evaluation presets)

    # --- data ---------------------------------------------------------------------------
    def arch_from_data(self, data: DataInfo) -> dict[str, Any]:
        """Model config fields the data decides; a user's model.arch value must agree with them."""
        if data.grid[0] != data.grid[1]:
            raise UserError(f"the data set's token grid is {data.grid[0]}x{data.grid[1]}; "
                            f"the {self.name} models need a square grid")
        size_of = {"ids": {"vocab_size": data.vocab_size}, "latents": {"token_dim": data.token_dim}}[data.kind]
        return {**size_of, "num_classes": data.num_classes, "grid_size": data.grid[0]}

    def check_data(self, data: DataInfo, where: str) -> None:
        """Refuse a data set whose rows this family cannot read (wrong kind, missing side columns)."""
        if data.kind != self.data_kind:
            raise UserError(f"{where} holds {data.kind} ({data.column}); family {self.name} trains on "
                            f"{self.data_kind}: tokenize with a codec that makes {self.data_kind}")
        missing = [c for c in self.side_columns if c not in data.side_columns]
        if missing:
            raise UserError(f"{where} has no {', '.join(missing)} column(s), which family {self.name} reads")

    # --- the driver, before workers ---------------------------------------------------------
    def prepare(self, cfg: Config, manifest: dict[str, Any], data_dir: str, arch: dict[str, Any]) -> Prepared:
        return Prepared()

    def bind(self, model: GenerativeModel, payload: dict[str, Any] | None) -> None:
        """Install what prepare() shipped into a model built on a worker (no-op by default)."""

    # --- models ---------------------------------------------------------------------------
    def build(self, size: str, arch: dict[str, Any], payload: dict[str, Any] | None = None) -> GenerativeModel:
        model = build_model(self.name, size, **arch)
        self.bind(model, payload)
        return model

    def size_names(self) -> list[str]:
        return list(family_spec(self.name).sizes)

    # --- sampling -------------------------------------------------------------------------
    def knobs_for(self, meta: dict[str, Any] | None) -> type:
        """The knobs class that applies to this export (a family may have several kinds)."""
        return self.knobs

    def check_knobs(self, knobs: dict[str, Any], meta: dict[str, Any] | None = None) -> Any:
        """sample.knobs as the family's typed knobs; unknown keys and bad values are ConfigErrors."""
        cls = self.knobs_for(meta)
        if not dataclasses.fields(cls) and knobs:
            raise ConfigError(f"unknown sample.knobs {', '.join(sorted(knobs))}: family {self.name} has no "
                              "sampling knobs")
        return section_from(cls, knobs, "sample.knobs.")

    def check_sample(self, sample: SampleConfig) -> None:
        """Refuse common sampling options that do not apply to this family, as ConfigErrors (before
        any work): token filters (top_k, top_p) mean nothing to a family of continuous latents."""
        if self.data_kind != "ids" and (sample.top_k != 0 or sample.top_p != 1.0):
            raise ConfigError(f"sample.top_k={sample.top_k} / sample.top_p={sample.top_p} filter token ids; family "
                              f"{self.name} samples continuous latents (leave them at 0 / 1)")

    def generate_kwargs(self, model: GenerativeModel, knobs: Any) -> dict[str, Any]:
        """The keyword arguments the knobs become for this model's generate()/edit()."""
        return dataclasses.asdict(knobs)

    def generate(self, model: GenerativeModel, labels: torch.Tensor, sample: SampleConfig, generator: torch.Generator,
                 knobs: Any, **extra: Any) -> torch.Tensor:
        """One generate() call with the common options and the knobs `check_knobs` returned.

        sample.graphs goes to samplers that take the execution options (`sampling_entry`'s) only.
        """
        from raygen.models.sampling import takes_execution_options

        if takes_execution_options(model.generate):
            graphs = {True: "on", False: "off"}.get(sample.graphs, sample.graphs)  # type: ignore[call-overload]
            extra = {"graphs": graphs, **extra}
        return model.generate(labels, cfg_scale=sample.cfg_scale, steps=sample.steps, temperature=sample.temperature,
                              top_k=sample.top_k, top_p=sample.top_p, generator=generator,
                              **self.generate_kwargs(model, knobs), **extra)

    def pictures(self, meta: dict[str, Any], outputs: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pictures to write beside a sample grid, one per sample, laid out like it: name -> uint8
        (B, H, W, C) (`raygen sample --out S.png` writes S-NAME.png); none by default."""
        return {}

    def can_sample(self, meta: dict[str, Any]) -> bool:
        """Whether an export of this family samples on its own (a CTF stage 2 does not)."""
        return True

    def can_edit(self, meta: dict[str, Any]) -> bool:
        return False

    def paper_size(self, meta: dict[str, Any]) -> str:
        """The size `paper_rows` name an export by (an export made of parts may name itself otherwise)."""
        return str(meta.get("size"))

    def can_reconstruct(self, meta: dict[str, Any]) -> bool:
        """Whether its models are codecs: `model.reconstruct(images)` instead of sampling (the
        platform logs originals above reconstructions, and reconstruction metrics)."""
        return False

    def finalize_export(self, model: torch.nn.Module, meta: dict[str, Any], images: torch.Tensor) -> dict[str, Any]:
        """Fields to update in a finished run's export config.json, measured on up to a few
        hundred of the data set's rows `images` (a codec's latent scale); none by default."""
        return {}

    # --- exports --------------------------------------------------------------------------
    def load(self, directory: Path, meta: dict[str, Any], device: str | torch.device) -> GenerativeModel:
        """Rebuild an export's model from config.json and model.pt (weights only, no DeepSpeed)."""
        model = build_model(self.name, meta["size"], **meta["arch"])
        state = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"cannot load the model in '{directory}': {str(e).splitlines()[0]}") from None
        return model.to(device).eval()

    # --- the command line -----------------------------------------------------------------
    def add_commands(self, sub) -> None:
        """Add this family's own verbs to the `raygen` parser (none by default)."""

    def add_register_args(self, parser) -> None:
        """Add options to `raygen models register` for exports made of several runs."""

    def compose(self, uri: str, run_id: str, args, workdir: str) -> tuple[str, str] | None:
        """When this family's register options were given: build the composite run, return
        (its run id, a line for the user); None otherwise."""
        return None

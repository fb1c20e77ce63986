"""The model contract every family follows, so the training loop stays family-agnostic.

A family is a model class plus a dataclass config and a dict of named sizes; `FamilySpec`
bundles the three for `raygen.models.registry`. The training loop drives a `TrainableModel`
(forward -> losses, optimizer groups, cost, and optionally a critic trained beside it with
its own optimizer, as a GAN discriminator is); a generator family's model is a
`GenerativeModel`, a TrainableModel that also samples, configured by a `ModelConfig`.

    out = model({"tokens": (B, N) ids, "label": (B,) ids}, generator=g)  # {"loss", "acc", ...}
    ids = model.generate(labels, cfg_scale=2.0, temperature=1.0, generator=g)  # (B, G, G)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
    mfu = model.flops_per_sample() * samples_per_s / peak_flops
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from raygen.models.sampling import SamplingOptions, sampling_entry


@dataclasses.dataclass
class ModelConfig:
    """Fields every family config carries; JSON-serialisable with dataclasses.asdict."""

    vocab_size: int = 16384  # token ids lie in [0, vocab_size); LlamaGen VQ-16 codebook
    num_classes: int = 1000  # class labels lie in [0, num_classes); the null class is extra
    grid_size: int = 16  # tokens per side; a sample is grid_size**2 tokens in raster order

    def __post_init__(self) -> None:
        bad = {f: getattr(self, f) for f in ("vocab_size", "num_classes", "grid_size") if getattr(self, f) < 1}
        if bad:
            raise ValueError(f"{type(self).__name__}: these fields must be positive integers, got {bad}")

    @property
    def seq_len(self) -> int:
        """Tokens per sample (grid_size**2)."""
        return self.grid_size**2


class TrainableModel(nn.Module, ABC):
    """What the training loop drives: forward -> {"loss", detached scalar metrics}, AdamW groups, cost."""

    config: Any

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None,
                **kw: Any) -> dict[str, torch.Tensor]:
        """batch (the data column and "label") -> {"loss": scalar, extra detached scalars}.

        `generator` drives every random choice in forward except nn.Dropout; it must live on
        the model's device. Every extra 0-d entry is averaged over the log window and logged
        as train/<key>.
        """

    @abstractmethod
    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (forward + backward)."""

    # --- a critic trained beside the model (a GAN discriminator) ---------------------------
    def make_critic(self) -> nn.Module | None:
        """A second module with its own optimizer, or None (the default: no critic).

        When a model has one, from optimizer step `critic_start` on the loop passes it to
        forward as `critic=` (frozen: the model's loss flows through it, its weights get no
        gradient), and forward returns "critic_batch": the detached tensors the critic's own
        forward takes, returning {"loss", extra detached scalars} for its optimizer.
        """
        return None

    @property
    def critic_start(self) -> int:
        """The optimizer step from which the critic trains and the model's loss uses it."""
        return 0

    # --- optimiser, size and cost ---------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups (nanoGPT rule): decay every >=2-D weight (embeddings too), not norms or biases."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]

    def class_tables(self) -> dict[str, tuple[int, int]]:
        """The state-dict tensors whose rows are per class: key -> (first class row, classes).

        Rows before the class block (token ids sharing the table) and after it (the null class
        for CFG, kept last) are not per class. Fine-tuning on other classes maps these rows by
        class name (`train.init_from`). Default: the table of every module that declares one
        with a `class_rows` attribute, as LabelEmbedder does; families with another layout add theirs.
        """
        return {f"{name}.{key}".lstrip("."): rows for name, m in self.named_modules()
                if (declared := getattr(m, "class_rows", None)) for key, rows in declared.items()}

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding leaves out nn.Embedding tables (lookups, no FLOPs)."""
        total = sum(_numel(p) for p in self.parameters())
        if non_embedding:
            tables = {id(m.weight): _numel(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
            total -= sum(tables.values())
        return total

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Switch to eval mode for the block and restore the previous train/eval mode after."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def check_generator(self, generator: torch.Generator | None) -> None:
        """Fail early, with a clear message, when the generator lives on another device."""
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator is on {generator.device}, the model on {self.device}; create it there")


class GenerativeModel(TrainableModel):
    """A class-conditional token generator: forward -> losses, generate -> token grids."""

    config: ModelConfig
    standalone: ClassVar[bool] = True  # generate(labels) needs nothing else (a CTF stage 2 does)

    # --- the contract ------------------------------------------------------------------
    @abstractmethod
    def forward(
        self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """batch {"tokens": (B, N) ids, "label": (B,) ids} -> {"loss": scalar, extra detached scalars}.

        `generator` drives every random choice in forward except nn.Dropout (class-label
        dropout, orders, mask ratios); it must live on the model's device.
        """

    @sampling_entry
    @abstractmethod
    def generate(self, labels: torch.Tensor, opts: SamplingOptions, **family_knobs: Any) -> torch.Tensor:
        """labels (B,) -> token ids (B, grid, grid) int64, under inference_mode, train mode restored.

        Callers pass SamplingOptions' fields (cfg_scale, steps, temperature, top_k, top_p,
        generator) as keywords, plus the family's keyword-only knobs; implementations are
        wrapped in `sampling_entry` too, which builds the typed `opts` from them.
        """

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (forward + backward), the nanoGPT/PaLM estimate.

        6 * P * L + 12 * n_layer * dim * L**2, with P = non-embedding parameters (the output
        head counts, embedding lookups do not) and L = tokens the transformer processes per
        sample (grid_size**2). The first term is the matmuls against weights (2 FLOPs per
        multiply-add, x3 for backward); the second is attention scores and their weighted sum.
        Families whose transformer sees a different length or depth override this.
        """
        c = self.config
        return self._flops(length=c.seq_len, n_layer=c.n_layer)  # type: ignore[attr-defined]

    def _flops(self, *, length: int, n_layer: int) -> float:
        """6 * P * length + 12 * n_layer * dim * length**2 (see flops_per_sample)."""
        dim = self.config.dim  # type: ignore[attr-defined]
        return float(6 * self.num_params(non_embedding=True) * length + 12 * n_layer * dim * length**2)

    # --- helpers for families ----------------------------------------------------------
    def activation_dtype(self) -> torch.dtype:
        """The dtype activations will have: autocast's when it is on, else the weights'."""
        device_type = self.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return next(self.parameters()).dtype

    def check_labels(self, labels: torch.Tensor | list[int]) -> torch.Tensor:
        """Class ids as an int64 (B,) tensor on the model's device, each in [0, num_classes)."""
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        if labels.numel() == 0:
            raise ValueError("labels is empty; pass at least one class id")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.config.num_classes:
            raise ValueError(f"class labels must lie in [0, {self.config.num_classes}), got [{lo}, {hi}]")
        return labels

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) or (B, G, G) -> int64 (B, N), N = seq_len; another length raises."""
        tokens = tokens.long()
        if tokens.ndim == 3:
            tokens = rearrange(tokens, "b r c -> b (r c)")  # (B, N)
        if tokens.ndim != 2 or tokens.shape[1] != self.config.seq_len:
            raise ValueError(f"expected {self.config.seq_len} tokens per sample, got {tuple(tokens.shape)}")
        return tokens

    def check_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch -> its tokens (B, N) int64 (see check_tokens) and labels (B,) int64."""
        return self.check_tokens(batch["tokens"]), batch["label"].long().reshape(-1)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits (B, N, V), target ids (B, N) -> {"loss": mean cross-entropy, "acc": detached argmax accuracy}."""
    loss = F.cross_entropy(rearrange(logits, "b n v -> (b n) v"), rearrange(targets, "b n -> (b n)"))
    with torch.no_grad():
        acc = (logits.argmax(dim=-1) == targets).float().mean()
    return {"loss": loss, "acc": acc}


def _numel(p: torch.Tensor) -> int:
    # A ZeRO-3 partitioned parameter holds an empty local tensor; its full size is `ds_numel`.
    return int(getattr(p, "ds_numel", p.numel()))


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One family for the registry: its name, model class, config class and named sizes.

    model_cls is the model class, or a function config -> model for a family whose config
    chooses between classes (ctf's two stages).

    A family whose paper released weights also says how to read them (`raygen models import`):
    `official_keys` are the checkpoint entries that may hold the state dict, preferred first
    (an EMA entry before the raw one); `official_arch(state)` reads the config fields an
    official state dict's shapes fix (width, depth, vocabulary, classes); `from_official(state,
    config)` maps its keys and tensors onto this family's state dict.
    """

    family: str
    model_cls: Callable[[Any], TrainableModel]
    config_cls: type
    sizes: dict[str, Any]
    from_official: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] | None = None
    official_arch: Callable[[dict[str, torch.Tensor]], dict[str, Any]] | None = None
    official_keys: tuple[str, ...] = ("ema", "model", "module", "state_dict")

r"""raygen against the papers' OFFICIAL code: sampling and training speed at one shape, with one set of weights.

For each family it builds the official model and raygen's at the same shape, gives them the SAME
weights, and times, on the same machine and in alternating rounds:

- sample: one call of each side's sampler on the same batch of class labels -> seconds per image
  batch, images/s and `raygen_speedup` = official median seconds / raygen median seconds;
- train: one optimizer step = teacher-forced forward over all grid**2 tokens with the
  cross-entropy loss, backward, AdamW step, in float32 -> samples/s per side and the same ratio.

Families and the official code they run (imported at run time from a checkout the user passes;
nothing of it is copied into this project):

    ar    LlamaGen  FoundationVision/LlamaGen  autoregressive/models/{gpt,generate}.py  (--llamagen DIR)
    arpg  ARPG      hp-l33/ARPG                models/arpg.py (needs `transformers`)     (--arpg DIR)
    nar   NAR       ThisisBillhe/NAR           NAR-images/autoregressive/models/{gpt,generate}.py
                                                                      (--nar DIR: the repo or NAR-images)

Tested against LlamaGen @ ce98ec41, ARPG @ 1a1758c3 and NAR @ 225c1fb5 (the commits of
tests/fixtures/make_{ar,arpg,nar}_official.py). A family whose directory is not given is skipped
(with a note). ARPG's models/arpg.py imports `transformers` (ModelArgs subclasses its
PretrainedConfig); if this interpreter lacks it, install it into a scratch directory and pass that
as --arpg-site DIR (appended to sys.path, so it never shadows this environment's packages).

Fairness rules:

- same shape: width, depth, heads, vocabulary, classes, grid, batch. `ar` has `--layers` blocks;
  `arpg` has `--layers` / 2 context + `--layers` / 2 guided-decoder blocks on both sides (the
  official split; `--layers` must be even); `nar` has `--layers` backbone blocks + its one
  vertical-head block on both sides. Every dropout is 0 on both sides except the class-label
  dropout, 0.1 on both (it adds the null class for CFG and is drawn in each side's training
  forward, as its own training does).
- same weights: the official model is built, every parameter re-drawn from one seeded generator
  (RMSNorm gains 1 + 0.1 N(0, 1), everything else 0.02 N(0, 1): the official inits zero the
  heads, which would make every logit equal), and the SAME tensors are loaded into raygen's model
  with the family's `from_official` and a strict load_state_dict. `weights_check` reports the
  largest |difference| between the two sides' teacher-forced logits on two rows.
- same inputs: the same class labels for sampling and the same random tokens/labels for training.
- same sampling settings, the official defaults where they exist: temperature 1.0, top-k 0 (off),
  top-p 1.0 (off), CFG at `--cfg` on both (each side doubles the batch with the null class);
  LlamaGen/NAR: guidance at every step (cfg_interval -1); ARPG: `--arpg-steps` steps (64), the
  arccos step schedule and the linear CFG schedule. `work` reports, per side, the forward passes
  per image batch, the batch rows each pass runs (2B under CFG) and the tokens each pass feeds;
  `same_work` says whether the two sides agree.
- same machine, alternating rounds: sampling runs one untimed warm-up per side, then `--rounds`
  rounds of (official, raygen); training runs one untimed warm-up step per side (it also builds
  AdamW's state), then `--rounds` rounds of (`--train-steps` official steps, as many raygen
  steps). Medians are reported beside every timing. Both sides get the same AdamW (lr 1e-4,
  betas (0.9, 0.95), weight decay 0.05 on every parameter, fused=False, foreach default).
- each side runs its own code path unchanged; the only touch to official code is NAR's sampler
  progress bar, created with tqdm's disable=True (it would write to stderr on every step).

Examples (the official trees exported outside this repository):

    git -C <LlamaGen clone> archive ce98ec41803a74a90ce68c40ababa9eaeffeb4ec autoregressive utils \
        | tar -x -C /tmp/official_llamagen
    git -C <ARPG clone> archive HEAD | tar -x -C /tmp/official_arpg
    python -m pip install --target /tmp/official_arpg/site transformers
    git -C <NAR clone> archive HEAD NAR-images | tar -x -C /tmp/official_nar

    python bench/official.py --families ar,arpg,nar --llamagen /tmp/official_llamagen \
        --arpg /tmp/official_arpg --arpg-site /tmp/official_arpg/site --nar /tmp/official_nar \
        --threads 16 > official.json                                   # default shape (below)
    python bench/official.py --families arpg --arpg /tmp/official_arpg --arpg-site /tmp/official_arpg/site \
        --width 1024 --layers 24 --heads 16 --batch 32 --what sample --device cuda   # ARPG-L
    python bench/official.py --families ar,arpg,nar --llamagen /tmp/official_llamagen \
        --arpg /tmp/official_arpg --arpg-site /tmp/official_arpg/site --nar /tmp/official_nar \
        --width 64 --layers 2 --heads 2 --batch 2 --grid 4 --vocab 64 --arpg-steps 4 \
        --rounds 1 --train-steps 1                                     # smoke test, seconds

Default shape: width 512, 12 layers, 8 heads, batch 16, 16x16 grid, vocabulary 16384, 1000
classes, CFG 2.0, 64 ARPG steps, 2 rounds, 3 training steps per round, on the CPU.

Prints ONE JSON object on stdout (progress goes to stderr):
    {"device", "torch", "threads", "shape", "settings",
     "families": {family: {"official_code", "params", "weights_check", "sample", "train"}}, "notes"}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raygen.models import build_model, family_spec  # noqa: E402
from raygen.models.sampling import categorical  # noqa: E402

FAMILIES = ("ar", "arpg", "nar")
WHAT = ("sample", "train")
CLASS_DROPOUT = 0.1  # both sides: the official default, and what gives the class table its null row
WEIGHT_STD = 0.02  # re-drawn weights: N(0, 0.02); RMSNorm gains 1 + 0.1 N(0, 1)
CHECK_ROWS = 2  # rows of the teacher-forced weights check
ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)  # both sides, fused=False


def log(message: str) -> None:
    print(f"[official] {message}", file=sys.stderr, flush=True)


# --- run configuration ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """The architecture and batch both sides are built and run at."""

    width: int
    layers: int
    heads: int
    batch: int
    grid: int
    vocab: int
    classes: int

    @property
    def tokens(self) -> int:
        return self.grid * self.grid


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything else a run needs."""

    cfg: float
    arpg_steps: int
    rounds: int
    train_steps: int
    device: torch.device
    seed: int


# --- importing official code ------------------------------------------------------------------


def _module_files(module: ModuleType) -> list[str]:
    files = [getattr(module, "__file__", None)]
    with contextlib.suppress(Exception):
        files += list(getattr(module, "__path__", None) or [])  # namespace packages have no __file__
    return [f for f in files if f]


def _is_under(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root)


@contextlib.contextmanager
def official_imports(root: Path, keep: tuple[Path, ...] = ()) -> Iterator[None]:
    """Import from `root` inside the block; afterwards take it off sys.path and forget its modules.

    LlamaGen and NAR both have top-level `autoregressive` and `utils` directories (namespace
    packages: no __init__.py), so one family's import must not see, or be served, the other's.
    The module objects the caller holds stay alive; modules under `keep` (a site directory such
    as --arpg-site that may lie inside the checkout) stay in sys.modules.
    """
    root = root.resolve()
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        # decide first (root still on sys.path), delete after: a namespace package's __path__ is
        # recomputed from sys.path and from its parent package's entry in sys.modules
        files = {name: _module_files(sys.modules[name]) for name in set(sys.modules) - before}
        sys.path.remove(str(root))
        for name, paths in files.items():
            if any(_is_under(f, root) for f in paths) and not any(_is_under(f, k) for f in paths for k in keep):
                del sys.modules[name]
        importlib.invalidate_caches()


def import_official(root: Path, name: str) -> ModuleType:
    """Import `name` (inside `official_imports(root)`) and make sure it came from `root`."""
    module = importlib.import_module(name)
    where = getattr(module, "__file__", None)
    if not where or not _is_under(where, root.resolve()):
        raise RuntimeError(f"`import {name}` loaded {where}, not a file under {root}: is it the right checkout?")
    return module


# --- weights -----------------------------------------------------------------------------------


def redraw_(model: nn.Module, seed: int) -> None:
    """Every parameter from one seeded generator, in named_parameters order (visible scale, non-zero heads)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else WEIGHT_STD * noise)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the three families: how to build, sample and train the official models -----------------


class Family:
    """One family's official side, and the raygen knobs that match it."""

    name: str = ""
    paper: str = ""
    repo: str = ""

    def __init__(self, root: Path, shape: Shape, settings: Settings, site: Path | None = None):
        self.root, self.shape, self.settings, self.site = root, shape, settings, site
        self.notes: list[str] = []

    # what every family provides
    def load(self) -> None:
        """Import the official modules (under `official_imports`)."""
        raise NotImplementedError

    def official_model(self) -> nn.Module:
        raise NotImplementedError

    def official_head(self, model: nn.Module) -> nn.Module:
        """The vocabulary head: called once per forward pass, so its calls count the passes."""
        raise NotImplementedError

    def official_logits(self, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, N, V) of the official model (deterministic: label dropout off)."""
        raise NotImplementedError

    def raygen_logits(self, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same logits from raygen's model."""
        raise NotImplementedError

    def official_sample(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def raygen_sample_kwargs(self) -> dict[str, Any]:
        """raygen generate() keywords beyond the common ones (cfg_scale, temperature, top_k, top_p, generator)."""
        return {}

    def official_loss(self, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The official training forward's loss (train mode), as its train_c2i.py calls it."""
        raise NotImplementedError

    def before_training(self, model: nn.Module) -> None:
        """Undo what the official sampler leaves on the model that its training forward cannot take."""

    def sample_settings(self) -> dict[str, Any]:
        return {"cfg_scale": self.settings.cfg, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

    def raygen_overrides(self) -> dict[str, Any]:
        s = self.shape
        return dict(vocab_size=s.vocab, num_classes=s.classes, grid_size=s.grid, dim=s.width, n_layer=s.layers,
                    n_head=s.heads, resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0, class_dropout=CLASS_DROPOUT)

    def official_args(self) -> dict[str, Any]:
        """ModelArgs fields shared by the three official codebases."""
        s = self.shape
        return dict(dim=s.width, n_layer=s.layers, n_head=s.heads, vocab_size=s.vocab, num_classes=s.classes,
                    block_size=s.tokens, cls_token_num=1, model_type="c2i", token_dropout_p=0.0,
                    attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, drop_path_rate=0.0,
                    class_dropout_prob=CLASS_DROPOUT)

    # shared
    def build_pair(self) -> tuple[nn.Module, nn.Module]:
        """The official model with re-drawn weights, and raygen's with the same weights (strict load)."""
        torch.manual_seed(self.settings.seed)
        official = self.official_model()
        redraw_(official, self.settings.seed)
        state = {k: v.detach().clone() for k, v in official.state_dict().items()}
        ours = build_model(self.name, "debug", **self.raygen_overrides())
        ours.load_state_dict(family_spec(self.name).from_official(state, ours.config), strict=True)
        device = self.settings.device
        return official.to(device), ours.to(device)


class LlamaGen(Family):
    name, paper, repo = "ar", "LlamaGen", "FoundationVision/LlamaGen"

    def load(self) -> None:
        with official_imports(self.root):
            self.gpt = import_official(self.root, "autoregressive.models.gpt")
            self.gen = import_official(self.root, "autoregressive.models.generate")
        self.notes.append(
            "ar: the official sampler draws with torch.multinomial and attends, at every decode step, over its "
            "whole preallocated KV cache (find_multiple(N + 1, 8) slots) under a mask; raygen draws by "
            "inverse CDF and reads only the filled cache prefix. Both are the implementations' own costs "
            "and stay in the timings (see sample.draw_ms for the draw alone)."
        )
        if self.settings.cfg < 1.0:
            self.notes.append("ar: the official sampler guides only when cfg > 1; raygen whenever cfg != 1.")

    def official_model(self) -> nn.Module:
        return self.gpt.Transformer(self.gpt.ModelArgs(**self.official_args()))

    def official_head(self, model: nn.Module) -> nn.Module:
        return model.output

    def official_logits(self, model, tokens, labels):
        model.eval()  # no label dropout; the naive (uncached) path is causal, as in training
        n = self.shape.tokens
        return model(cond_idx=labels, idx=tokens[:, :-1], input_pos=torch.arange(n, device=tokens.device))[0]

    def raygen_logits(self, model, tokens, labels):
        model.eval()
        return model.logits_uncached(tokens[:, :-1], labels=labels)  # (B, N, V)

    def official_sample(self, model, labels):
        s = self.settings
        return self.gen.generate(model, labels, self.shape.tokens, cfg_scale=s.cfg, cfg_interval=-1,
                                 temperature=1.0, top_k=0, top_p=1.0)

    def official_loss(self, model, tokens, labels):
        return model(cond_idx=labels, idx=tokens[:, :-1], targets=tokens)[1]

    def before_training(self, model: nn.Module) -> None:
        for layer in model.layers:  # generate()'s setup_caches leaves a KV cache the training forward would write to
            layer.attention.kv_cache = None


class ARPG(Family):
    name, paper, repo = "arpg", "ARPG", "hp-l33/ARPG"

    def load(self) -> None:
        if self.shape.layers % 2:
            raise ValueError(f"ARPG splits --layers evenly between its two passes; got an odd {self.shape.layers}")
        keep = (self.site.resolve(),) if self.site else ()
        if self.site and str(self.site.resolve()) not in sys.path:
            sys.path.append(str(self.site.resolve()))  # after this environment's own packages
        with official_imports(self.root, keep):
            try:
                self.arpg = import_official(self.root, "models.arpg")
            except ModuleNotFoundError as err:
                if err.name and err.name.split(".")[0] == "transformers":
                    raise RuntimeError("ARPG's models/arpg.py imports transformers: install it, or "
                                       "`pip install --target DIR transformers` and pass --arpg-site DIR") from err
                raise
        self.notes.append(
            "arpg: the official sampler draws ONE random generation order shared by the whole batch; raygen's "
            "order='random' draws one per sample (its training distribution). The model work per step is the "
            "same; raygen's per-sample orders add only a per-sample RoPE-table gather."
        )
        self.notes.append(
            "arpg: the official sampler grows its KV caches with torch.cat every step and draws with "
            "torch.multinomial; raygen writes into preallocated caches and draws by inverse CDF. Both stay in the timings."
        )
        if self.settings.cfg == 1.0:
            self.notes.append("arpg: at --cfg 1.0 the official sampler still runs the doubled (null-class) batch, "
                              "raygen runs the conditional batch alone: the comparison is not like for like.")

    def official_model(self) -> nn.Module:
        return self.arpg.Transformer(self.arpg.ModelArgs(**self.official_args()))

    def official_head(self, model: nn.Module) -> nn.Module:
        return model.head

    def official_logits(self, model, tokens, labels):
        """The official training forward with its random order fixed (as tests/fixtures/make_arpg_official.py)."""
        g = torch.Generator().manual_seed(self.settings.seed + 7)
        n = tokens.shape[1]
        self.check_order = torch.stack([torch.randperm(n, generator=g) for _ in range(len(tokens))]).to(tokens.device)
        shuffle = self.arpg.batch_seq_shuffle

        def fixed_order(x, orders=None):  # forward's one call without orders gets the fixed one
            return shuffle(x, self.check_order if orders is None else orders)

        model.train()  # the official attention is causal only in train mode (is_causal=self.training)
        dropout, model.config.class_dropout_prob = model.config.class_dropout_prob, 0.0
        self.arpg.batch_seq_shuffle = fixed_order
        try:
            with torch.no_grad():
                return model(tokens, labels.clone(), targets=tokens)[0]  # (B, N, V) in the fixed order
        finally:
            self.arpg.batch_seq_shuffle = shuffle
            model.config.class_dropout_prob = dropout

    def raygen_logits(self, model, tokens, labels):
        model.eval()
        return model.teacher_forced_logits(tokens, labels=labels, order=self.check_order)

    def official_sample(self, model, labels):
        model.eval()  # in train mode its attention would be causal inside a step
        return model.generate(labels, guidance_scale=self.settings.cfg, cfg_schedule="linear", sample_schedule="arccos",
                              temperature=1.0, top_k=0, top_p=1.0, seq_len=self.shape.tokens,
                              num_iter=self.settings.arpg_steps)

    def raygen_sample_kwargs(self) -> dict[str, Any]:
        return dict(steps=self.settings.arpg_steps, order="random", schedule="arccos", cfg_schedule="linear")

    def sample_settings(self) -> dict[str, Any]:
        return {**super().sample_settings(), "steps": self.settings.arpg_steps, "schedule": "arccos",
                "cfg_schedule": "linear",
                "order": {"official": "random, one shared by the batch", "raygen": "random, one per sample"}}

    def official_loss(self, model, tokens, labels):
        return model(tokens, labels, targets=tokens)[1]

    def before_training(self, model: nn.Module) -> None:
        model.setup_kv_cache(enable=False)  # generate() already does this; harmless


class NAR(Family):
    name, paper, repo = "nar", "NAR", "ThisisBillhe/NAR"

    def __init__(self, root: Path, *args: Any, **kwargs: Any):
        if (root / "NAR-images").is_dir():  # the repository root or its NAR-images directory
            root = root / "NAR-images"
        super().__init__(root, *args, **kwargs)

    def load(self) -> None:
        with official_imports(self.root):
            self.gpt = import_official(self.root, "autoregressive.models.gpt")
            self.gen = import_official(self.root, "autoregressive.models.generate")
        # the decoding loop wraps its range in tqdm: keep the official loop, silence the bar
        self.gen.tqdm = functools.partial(self.gen.tqdm, disable=True)
        self.notes.append(
            "nar: the official sampler draws each position of a diagonal with its own torch.multinomial call, "
            "attends over its whole preallocated KV cache under a mask at every pass, and forces the math SDPA "
            "kernel; raygen draws a diagonal at once by inverse CDF and reads only the cache slots below the "
            "diagonal. Both stay in the timings. Its tqdm progress bar is created with disable=True."
        )
        if self.settings.cfg < 1.0:
            self.notes.append("nar: the official sampler guides only when cfg > 1; raygen whenever cfg != 1.")

    def official_model(self) -> nn.Module:
        return self.gpt.Transformer(self.gpt.ModelArgs(**self.official_args(), medusa_attention_num=1))

    def official_head(self, model: nn.Module) -> nn.Module:
        return model.output  # the horizontal head; the vertical one runs in the same pass

    def training_mask(self, model: nn.Module, batch: int) -> torch.Tensor:
        """The mask train_c2i.py passes to the training forward: (batch, 1 + N, 1 + N) bool."""
        length = model.cls_token_num + model.block_size
        mask = torch.tril(torch.ones(length, length, dtype=torch.bool))
        model.setup_proximity_mask(mask[-model.block_size:, -model.block_size:], model.block_size)
        return mask.unsqueeze(0).repeat(batch, 1, 1).to(self.settings.device)

    def official_logits(self, model, tokens, labels):
        model.eval()
        mask = self.training_mask(model, len(tokens))
        return model(idx=tokens, cond_idx=labels, mask=mask)[0]  # (B, N, V)

    def raygen_logits(self, model, tokens, labels):
        model.eval()
        return model.logits_uncached(tokens, labels=labels)  # (B, N, V)

    def official_sample(self, model, labels):
        s = self.settings
        return self.gen.generate(model, labels, self.shape.tokens, cfg_scale=s.cfg, cfg_interval=-1,
                                 temperature=1.0, top_k=0, top_p=1.0)

    def raygen_sample_kwargs(self) -> dict[str, Any]:
        return dict(cfg_interval=-1)

    def sample_settings(self) -> dict[str, Any]:
        return {**super().sample_settings(), "cfg_interval": -1}

    def official_loss(self, model, tokens, labels):
        if getattr(self, "_mask", None) is None or self._mask.shape[0] != len(tokens):
            self._mask = self.training_mask(model, len(tokens))
        return model(idx=tokens, cond_idx=labels, targets=tokens, mask=self._mask)[1]

    def before_training(self, model: nn.Module) -> None:
        for layer in model.layers:  # generate()'s setup_caches leaves KV caches the training forward would write to
            layer.attention.kv_cache = None


FAMILY_CLASSES: dict[str, type[Family]] = {"ar": LlamaGen, "arpg": ARPG, "nar": NAR}


# --- timing --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(official: Callable[[int], Any], ours: Callable[[int], Any], rounds: int,
              device: torch.device) -> tuple[list[float], list[float]]:
    """Round r runs official(r) then ours(r), each timed; callers warm up first."""
    times_official, times_ours = [], []
    for r in range(rounds):
        times_official.append(timed(lambda: official(r), device))
        times_ours.append(timed(lambda: ours(r), device))
        log(f"  round {r + 1}/{rounds}: official {times_official[-1]:.3f}s, raygen {times_ours[-1]:.3f}s")
    return times_official, times_ours


def sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (for a readable JSON)."""
    return float(f"{x:.{digits}g}") if x and math.isfinite(x) else x


@contextlib.contextmanager
def head_calls(head: nn.Module) -> Iterator[list[tuple[int, int]]]:
    """Record (batch rows, tokens) of each call of a vocabulary head: one per forward pass."""
    calls: list[tuple[int, int]] = []
    handle = head.register_forward_hook(lambda m, inputs, out: calls.append(tuple(inputs[0].shape[:2])))
    try:
        yield calls
    finally:
        handle.remove()


def summarize_work(calls: list[tuple[int, int]], with_tokens: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"forward_passes": len(calls), "batch_rows": sorted({rows for rows, _ in calls})}
    if with_tokens:
        out["tokens_per_pass"] = [tokens for _, tokens in calls]
    return out


def draw_ms(rows: int, vocab: int, device: torch.device, reps: int = 5) -> dict[str, float]:
    """Milliseconds to draw one id for each of `rows` rows of a V-way distribution, both ways."""
    g = torch.Generator(device).manual_seed(0)
    probs = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).softmax(-1).to(device)
    fns = {"torch.multinomial (official)": lambda: torch.multinomial(probs, 1),
           "inverse CDF (raygen)": lambda: categorical(probs, generator=g)}
    out = {}
    for name, fn in fns.items():
        fn()
        out[name] = sig(1e3 * statistics.median(timed(fn, device) for _ in range(reps)))
    return out


# --- the two benchmarks --------------------------------------------------------------------------


def side_summary(seconds: list[float], batch: int) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {"seconds": [sig(t) for t in seconds], "median_s": sig(median), "images_per_s": sig(batch / median)}


def bench_sample(family: Family, official: nn.Module, ours: nn.Module, labels: torch.Tensor) -> dict[str, Any]:
    s, device = family.settings, family.settings.device
    kwargs = dict(cfg_scale=s.cfg, temperature=1.0, top_k=0, top_p=1.0, **family.raygen_sample_kwargs())
    official.eval()

    def run_official(r: int) -> torch.Tensor:
        torch.manual_seed(s.seed + 1 + r)  # the official samplers draw from the global generator
        return family.official_sample(official, labels)

    def run_ours(r: int) -> torch.Tensor:
        return ours.generate(labels, generator=torch.Generator(device).manual_seed(s.seed + 1 + r), **kwargs)

    log(f"{family.name}: sample warm-up")
    tokens_too = family.name in ("arpg", "nar")
    with head_calls(family.official_head(official)) as calls:
        out_official = run_official(-1)
    work_official = summarize_work(calls, tokens_too)
    with head_calls(ours.output) as calls:
        out_ours = run_ours(-1)
    work_ours = summarize_work(calls, tokens_too)
    n = family.shape.tokens
    shapes_ok = out_official.reshape(len(labels), -1).shape == (len(labels), n) == out_ours.reshape(len(labels), -1).shape
    if not shapes_ok:
        family.notes.append(f"{family.name}: sampler outputs {tuple(out_official.shape)} vs {tuple(out_ours.shape)}")

    seconds_official, seconds_ours = alternate(run_official, run_ours, s.rounds, device)
    same_work = work_official == work_ours
    if not same_work:
        family.notes.append(f"{family.name}: the two samplers did different work (see sample.work); "
                            "the ratio compares unequal computations")
    return {
        "settings": family.sample_settings(),
        "labels": labels.tolist(),
        "official": side_summary(seconds_official, len(labels)),
        "raygen": side_summary(seconds_ours, len(labels)),
        "raygen_speedup": sig(statistics.median(seconds_official) / statistics.median(seconds_ours)),
        "work": {"official": work_official, "raygen": work_ours},
        "same_work": same_work,
        "draw_ms": {"rows": len(labels), **draw_ms(len(labels), family.shape.vocab, device)},
    }


def bench_train(family: Family, official: nn.Module, ours: nn.Module, tokens: torch.Tensor,
                labels: torch.Tensor) -> dict[str, Any]:
    s, device = family.settings, family.settings.device
    family.before_training(official)
    official.train()
    ours.train()
    opt_official = torch.optim.AdamW(official.parameters(), **ADAMW, fused=False)
    opt_ours = torch.optim.AdamW(ours.parameters(), **ADAMW, fused=False)
    g = torch.Generator(device).manual_seed(s.seed + 100)  # raygen's label dropout and orders
    batch = {"tokens": tokens, "label": labels}

    def step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.detach()

    def official_step() -> torch.Tensor:
        return step(opt_official, lambda: family.official_loss(official, tokens, labels))

    def our_step() -> torch.Tensor:
        return step(opt_ours, lambda: ours(batch, generator=g)["loss"])

    log(f"{family.name}: train warm-up")
    torch.manual_seed(s.seed + 100)  # the official label dropout (and ARPG's orders) use the global generator
    first = {"official": sig(official_step().item()), "raygen": sig(our_step().item())}

    def chunk(step_fn: Callable[[], torch.Tensor]) -> Callable[[int], None]:
        def run(r: int) -> None:
            for _ in range(s.train_steps):
                step_fn()
        return run

    seconds_official, seconds_ours = alternate(chunk(official_step), chunk(our_step), s.rounds, device)

    def summary(seconds: list[float]) -> dict[str, Any]:
        per_step = statistics.median(seconds) / s.train_steps
        return {"seconds_per_chunk": [sig(t) for t in seconds], "median_step_s": sig(per_step),
                "samples_per_s": sig(len(tokens) / per_step)}

    return {
        "settings": {"steps_per_chunk": s.train_steps, "dtype": "float32", "class_dropout": CLASS_DROPOUT,
                     "optimizer": {"name": "AdamW", **ADAMW, "fused": False}},
        "official": summary(seconds_official),
        "raygen": summary(seconds_ours),
        "raygen_speedup": sig(statistics.median(seconds_official) / statistics.median(seconds_ours)),
        "first_step_loss": first,
    }


def weights_check(family: Family, official: nn.Module, ours: nn.Module, tokens: torch.Tensor,
                  labels: torch.Tensor) -> dict[str, Any]:
    """Teacher-forced logits of both sides on the first rows: the same weights must give the same numbers."""
    with torch.no_grad():
        a = family.official_logits(official, tokens, labels).float()
        b = family.raygen_logits(ours, tokens, labels).float()
    if a.shape != b.shape:
        raise RuntimeError(f"{family.name}: official logits {tuple(a.shape)} vs raygen {tuple(b.shape)}")
    diff = float((a - b).abs().max())
    std = float(a.std())
    ok = diff <= 1e-3 * max(1.0, std) and std > 1e-3
    if not ok:
        family.notes.append(f"{family.name}: weights check failed (max |diff| {diff:.3g}, logits std {std:.3g})")
    return {"rows": len(tokens), "max_abs_diff": sig(diff, 3), "official_logits_std": sig(std, 3), "ok": ok}


def bench_family(family: Family, what: tuple[str, ...]) -> dict[str, Any]:
    shape, s = family.shape, family.settings
    family.load()
    official, ours = family.build_pair()
    result: dict[str, Any] = {
        "official_code": {"repo": family.repo, "paper": family.paper, "dir": str(family.root)},
        "params": {"official": num_params(official), "raygen": num_params(ours)},
    }
    g = torch.Generator().manual_seed(s.seed)
    labels = torch.randint(0, shape.classes, (shape.batch,), generator=g).to(s.device)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.tokens), generator=g).to(s.device)
    rows = min(CHECK_ROWS, shape.batch)
    result["weights_check"] = weights_check(family, official, ours, tokens[:rows], labels[:rows])
    if "sample" in what:  # before training, which changes the weights
        result["sample"] = bench_sample(family, official, ours, labels)
    if "train" in what:
        result["train"] = bench_train(family, official, ours, tokens, labels)
    return result


# --- command line --------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}"
    return f"cpu: {platform.processor() or platform.machine()}"


def csv(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", type=csv(FAMILIES), default=FAMILIES)
    ap.add_argument("--what", type=csv(WHAT), default=WHAT, help="sample, train or both")
    ap.add_argument("--llamagen", type=Path, help="checkout of FoundationVision/LlamaGen (has autoregressive/, utils/)")
    ap.add_argument("--arpg", type=Path, help="checkout of hp-l33/ARPG (has models/arpg.py)")
    ap.add_argument("--arpg-site", type=Path, help="extra sys.path entry holding `transformers` for ARPG")
    ap.add_argument("--nar", type=Path, help="checkout of ThisisBillhe/NAR (or its NAR-images directory)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--cfg", type=float, default=2.0, help="CFG scale on both sides")
    ap.add_argument("--arpg-steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per side (after one warm-up)")
    ap.add_argument("--train-steps", type=int, default=3, help="optimizer steps per timed training chunk")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("width", "layers", "heads", "batch", "grid", "vocab", "classes", "arpg_steps", "rounds",
                 "train_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # LlamaGen's decode loop enters torch.backends.cuda.sdp_kernel (deprecated) at every step
    warnings.filterwarnings("ignore", message=r".*sdp_kernel.*", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = Shape(args.width, args.layers, args.heads, args.batch, args.grid, args.vocab, args.classes)
    settings = Settings(args.cfg, args.arpg_steps, args.rounds, args.train_steps, device, args.seed)
    dirs = {"ar": args.llamagen, "arpg": args.arpg, "nar": args.nar}
    flags = {"ar": "--llamagen", "arpg": "--arpg", "nar": "--nar"}
    notes: list[str] = []
    families: dict[str, Any] = {}
    for name in args.families:
        if dirs[name] is None:
            families[name] = {"skipped": f"no {flags[name]} directory given"}
            notes.append(f"{name}: skipped (no {flags[name]} directory given)")
            continue
        family = FAMILY_CLASSES[name](dirs[name], shape, settings, site=args.arpg_site)
        log(f"{name}: official {family.paper} from {family.root}")
        try:
            families[name] = bench_family(family, args.what)
        except Exception as err:  # one family's failure does not hide the others' results
            traceback.print_exc(file=sys.stderr)
            families[name] = {"error": f"{type(err).__name__}: {err}"}
            notes.append(f"{name}: failed: {type(err).__name__}: {err}")
        notes.extend(family.notes)
        gc.collect()
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": dataclasses.asdict(shape) | {"tokens": shape.tokens},
        "settings": {"cfg": args.cfg, "arpg_steps": args.arpg_steps, "rounds": args.rounds,
                     "train_steps": args.train_steps, "seed": args.seed, "what": list(args.what)},
        "families": families,
        "notes": notes,
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

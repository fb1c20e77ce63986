"""One typed config tree: nested dataclasses, YAML presets, `key.sub=value` overrides.

    cfg = load_config(preset="ar-debug", overrides=["train.steps=200", "data.image_size=8"])

Every key is checked: an unknown key names itself, the valid keys at its level and the
nearest match; a bad value names the key, the value and what is allowed. Derived values
are filled in once by `resolve()`, never scattered through the code.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from raygen import families
from raygen.errors import ConfigError
from raygen.options import describe_type, merge_into, option, suggest
from raygen.models.tokenizers import CODECS, DVAECodecConfig, ImagesConfig, KLCodecConfig
from raygen.models.tokenizers.palette import PaletteConfig
from raygen.models.tokenizers.pixels import PixelsConfig
from raygen.models.tokenizers.vq import VQConfig

CONFIG_DIR = Path(__file__).parent / "configs"


# --------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------


@dataclass
class RayConfig:
    address: str | None = option(None, help="Ray cluster address; null starts a local instance (RAY_ADDRESS also works)")
    num_cpus: int | None = option(None, min=1, help="CPUs of the local instance; null = every CPU of this machine")


@dataclass
class DataConfig:
    source: Literal["digits", "folder", "parquet"] = option("digits", help="where images come from")
    path: str | None = option(None, path=True, help="folder (ImageFolder layout) or Parquet file/directory for those sources")
    image_size: int | None = option(
        None, min=1, help="side in pixels after resize/crop; null = a 16x16 token grid for the tokenizer"
    )
    channels: Literal[1, 3] | None = option(None, help="1 = grayscale, 3 = RGB; null = the source's own (digits: 1)")
    resize: bool = option(True, help="resize (shorter side) then centre-crop; false = centre-crop only")
    on_bad_input: Literal["fail", "skip"] = option("fail", help="unreadable image: fail naming it, or skip and record it")
    shards: str | None = option(
        None, path=True, help="tokenized data set directory (written by tokenize, read by train); null = <workdir>/data/<source>-<tokenizer>-<size>"
    )
    rows_per_shard: int = option(512, min=1, help="rows per Parquet shard")
    classes: list[str] | None = option(
        None, help="train on these classes of the data set only, by name (e.g. [3,5,8]; a folder's names are its "
                   "subfolders), relabelled 0..k-1 in this order; null = every class")


@dataclass
class TokenizerConfig:
    name: Literal[tuple(CODECS)] = option(  # type: ignore[valid-type]
        "palette", help="which codec: palette or vq make token ids, pixels or kl continuous latents, dvae two "
                   "grains of latents and a grain map, images keeps the images (what an autoencoder trains on)")
    palette: PaletteConfig = option(help="palette tokenizer options", factory=PaletteConfig)
    vq: VQConfig = option(help="VQ tokenizer options (LlamaGen VQ-16 by default)", factory=VQConfig)
    pixels: PixelsConfig = option(help="pixels codec options (patches of the image's own pixels)", factory=PixelsConfig)
    kl: KLCodecConfig = option(help="KL autoencoder codec options (MAR's KL-16 format)", factory=KLCodecConfig)
    dvae: DVAECodecConfig = option(help="Dynamic VAE codec options (D2iT's two grains + entropy grain map)",
                                   factory=DVAECodecConfig)
    images: ImagesConfig = option(help="the identity codec (no options)", factory=ImagesConfig)
    posterior: Literal["mean", "moments", "moments+flip"] = option(
        "mean", help="what a codec with a posterior (kl) stores per image: its mean, or its moments (mean and "
                     "log-variance; +flip: also of the horizontally flipped image) so that training draws a fresh "
                     "latent (and flip) at every read, as MAR's cached latents")
    latent_dtype: Literal["float16", "float32"] = option(
        "float16", help="how latents are stored in the shards (float16 halves the disk and the reads)")
    batch_size: int = option(64, min=1, help="images per tokenizer call")
    workers: int | None = option(None, min=1, help="tokenizer actors; null = one per free CPU (or GPU)")
    gpus_per_worker: float = option(0.0, min=0, help="GPUs per tokenizer actor (0 = CPU)")


@dataclass
class ModelConfig:
    family: str = option("ar", help=f"model family, one of the registered plugins: {', '.join(sorted(families.FAMILIES))}")
    size: str = option("debug", help="a size of the family (debug or the paper's names, case-insensitive)")
    arch: dict[str, Any] = option(
        help="overrides of the family's architecture config, e.g. model.arch.dim=256 (vocab, grid and classes come from the data)",
        factory=dict,
    )


@dataclass
class TrainConfig:
    steps: int = option(1000, min=1, help="optimizer steps")
    global_batch: int = option(64, min=1, help="samples per optimizer step over all workers")
    micro_batch: int | None = option(None, min=1, help="samples per worker per forward; null = global_batch / workers")
    workers: int | None = option(None, min=1, help="Ray Train workers; null = every GPU, or every local CPU")
    cpus_per_worker: float | None = option(None, min=0.01, help="CPUs per worker; null = share the CPUs, keeping one for data")
    use_gpu: bool | None = option(None, help="train on GPUs; null = when the cluster has them")
    zero_stage: Literal["auto", 0, 1, 2, 3] = option("auto", help="DeepSpeed ZeRO stage; auto: the cheapest that fits a worker's memory (0, else 2, else 3)")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", help="auto: bf16 on GPU, fp32 on CPU")
    lr: float = option(4e-4, min=0, help="peak learning rate")
    min_lr: float = option(0.0, min=0, help="learning rate at the end of the cosine")
    warmup_steps: int = option(100, min=0, help="linear warmup steps")
    schedule: Literal["cosine", "constant", "linear"] = option("cosine", help="decay after warmup")
    betas: list[float] = option(help="AdamW betas", factory=lambda: [0.9, 0.95])
    weight_decay: float = option(0.05, min=0, help="AdamW weight decay (2-D+ params only)")
    grad_clip: float = option(1.0, min=0, help="gradient clipping by global norm (0 = off)")
    ema: float | None = option(None, min=0, help="EMA decay of the weights (e.g. 0.9999); null = off")
    log_every: int = option(10, min=1, help="steps between metric logs")
    checkpoint_every: int = option(200, min=1, help="steps between checkpoints (and one at the end)")
    num_to_keep: int = option(2, min=1, help="checkpoints kept")
    sample_every: int | None = option(None, min=1, help="steps between sample grids; null = only at the end")
    max_failures: int = option(1, min=0, help="worker-group restarts from the latest checkpoint")
    shuffle_buffer: int = option(1024, min=0, help="rows in each worker's local shuffle buffer (0 = off)")
    prefetch_batches: int = option(2, min=0, help="batches each worker prefetches")
    ds_config: dict[str, Any] = option(help="raw DeepSpeed config merged last (e.g. train.ds_config.zero_optimization.overlap_comm=true)", factory=dict)
    fail_at_step: int | None = option(None, min=1, help="fault injection: the last worker raises at this step on the first attempt")
    init_from: str | None = option(
        None, path=True, help="start from this model's weights (models:/NAME@ALIAS, runs:/ID or an export directory) "
                              "instead of random ones: the same family and architecture; the classes may differ "
                              "(rows matched by class name, new classes start fresh)")
    init_reset: Literal["none", "head"] = option(
        "none", help="with init_from: head = a parent with another vocabulary is accepted, and the tensors the "
                     "vocabulary shapes (token embedding, output head) start fresh")


@dataclass
class SampleConfig:
    cfg_scale: float = option(2.0, min=0, help="classifier-free guidance scale (1 = off)")
    steps: int | None = option(None, min=1, help="decoding steps for parallel decoders; null = the family's default")
    temperature: float = option(1.0, min=0, help="sampling temperature (0 = greedy)")
    top_k: int = option(0, min=0, help="keep the k most likely tokens (0 = all)")
    top_p: float = option(1.0, min=0, max=1, help="nucleus sampling mass (1 = off)")
    # YAML reads a bare on/off as true/false, so the booleans are accepted too (true = on, false = off)
    graphs: Literal["auto", "on", "off", True, False] = option(
        "auto", help="static-shape decode steps captured as CUDA graphs (ar, ctf stage 1, nar, arpg): auto = on for "
        "CUDA devices, on (on a CPU: the static path, run eagerly), off = the dynamic path; same ids either way")
    labels: str = option("all", help="classes to draw: all, or a list/range such as 0-9 or 1,3,5")
    per_label: int = option(8, min=1, help="samples per class in a grid")
    seed: int = option(0, help="sampling seed")
    batch_size: int = option(256, min=1, help="samples generated per forward batch")
    knobs: dict[str, Any] = option(
        help="the family's sampling knobs, sample.knobs.KEY=VALUE (its plugin's typed knobs: "
        + "; ".join(f"{f.name}: {', '.join(fl.name for fl in dataclasses.fields(f.knobs))}"
                    for f in families.all_families() if dataclasses.fields(f.knobs)) + ")",
        factory=dict,
    )


@dataclass
class EvalConfig:
    n: int = option(1000, min=2, help="images sampled for `raygen eval` (the papers use 50000)")
    batch_size: int = option(100, min=1, help="images per sampling task (generated, decoded and featurised in one go)")
    workers: int | None = option(None, min=1, help="sampling actors, one model copy each; null = one per GPU, or one per CPU")
    inception_weights: str | None = option(
        None, path=True, help="local path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID, IS, precision/recall); "
        "null = RAYGEN_INCEPTION_WEIGHTS, or no Inception metrics. Never downloaded"
    )
    reference: str | None = option(None, path=True, help="reference statistics file (raygen eval --make-reference); null = digits: the real digits")
    is_splits: int = option(10, min=1, help="Inception Score splits")
    pr_k: int = option(3, min=1, help="k of the k-NN manifolds for precision/recall")
    protocol: str | None = option(
        None, help="an evaluation preset from the family's paper table: 'paper' = the row of the model's size (sample "
        "count, sampling settings; needs an ADM reference batch), 'paper:KEY' = another row; null = the model's own config")


@dataclass
class TrackingConfig:
    uri: str | None = option(None, help="MLflow tracking URI; null = sqlite:///<workdir>/mlflow.db (MLFLOW_TRACKING_URI wins)")
    experiment: str = option("raygen", help="MLflow experiment")
    run_name: str | None = option(None, help="MLflow run name; null = <family>-<size>-<time>")


@dataclass
class CoreConfig:
    seed: int = option(0, help="base seed; per-rank seeds are seed + rank")
    workdir: str = option("work", help="where runs, data, the MLflow store and checkpoints go")
    ray: RayConfig = option(help="Ray cluster", factory=RayConfig)
    data: DataConfig = option(help="image source and shards", factory=DataConfig)
    tokenizer: TokenizerConfig = option(help="image tokenizer", factory=TokenizerConfig)
    model: ModelConfig = option(help="model family, size and architecture overrides", factory=ModelConfig)
    train: TrainConfig = option(help="the distributed training loop", factory=TrainConfig)
    sample: SampleConfig = option(help="sampling for grids and evaluation", factory=SampleConfig)
    eval: EvalConfig = option(help="evaluation: sample counts, Inception weights, reference statistics", factory=EvalConfig)
    tracking: TrackingConfig = option(help="MLflow tracking", factory=TrackingConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        cfg = cls()
        merge_into(cfg, data, "")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """{"data.image_size": 16, ...}: the form MLflow params take."""
        out: dict[str, Any] = {}

        def walk(d: dict, prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[f"{prefix}{k}"] = v

        walk(self.to_dict(), "")
        return out


def _with_family_sections(core: type) -> type:
    """The config tree: the core sections plus each family plugin's own (cfg.ctf, ...)."""
    sections = [(f.name, f.settings, option(help=f.settings_help, factory=f.settings))
                for f in families.all_families() if f.settings is not None]
    return dataclasses.make_dataclass("Config", sections, bases=(core,), namespace={"__module__": __name__})


Config = _with_family_sections(CoreConfig)


# --------------------------------------------------------------------------------------
# Loading, overriding, checking
# --------------------------------------------------------------------------------------


def parse_labels(spec: str, num_classes: int) -> list[int]:
    """'all' | '0-9' | '1,3,5' | '0-4,7' -> class ids, each checked against num_classes."""
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(num_classes))
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError(f"bad labels '{spec}'; allowed: all, a range such as 0-9, or a list such as 1,3,5") from None
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad or not out:
        raise ConfigError(f"bad labels '{spec}': the model has classes 0-{num_classes - 1}")
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip().lower() in ("none", "null", "~"):
        value = None
    # YAML reads '3e-4' as a string; accept scientific notation for numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_path(preset: str) -> Path:
    return find_yaml(preset, CONFIG_DIR, "preset", "available")


def find_yaml(name: str, directory: Path, what: str, listing: str) -> Path:
    """A .yaml/.yml file given by its path, or by its name in `directory`; else one line that lists
    the names there (`listing` introduces them) and the nearest one."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"{what} file '{name}' does not exist")
        return p
    named = directory / f"{name.lower()}.yaml"
    if not named.is_file():
        names = sorted(q.stem for q in directory.glob("*.yaml"))
        raise ConfigError(f"unknown {what} '{name}'; {listing}: {', '.join(names) or '(none)'}"
                          f"{suggest(name.lower(), names)}")
    return named


def yaml_problem(e: Exception) -> str:
    """A YAML error as one line: ' at line L, column C: what' (PyYAML's own message spans several)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{where}: {problem}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset '{path}' is not valid YAML{yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{path}' must be a mapping of config keys")
    return data


def load_config(
    preset: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, base: Config | None = None, **flags: Any
) -> Config:
    """Defaults (or `base`) <- preset YAML (which may name a `base:` preset) <- flags <- key=value overrides."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if preset:
        chain: list[dict[str, Any]] = []
        path: Path | None = preset_path(preset)
        while path is not None:
            data = _read_yaml(path)
            base = data.pop("base", None)
            chain.append(data)
            path = preset_path(base) if base else None
            if len(chain) > 10:
                raise ConfigError(f"preset '{preset}' has a base chain longer than 10 (a cycle?)")
        for data in reversed(chain):
            merge_into(cfg, data, "")
    for key, value in flags.items():
        if value is not None:
            merge_into(cfg, _nest(key, value), "")
    for text in overrides:
        key, value = parse_override(text)
        merge_into(cfg, _nest(key, value), "")
    return cfg


def describe_keys(obj: Any = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """[(key, type, default, help)] for every leaf key: the CLI's `raygen config keys`."""
    obj = obj if obj is not None else Config()
    hints = typing.get_type_hints(type(obj))
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_keys(value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", describe_type(hints[f.name]), value, f.metadata.get("help", "")))
    return rows

"""The tokenize job: image source -> Ray Data (decode tasks, tokenizer actor pool) -> Parquet shards.

    raygen tokenize --source digits --tokenizer palette --out DIR

Decoding and tokenization are distributed; the driver streams the tokenized batches into
fixed-size shards (so row counts, checksums and the skip list are exact) and moves the
finished data set into place atomically. Re-running with the same settings is a no-op.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raygen import console
from raygen.config import Config, TokenizerConfig
from raygen.errors import ConfigError, DataError
from raygen.models.tokenizers import Codec, from_spec
from raygen.platform.data import shards
from raygen.platform.data.sources import ImageDecoder, Source, open_source

GRID = 16  # the papers' token grid side; the default image size targets it


@dataclass
class TokenizePlan:
    source: Source
    image_size: int
    channels: int
    out: Path
    request: dict[str, Any]
    section: Any  # the codec's config section, a registry reference resolved to local weights
    registry: dict[str, Any] | None = None  # where those weights came from: reference, name, version, run


@dataclass
class TokenizeResult:
    out: Path
    manifest: dict[str, Any]
    up_to_date: bool
    seconds: float


def codec_section(cfg: TokenizerConfig) -> Any:
    """The config section of the codec `tokenizer.name` names (tokenizer.palette, .vq, ...)."""
    return getattr(cfg, cfg.name)


def resolve_weights(cfg: Config) -> tuple[Any, dict[str, Any] | None]:
    """The codec's section with a registered model as its checkpoint (models:/NAME@ALIAS,
    models:/NAME/VERSION, runs:/ID) replaced by the local export it resolves to, and a record of
    what it resolved to (for the manifest); other sections unchanged, and None."""
    import dataclasses

    section = codec_section(cfg.tokenizer)
    ref = getattr(section, "checkpoint", None)
    if not (isinstance(ref, str) and ref.startswith(("models:/", "runs:/"))):
        return section, None
    from raygen.platform import tracking

    uri = tracking.tracking_uri(cfg.workdir, cfg.tracking.uri)
    version = tracking.model_version(uri, ref)  # (name, version) for models:/ references
    cache = Path(cfg.workdir) / "cache" / "models" / (f"{version[0]}-v{version[1]}" if version else ref.split("/")[-1])
    local, run_id = tracking.resolve_model(uri, ref, dst=cache)
    registry = {"reference": ref, "run_id": run_id, **({"name": version[0], "version": version[1]} if version else {})}
    return dataclasses.replace(section, checkpoint=str(local)), registry


def data_dir_of(cfg: Config) -> str:
    """The data set a config trains on: data.shards, or where `raygen tokenize` would write it."""
    return cfg.data.shards or str(plan(cfg).out)


def plan(cfg: Config) -> TokenizePlan:
    """Resolve sizes and the output directory, and list the source (driver only, cheap)."""
    from raygen.models.tokenizers import CODECS

    source = open_source(cfg.data.source, cfg.data.path)
    channels = cfg.data.channels or source.native_channels
    section, registry = resolve_weights(cfg)
    try:
        down = CODECS[cfg.tokenizer.name].downsample_of(section)
    except ValueError as e:
        raise ConfigError(f"tokenizer.{cfg.tokenizer.name}: {str(e).splitlines()[0]}") from None
    image_size = cfg.data.image_size or CODECS[cfg.tokenizer.name].image_size_of(section) or GRID * down
    if image_size % down:
        raise ConfigError(
            f"bad value for 'data.image_size': {image_size}; the {cfg.tokenizer.name} tokenizer needs a multiple of {down}"
        )
    out = Path(cfg.data.shards or Path(cfg.workdir) / "data" / f"{source.name}-{cfg.tokenizer.name}-{image_size}")
    tok_cfg = codec_section(cfg.tokenizer)
    request = {
        "schema_version": shards.SCHEMA_VERSION,
        "source": {
            "name": source.name,
            "path": str(Path(cfg.data.path).resolve()) if cfg.data.path else None,
            "image_size": image_size,
            "channels": channels,
            "resize": cfg.data.resize,
            "on_bad_input": cfg.data.on_bad_input,
        },
        "rows_per_shard": cfg.data.rows_per_shard,
        "tokenizer": {"name": cfg.tokenizer.name, "config": _jsonable(tok_cfg),
                      **({"registry": registry} if registry else {})},
    }

    codec = CODECS[cfg.tokenizer.name]
    if codec.kind == "latents":
        request["latent_dtype"] = cfg.tokenizer.latent_dtype
    if cfg.tokenizer.posterior != "mean":
        if not getattr(codec, "has_posterior", False):
            raise ConfigError(f"tokenizer.posterior={cfg.tokenizer.posterior} needs a codec with a posterior (kl); "
                              f"the {cfg.tokenizer.name} codec has none: use tokenizer.posterior=mean")
        request["posterior"] = cfg.tokenizer.posterior
    if cfg.tokenizer.name == "palette" and tok_cfg.patch == 1:  # as before patches existed: same request
        del request["tokenizer"]["config"]["patch"]
    return TokenizePlan(source, image_size, channels, out.resolve(), request, section, registry)


def _jsonable(dc: Any) -> dict[str, Any]:
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(dc)))


def build_tokenizer(cfg: Config, p: TokenizePlan, decoder: ImageDecoder) -> Codec:
    """The configured codec for this source: built from its config section (and weights), or
    fitted on a seeded sample of the source's images (the palette)."""
    from raygen.models.tokenizers import CODECS

    def fit_images(n: int, seed: int) -> torch.Tensor:
        """n of the source's images, drawn with `seed` and decoded here on the driver (a few hundred at most)."""
        g = np.random.default_rng(seed)
        picks = sorted(g.choice(len(p.source.items), size=min(len(p.source.items), n), replace=False).tolist())
        images = []
        for i in picks:
            item = p.source.items[i]
            out = decoder({k: np.array([v], dtype=object) for k, v in item.items()})
            images.extend(img for img, err in zip(out["image"], out["error"]) if not err)
        if not images:
            raise DataError("cannot fit the codec: every sampled image was unreadable")
        return torch.from_numpy(np.stack(images[:n]))

    name = cfg.tokenizer.name
    try:
        return CODECS[name].from_config(p.section, image_size=p.image_size, channels=p.channels,
                                        fit_images=fit_images)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"tokenizer.{name}: {str(e).splitlines()[0]}") from None


def column_of(tok: Codec, latent_dtype: str, posterior: str = "mean") -> shards.Column:
    """The data column a codec's output is stored in (posterior moments: of 1 or 2 views)."""
    if tok.kind == "ids":
        return shards.Column("tokens", "ids", "int32", (int(np.prod(tok.grid)),), vocab_size=tok.vocab_size)
    if tok.kind == "images":
        return shards.Column("images", "images", "uint8", tuple(tok.image_shape))
    views = {"mean": None, "moments": 1, "moments+flip": 2}[posterior]
    return shards.Column("latents", "latents", latent_dtype, tuple(tok.latent_shape), scale=float(tok.scale),
                         moments=views)


def side_columns_of(tok: Codec, latent_dtype: str) -> list[shards.Column]:
    """The side columns a codec writes beside its data column (e.g. a second grain and a grain map)."""
    layout = tok.side_layout() if tok.kind == "latents" else {}
    return [shards.Column(name, "side", latent_dtype if d["dtype"] == "latent" else d["dtype"], tuple(d["shape"]),
                          vocab_size=d.get("vocab_size")) for name, d in layout.items()]


class TokenizeActor:
    """Ray Data actor: one codec per process, rebuilt from its spec and checked by fingerprint."""

    def __init__(self, spec: dict[str, Any], fingerprint: str, device: str, column: dict[str, Any],
                 sides: list[dict[str, Any]] | None = None):
        self.tok = from_spec(spec).to(device)
        got = self.tok.fingerprint()
        if got != fingerprint:
            raise DataError(
                f"the tokenizer rebuilt on a worker has fingerprint {got}, the driver's is {fingerprint} "
                "(is the checkpoint file the same on every node?)"
            )
        self.col = shards.Column.from_json(column["name"], column)
        self.sides = [shards.Column.from_json(c["name"], c) for c in sides or []]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        out = {c.name: np.zeros((len(ok), c.size), dtype=np.dtype(c.dtype)) for c in [self.col, *self.sides]}
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(np.stack(batch["image"])[ok]))
            sides: dict[str, torch.Tensor] = {}
            if self.col.moments:  # (B, V, 2, L, D): mean and logvar of the image (and of its mirror)
                views = [images, images.flip(2)][: self.col.moments]
                rows = torch.stack([torch.stack(self.tok.encode_moments(v), 1) for v in views], 1)
            elif self.sides:
                rows, sides = self.tok.encode_with_sides(images)
            else:
                rows = self.tok.encode(images)
            for name, values in {self.col.name: rows, **sides}.items():
                out[name][ok] = values.flatten(1).numpy().astype(out[name].dtype)
        return {**out, "label": batch["label"], "index": batch["index"], "input": batch["input"],
                "error": batch["error"]}


def tokenize(cfg: Config, *, overwrite: bool = False, progress: bool = True) -> TokenizeResult:
    import ray

    from raygen.platform.cluster.connect import cluster_cpus, cluster_gpus, init_ray

    t0 = time.time()
    p = plan(cfg)
    if shards.prepare_destination(p.out, p.request, overwrite):
        return TokenizeResult(p.out, shards.read_manifest(p.out), True, time.time() - t0)

    decoder = ImageDecoder(p.source.name, image_size=p.image_size, channels=p.channels,
                           resize=cfg.data.resize, on_bad_input=cfg.data.on_bad_input)
    tok = build_tokenizer(cfg, p, decoder)
    spec, fingerprint = tok.spec(), tok.fingerprint()
    col = column_of(tok, cfg.tokenizer.latent_dtype, cfg.tokenizer.posterior)
    sides = side_columns_of(tok, cfg.tokenizer.latent_dtype)

    init_ray(cfg.ray)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs -> byte-identical shards
    ctx.enable_progress_bars = progress
    ctx.raise_original_map_exception = True  # a DataError from a decoder reaches the CLI intact
    use_gpu = cfg.tokenizer.gpus_per_worker > 0
    if use_gpu and cluster_gpus() == 0:
        raise ConfigError("tokenizer.gpus_per_worker > 0 but the Ray cluster has no GPUs")
    workers = cfg.tokenizer.workers or (
        max(1, int(cluster_gpus() / cfg.tokenizer.gpus_per_worker)) if use_gpu else max(1, cluster_cpus() - 1)
    )
    items_per_block = max(1, min(256, len(p.source.items) // (4 * workers) or 1))
    ds = ray.data.from_items(p.source.items, override_num_blocks=max(1, len(p.source.items) // items_per_block))
    ds = ds.map_batches(decoder, batch_size=items_per_block, num_cpus=1)
    ds = ds.map_batches(
        TokenizeActor,
        fn_constructor_kwargs={"spec": spec, "fingerprint": fingerprint, "device": "cuda" if use_gpu else "cpu",
                               "column": {"name": col.name, **col.to_json()},
                               "sides": [{"name": c.name, **c.to_json()} for c in sides]},
        batch_size=cfg.tokenizer.batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=0 if use_gpu else 1,
        num_gpus=cfg.tokenizer.gpus_per_worker if use_gpu else 0,
    )

    writer = shards.ShardWriter(p.out, [col, *sides], cfg.data.rows_per_shard)
    skipped: list[dict[str, str]] = []
    last_report = time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            bad = np.array([bool(e) for e in batch["error"]], dtype=bool)
            skipped += [{"input": str(i), "error": str(e)} for i, e in zip(batch["input"][bad], batch["error"][bad])]
            writer.add({c.name: batch[c.name][~bad] for c in [col, *sides]}, batch["label"][~bad], batch["index"][~bad])
            if progress and time.time() - last_report > 10:
                last_report = time.time()
                print(f"tokenize: {writer.rows} of {p.source.rows} rows in shards", file=console.err())
        manifest = writer.finish({
            "schema_version": shards.SCHEMA_VERSION,
            "created": shards.now_iso(),
            "request": p.request,
            "source": {**p.request["source"], "rows": p.source.rows},
            "tokenizer": {**spec, "fingerprint": fingerprint, **({"registry": p.registry} if p.registry else {})},
            "grid": list(tok.grid),
            **({"vocab_size": tok.vocab_size} if tok.kind == "ids" else {}),
            "num_classes": p.source.num_classes,
            "class_names": p.source.class_names,
            "skipped": skipped,
        })
    except BaseException:
        writer.abort()
        raise
    return TokenizeResult(p.out, manifest, False, time.time() - t0)


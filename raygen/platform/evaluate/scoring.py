"""Evaluation and the run report: sample across Ray workers, score, log `eval/...` to the model's run.

    raygen eval MODEL [--n N] [--reference REF] [sample.cfg_scale=3 ...]
    raygen eval --make-reference DATA_DIR --out REF
    raygen report RUN

`evaluate` resolves the model (models:/, runs:/ or a directory), then streams N samples through
an actor pool: each actor holds one copy of the model and of the feature extractors (from the
object store), turns a batch of labels into images with the model's tokenizer and returns
their features, never the images. Labels cycle over the classes (balanced) and each batch has
its own seed, derived from sample.seed and the batch index, so the result does not depend on
the number of workers. The driver computes the metrics:

- digits models: `eval/class_acc` (held-out classifier) and `eval/fd_digits` (Fréchet distance
  in its feature space) against the reference, or the real digits at the model's resolution;
- with Inception weights (`eval.inception_weights` / RAYGEN_INCEPTION_WEIGHTS): `eval/is`,
  `eval/is_std`, and against a reference with Inception statistics `eval/fid`,
  `eval/precision`, `eval/recall`.

Metrics go to the model's MLflow run at its final training step, the sampling config as
`eval.*` params (MLflow params never change: a key already logged with another value is kept,
and every evaluation's full config and results are also its own JSON artifact under `eval/`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raygen import console
from raygen.config import Config, SampleConfig, load_config, parse_labels
from raygen.errors import ConfigError, UserError
from raygen.platform.evaluate import metrics as M

# --------------------------------------------------------------------------------------
# What is evaluated
# --------------------------------------------------------------------------------------


@dataclass
class EvalTarget:
    """A model reference resolved: its export, run and the sampling config to evaluate it at."""

    cfg: Config
    uri: str
    export_dir: Path
    run_id: str | None
    meta: dict[str, Any]
    knobs: dict[str, Any] = field(default_factory=dict)  # from the alias's sweep (tracking.alias_knobs)
    row: Any = None  # the paper row eval.protocol names (raygen.families.base.PaperRow), or None
    changed: list[str] = field(default_factory=list)  # settings that differ from the row's (flags, overrides)

    @property
    def image_size(self) -> int:
        return int(self.meta["tokenizer"]["image_size"])

    @property
    def channels(self) -> int:
        return int(self.meta["tokenizer"]["channels"])


def resolve_target(model: str, overrides: list[str], flags: dict[str, Any]) -> EvalTarget:
    """The model's own sampling defaults, then the knobs a sweep tagged on its alias (or, with
    eval.protocol, the paper row's settings instead), then the flags, then key=value overrides."""
    from raygen.platform import tracking
    from raygen.platform.evaluate import protocol
    from raygen.platform.evaluate.sampling import family_of, read_export_meta

    base = load_config(None, overrides, **flags)
    uri = tracking.tracking_uri(base.workdir, base.tracking.uri)
    export_dir, run_id = tracking.resolve_model(uri, model)
    meta = read_export_meta(export_dir)
    family_of(meta)  # an imported codec's weights: say what they are for
    knobs, row = tracking.alias_knobs(uri, model), None
    if base.eval.protocol:
        row = protocol.protocol_row(meta, base.eval.protocol)
        knobs = protocol.settings(row)  # the paper's settings, not a sweep's
    cfg = load_config(None, overrides, **{**{f"sample.{k}": v for k, v in meta["sample"].items()}, **knobs,
                                          **{k: v for k, v in flags.items() if v is not None}})
    changed = protocol.departures(cfg, row) if row is not None else []
    return EvalTarget(cfg, uri, Path(export_dir), run_id, meta, {} if row is not None else knobs, row, changed)


def balanced_labels(classes: list[int], n: int) -> list[int]:
    """n labels cycling over `classes`: every class gets n // len(classes) or one more."""
    return [classes[i % len(classes)] for i in range(n)]


def batch_seed(seed: int, index: int) -> int:
    """An independent seed per batch, whatever the number of workers."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# --------------------------------------------------------------------------------------
# The sampling actor (one model copy per worker)
# --------------------------------------------------------------------------------------


class SamplerWorker:
    """One model, its tokenizer and the feature extractors; labels in, features out."""

    def __init__(self, payload: dict[str, Any], threads: int = 1, use_gpu: bool = False):
        import shutil
        import tempfile

        from raygen.models.tokenizers import from_spec
        from raygen.platform.evaluate.sampling import load_export

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # The export travels as bytes (any node can load it), then loads the way `raygen sample` does.
        tmp = Path(tempfile.mkdtemp(prefix="raygen-eval-"))
        try:
            for rel, data in payload["export"].items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            self.model, self.meta = load_export(tmp, self.device)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.tok = from_spec(self.meta["tokenizer"])
        self.sample = SampleConfig(**payload["sample"])
        self.extract = M.Extractors(payload.get("digits"), payload.get("inception"), self.device)

    def images(self, labels: list[int], seed: int) -> torch.Tensor:
        """labels (B,) -> uint8 images (B, H, W, C) at the model's sampling config."""
        from raygen.platform.evaluate.sampling import decode_with, generate

        sample = dataclasses.replace(self.sample, seed=seed, batch_size=max(1, len(labels)))
        return decode_with(self.tok, self.meta, generate(self.model, self.meta, labels, sample, self.device))

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        images = self.images(task["labels"], task["seed"])
        t1 = time.perf_counter()
        out = self.extract(images)
        out.update(index=task["index"], labels=np.asarray(task["labels"]), sample_s=t1 - t0,
                   feature_s=time.perf_counter() - t1)
        if task.get("keep_images"):
            out["images"] = images[: task["keep_images"]].numpy()
        return out

    def measure(self, labels: list[int], seed: int) -> dict[str, Any]:
        """Images/s and peak memory for one batch of `labels` (after a one-image warm-up)."""
        self.images(labels[:1], seed)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        self.images(labels, seed)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        from raygen.platform.devices import peak_memory_gb

        peak, what = peak_memory_gb(self.device)
        return {"images_per_s": len(labels) / seconds, "seconds": seconds, "batch": len(labels), "peak_gb": peak,
                "peak_what": what, "device": str(self.device)}


def _payload(target: EvalTarget, digits_state=None, inception_state=None) -> dict[str, Any]:
    files = {str(f.relative_to(target.export_dir)): f.read_bytes()
             for f in sorted(target.export_dir.rglob("*")) if f.is_file()}
    return {"export": files, "sample": dataclasses.asdict(target.cfg.sample),
            "digits": digits_state, "inception": inception_state}


def _check_sampling(target: EvalTarget) -> list[int]:
    """Fail before any worker starts: labels, the family's knobs, and whether the model samples alone."""
    from raygen.platform.evaluate.sampling import check_knobs, check_samples_alone

    check_samples_alone(target.meta)
    classes = parse_labels(target.cfg.sample.labels, target.meta["data"]["num_classes"])
    check_knobs(target.meta, target.cfg.sample.knobs)
    return classes


def _pool_shape(cfg: Config) -> tuple[int, int, bool]:
    """(workers, threads per worker, use_gpu) for the cluster at hand."""
    from raygen.platform.cluster.connect import cluster_cpus, cluster_gpus

    cpus, gpus = cluster_cpus(), cluster_gpus()
    use_gpu = gpus > 0
    workers = cfg.eval.workers or (gpus if use_gpu else max(1, cpus))
    if use_gpu and workers > gpus:
        raise ConfigError(f"eval.workers={workers} but the Ray cluster has {gpus} GPUs")
    if not use_gpu and workers > cpus:
        raise ConfigError(f"eval.workers={workers} but the Ray cluster has {cpus} CPUs (one per sampling worker)")
    return workers, max(1, cpus // workers), use_gpu


def sample_features(cfg: Config, payload: dict[str, Any], labels: list[int], *, keep_images: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Stream `labels` through an actor pool in batches of eval.batch_size; gather features in order."""
    import ray
    from ray.util import ActorPool

    from raygen.platform.cluster.connect import init_ray

    init_ray(cfg.ray)
    workers, threads, use_gpu = _pool_shape(cfg)
    bs = cfg.eval.batch_size
    tasks = [{"index": i, "labels": labels[s : s + bs], "seed": batch_seed(cfg.sample.seed, i),
              "keep_images": keep_images if i == 0 else 0} for i, s in enumerate(range(0, len(labels), bs))]
    ref = ray.put(payload)
    actor_cls = ray.remote(num_cpus=1 if use_gpu else threads, num_gpus=1 if use_gpu else 0)(SamplerWorker)
    actors = [actor_cls.remote(ref, threads, use_gpu) for _ in range(min(workers, len(tasks)))]
    t0, last = time.perf_counter(), time.perf_counter()
    results = []
    try:
        for r in ActorPool(actors).map(lambda a, t: a.run.remote(t), tasks):
            results.append(r)
            if progress and time.perf_counter() - last > 10:
                last = time.perf_counter()
                done = sum(len(x["labels"]) for x in results)
                print(f"eval: {done} of {len(labels)} images", file=console.err())
    finally:
        for a in actors:
            ray.kill(a)
    wall = time.perf_counter() - t0
    keys = [k for k in results[0] if isinstance(results[0][k], np.ndarray) and k != "images"]
    out: dict[str, Any] = {k: np.concatenate([r[k] for r in results]) for k in keys}
    out["images"] = results[0].get("images")
    out["seconds"] = wall
    out["sample_seconds"] = sum(r["sample_s"] for r in results)
    out["workers"] = len(actors)
    return out


# --------------------------------------------------------------------------------------
# Real-image statistics
# --------------------------------------------------------------------------------------


def _digits_extractor(cfg: Config) -> tuple[dict[str, torch.Tensor], str]:
    from raygen.platform.evaluate.digits import classifier_fingerprint, load_classifier

    clf, _ = load_classifier(Path(cfg.workdir) / "cache")
    return clf.state_dict(), classifier_fingerprint(clf)


def _source_items(src: dict[str, Any]):
    from raygen.platform.data.sources import ImageDecoder, open_source

    source = open_source(src["name"], src.get("path"))
    decoder = ImageDecoder(src["name"], image_size=src["image_size"], channels=src["channels"],
                           resize=src.get("resize", True), on_bad_input=src.get("on_bad_input", "fail"))
    return source, decoder


def real_features_local(src: dict[str, Any], extract: M.Extractors) -> dict[str, np.ndarray]:
    """Decode and featurise a (small) source in this process: the digits' 1,797 images take a second."""
    source, decoder = _source_items(src)
    batch = {}
    for k in source.items[0]:
        col = np.empty(len(source.items), dtype=object)  # 1-D even when the values are arrays
        for i, it in enumerate(source.items):
            col[i] = it[k]
        batch[k] = col
    rows = decoder(batch)
    ok = np.array([not e for e in rows["error"]], dtype=bool)
    return extract(torch.from_numpy(np.ascontiguousarray(rows["image"][ok])))


class _FeatureActor:
    """Ray Data actor for references: decoded real images in, features out."""

    def __init__(self, payload_ref: list):
        import ray

        payload = ray.get(payload_ref[0])
        self.extract = M.Extractors(payload.get("digits"), payload.get("inception"),
                                    "cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        images = np.asarray(batch["image"])[ok]  # (b, H, W, C) uint8; b may be 0
        return self.extract(torch.from_numpy(np.ascontiguousarray(images)))


def real_features_ray(cfg: Config, src: dict[str, Any], payload: dict[str, Any]) -> dict[str, np.ndarray]:
    """Decode the source with Ray Data tasks and featurise with an actor pool (any data set size)."""
    import ray

    from raygen.platform.cluster.connect import init_ray

    init_ray(cfg.ray)
    workers, _, _ = _pool_shape(cfg)
    source, decoder = _source_items(src)
    per_block = max(1, min(256, len(source.items) // (4 * workers) or 1))
    ds = ray.data.from_items(source.items, override_num_blocks=max(1, len(source.items) // per_block))
    return _featurise(cfg, ds.map_batches(decoder, batch_size=per_block, num_cpus=1), payload)


def _featurise(cfg: Config, ds, payload: dict[str, Any]) -> dict[str, np.ndarray]:
    """A Ray dataset of decoded rows (image, error) -> the extractors' arrays, in order, from an actor pool."""
    import ray

    workers, _, use_gpu = _pool_shape(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True
    ds = ds.map_batches(_FeatureActor, fn_constructor_kwargs={"payload_ref": [ray.put(payload)]},
                        batch_size=cfg.eval.batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(np.stack(v) if v.dtype == object else v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def make_reference(cfg: Config, data_dir: str | Path, out: str | Path) -> M.Reference:
    """Statistics of the real images behind a tokenized data set (its manifest names the source)."""
    from raygen.platform.data import shards

    manifest = shards.read_manifest(data_dir)
    src = dict(manifest["source"])
    weights = M.load_inception_weights(cfg.eval.inception_weights)
    digits = _digits_extractor(cfg) if src["name"] == "digits" else None
    if digits is None and weights is None:
        raise M.weights_missing_error(f"a reference for {src['name']} data holds Inception statistics only")
    payload = {"digits": digits[0] if digits else None, "inception": weights.state if weights else None}
    feats = real_features_ray(cfg, src, payload)
    ref = M.Reference(int(src["image_size"]), int(src["channels"]), {**src, "data_dir": str(Path(data_dir).resolve())})
    if digits:
        ref.add(M.DIGITS, digits[1], feats["digits_features"])
    if weights:
        ref.add(M.INCEPTION, weights.fingerprint, feats["inception_pool"], spatial=feats["inception_spatial"])
    ref.save(out)
    return ref


def implicit_digits_reference(cfg: Config, target: EvalTarget, digits: tuple[dict, str]) -> M.Reference:
    """The real digits as the model's data set saw them (its manifest's decoding, else the model's size)."""
    from raygen.platform.data import shards

    src = {"name": "digits", "path": None, "image_size": target.image_size, "channels": target.channels,
           "resize": True, "on_bad_input": "fail"}
    data_dir = target.meta["data"].get("dir")
    if data_dir and (Path(data_dir) / shards.MANIFEST).is_file():
        src = dict(shards.read_manifest(data_dir)["source"])
    ref = M.Reference(int(src["image_size"]), int(src["channels"]), src)
    feats = real_features_local(src, M.Extractors(digits[0]))
    ref.add(M.DIGITS, digits[1], feats["digits_features"])
    return ref


# --------------------------------------------------------------------------------------
# Evaluate
# --------------------------------------------------------------------------------------


EVALUATOR = "raygen-adm/1"  # raygen's implementation of the ADM evaluator's metrics (see metrics.py)
EVALUATOR_DIGITS = "raygen-digits/1"  # class accuracy and FD-digits with the held-out digits classifier


def _check_reference(target: EvalTarget, reference: M.Reference, notes: list[str]) -> None:
    """Refuse a reference made at another resolution; grey samples against an ADM batch are compared as RGB."""
    if reference.kind == "adm":
        if not reference.has_images:
            notes.append(f"reference '{reference.name}' holds statistics only (no arr_0 images): its resolution is "
                         "not checked and there is no precision/recall")
            return
        if reference.image_size != target.image_size:
            raise UserError(f"reference '{reference.name}' holds {reference.resolution} images but the model makes "
                            f"{target.image_size}x{target.image_size}x{target.channels}; statistics at another "
                            "resolution are not comparable: use the ADM reference batch of the model's resolution")
        if target.channels == 1:
            notes.append("the model makes grey images; they are scored as RGB (the channel repeated), as the ADM "
                         "evaluator would see them converted")
        return
    reference.check_resolution(target.image_size, target.channels)


def reference_features(cfg: Config, reference: M.Reference, weights: M.InceptionWeights) -> np.ndarray:
    """Inception pool features of an ADM reference batch's images (arr_0), for precision/recall.

    The ADM evaluator computes them from the same images; they are cached under
    <workdir>/cache/references by the reference's sha256 and the weights' fingerprint.
    """
    cache = Path(cfg.workdir) / "cache" / "references" / f"{reference.sha256[:16]}-{weights.fingerprint}.npy"
    if cache.is_file():
        return np.load(cache)
    images = reference.real_images()  # (N, H, W, 3) uint8
    print(f"eval: Inception features of the reference's {len(images)} images (cached for later evaluations)",
          file=console.err())
    if len(images) <= 4 * cfg.eval.batch_size:  # a few batches: this process
        feats = M.Extractors(inception_state=weights.state)(torch.from_numpy(images))["inception_pool"]
    else:
        import ray

        from raygen.platform.cluster.connect import init_ray

        init_ray(cfg.ray)
        ds = ray.data.from_numpy(images).map_batches(_as_decoded, batch_size=cfg.eval.batch_size)
        feats = _featurise(cfg, ds, {"inception": weights.state})["inception_pool"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npy")
    np.save(tmp, feats.astype(np.float32))
    tmp.replace(cache)
    return feats


def _as_decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ray.data.from_numpy's `data` column as the decoder's (image, error) rows."""
    return {"image": batch["data"], "error": np.zeros(len(batch["data"]), dtype=bool)}


def paper_scores(row) -> dict[str, float | None]:
    """A paper row's scores under raygen's metric names ({} without a row)."""
    if row is None:
        return {}
    return {"eval/fid": row.fid, "eval/is": row.inception_score, "eval/precision": row.precision,
            "eval/recall": row.recall}


def identity(target: EvalTarget, reference: M.Reference | None, digits: tuple | None,
             weights: M.InceptionWeights | None) -> dict[str, Any]:
    """Which evaluator, feature extractors and reference produced an evaluation (eval JSON, tags, report)."""
    from raygen.platform.evaluate import protocol

    extractors = {}
    if digits:
        extractors[M.DIGITS] = {"fingerprint": digits[1]}
    if weights:
        extractors[M.INCEPTION] = {"fingerprint": weights.fingerprint, "sha256": weights.sha256,
                                   "path": weights.path, "standard": weights.standard}
    evaluators = ([EVALUATOR] if weights else []) + ([EVALUATOR_DIGITS] if digits else [])
    ref = reference.identity() if reference is not None else (
        {"name": "the real digits", "kind": "implicit"} if digits else None)
    out = {"evaluator": ",".join(evaluators), "extractors": extractors, "reference": ref}
    if target.row is not None:
        out["protocol"] = protocol.record(target.row, target.changed)
    return out


def identity_tags(ident: dict[str, Any]) -> dict[str, str]:
    """The identity as run tags (tags, unlike params, follow the latest evaluation)."""
    ref = ident.get("reference") or {}
    tags = {"raygen.eval.evaluator": ident["evaluator"],
            "raygen.eval.extractors": ",".join(f"{k}:{v['fingerprint']}" for k, v in ident["extractors"].items()),
            "raygen.eval.reference": ref.get("name", "none"),
            "raygen.eval.reference_sha256": ref.get("sha256", "-"),
            "raygen.eval.protocol": "-"}
    if "protocol" in ident:
        p = ident["protocol"]
        tags["raygen.eval.protocol"] = p["name"] + (" (with changes)" if p["changed"] else "")
    return tags


def evaluate(target: EvalTarget, *, progress: bool = True) -> dict[str, Any]:
    """Sample cfg.eval.n images, score them, log them to the model's run; returns what was measured."""
    from raygen.platform.evaluate import protocol
    from raygen.platform.evaluate.sampling import is_digits

    cfg, meta, e = target.cfg, target.meta, target.cfg.eval
    t0 = time.time()
    # Everything that can refuse does so before a sample is drawn.
    classes = _check_sampling(target)
    notes: list[str] = []
    if target.row is not None:
        if not e.reference:
            raise UserError(f"--protocol {e.protocol} compares with {protocol.describe(target.row)}: give --reference "
                            "REF, the ADM evaluator's reference batch of the paper's data set as a local file (for "
                            "ImageNet 256x256: VIRTUAL_imagenet256_labeled.npz)")
        if target.changed:
            notes.append(f"not the paper's protocol: {'; '.join(target.changed)}")
    reference = M.Reference.load(e.reference) if e.reference else None
    if reference is not None:
        _check_reference(target, reference, notes)
        if target.row is not None and reference.kind != "adm":
            notes.append(f"reference '{reference.name}' is raygen's own, not the ADM reference batch the paper used")
    fid_ref = reference is not None and M.INCEPTION in reference.stats
    needed_by = f"reference '{e.reference}' (it holds Inception statistics)" if fid_ref else None
    weights = M.load_inception_weights(e.inception_weights, needed_by=needed_by or (
        f"--protocol {e.protocol}" if target.row is not None else None))
    digits = _digits_extractor(cfg) if is_digits(meta) else None
    if digits is None and weights is None:
        raise M.weights_missing_error(
            f"the model's data ({meta['data'].get('source')}) is not digits, so only Inception metrics apply")
    digits_ref = None
    if digits is not None:
        has_digits = reference is not None and M.DIGITS in reference.stats
        digits_ref = reference if has_digits else implicit_digits_reference(cfg, target, digits)
        digits_ref.check_resolution(target.image_size, target.channels)
        digits_ref.get(M.DIGITS, digits[1])
    inception_ref = None
    if weights is not None:
        if e.n < e.is_splits:
            raise ConfigError(f"eval.n={e.n} is below eval.is_splits={e.is_splits}")
        if fid_ref:
            inception_ref = dict(reference.get(M.INCEPTION, weights.fingerprint))
            if reference.kind == "adm" and reference.has_images:
                inception_ref["features"] = reference_features(cfg, reference, weights)
            real = inception_ref.get("features")
            if real is not None and min(e.n, len(real)) <= e.pr_k:
                raise ConfigError(f"precision/recall with eval.pr_k={e.pr_k} need more than {e.pr_k} images on each "
                                  f"side; eval.n={e.n}, the reference keeps {len(real)}")
            if "mu_s" not in inception_ref:
                notes.append(f"reference '{reference.name}' has no spatial statistics: no sFID (remake it with "
                             "`raygen eval --make-reference`)")
        elif reference is not None:
            notes.append(f"reference '{reference.name}' has no Inception statistics: no FID or precision/recall")
        else:
            notes.append("FID and precision/recall need --reference REF (`raygen eval --make-reference DATA_DIR --out REF`"
                         ", or the ADM evaluator's reference batch)")
        if not weights.standard:
            notes.append(f"the Inception weights {weights.path} are not pytorch-fid's release file: "
                         "FID is not comparable with papers")
        elif reference is not None and reference.kind == "adm":
            notes.append("the reference's statistics come from the ADM evaluator's TensorFlow Inception; raygen's "
                         "features come from pytorch-fid's port of it (README, Evaluate: how far they can differ)")

    labels = balanced_labels(classes, e.n)
    payload = _payload(target, digits[0] if digits else None, weights.state if weights else None)
    keep = min(e.n, e.batch_size, 8 * len(classes)) // len(classes) * len(classes)  # whole rows for the grid
    got = sample_features(cfg, payload, labels, keep_images=keep, progress=progress)

    out = score_features(got, digits_ref.get(M.DIGITS, digits[1]) if digits is not None else None,
                         inception_ref, e.is_splits, e.pr_k, class_names=target.meta["data"].get("class_names"))
    out["perf/eval_images_per_s"] = e.n / got["seconds"]

    ident = identity(target, reference, digits, weights)
    extractors = ([f"{M.DIGITS}:{digits[1]}"] if digits else []) + ([f"{M.INCEPTION}:{weights.fingerprint}"] if weights else [])
    params = {f"eval.sample.{k}": v for k, v in dataclasses.asdict(cfg.sample).items() if k != "per_label"}
    params.update({"eval.n": e.n, "eval.reference": (reference or digits_ref).name if (reference or digits_ref) else "none",
                   "eval.extractors": ",".join(extractors)})
    result = {"metrics": out, "run_id": target.run_id, "n": e.n, "workers": got["workers"],
              "seconds": time.time() - t0, "params": params, "notes": notes, "kept_params": {}, "identity": ident}
    if target.run_id:
        _log(target, result, got.get("images"), got["labels"], classes)
    return result


def score_features(feats: dict[str, np.ndarray], digits_ref: dict[str, Any] | None,
                   inception_ref: dict[str, Any] | None, is_splits: int, pr_k: int,
                   class_names: list[str] | None = None) -> dict[str, float]:
    """The metrics of sampled features (`raygen eval`'s, and a sample sweep trial's): class accuracy
    and FD-digits when the digits classifier ran, IS when Inception ran, FID against
    `inception_ref` ({mu, sigma}), sFID when it holds spatial statistics ({mu_s, sigma_s}) and
    precision/recall when it also holds the real `features`."""
    out: dict[str, float] = {}
    if "digits_pred" in feats:
        from raygen.platform.evaluate.digits import digit_labels

        shown = digit_labels(feats["labels"], class_names)  # the digit each class id stands for
        out["eval/class_acc"] = float((feats["digits_pred"] == shown).mean())
        if digits_ref is not None:
            out["eval/fd_digits"] = M.frechet_distance(*M.feature_stats(feats["digits_features"]),
                                                       digits_ref["mu"], digits_ref["sigma"])
    if "inception_logits" in feats:
        out["eval/is"], out["eval/is_std"] = M.inception_score(feats["inception_logits"], is_splits)
        if inception_ref is not None:
            out["eval/fid"] = M.frechet_distance(*M.feature_stats(feats["inception_pool"]),
                                                 inception_ref["mu"], inception_ref["sigma"])
            if "mu_s" in inception_ref and "inception_spatial" in feats:
                out["eval/sfid"] = M.frechet_distance(*M.feature_stats(feats["inception_spatial"]),
                                                      inception_ref["mu_s"], inception_ref["sigma_s"])
            if inception_ref.get("features") is not None:
                out["eval/precision"], out["eval/recall"] = M.precision_recall(inception_ref["features"],
                                                                               feats["inception_pool"], pr_k)
    return out


def _log(target: EvalTarget, result: dict[str, Any], images: np.ndarray | None, labels: np.ndarray,
         classes: list[int]) -> None:
    from raygen.platform import tracking
    from raygen.platform.evaluate.sampling import grid_image

    uri, run_id = target.uri, target.run_id
    tracking.log_metrics(uri, run_id, result["metrics"], int(target.meta.get("steps") or 0))
    result["kept_params"] = tracking.log_new_params(uri, run_id, result["params"])
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"{time.time() % 1:.3f}"[1:]  # sorts in time order
    tracking.set_tags(uri, run_id, identity_tags(result["identity"]))
    record = {k: result[k] for k in ("metrics", "params", "n", "notes", "identity")}
    tracking.log_text(uri, run_id, json.dumps(record, indent=1, default=str), f"eval/eval-{stamp}.json")
    if images is not None and len(images):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"eval-{stamp}.png"
            order = np.argsort(labels[: len(images)], kind="stable")  # one row per class
            grid_image(torch.from_numpy(images[order]), rows=min(len(classes), len(images))).save(png)
            tracking.log_artifact(uri, run_id, png, "eval")


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _median_after_first(history: list[tuple[int, float]]) -> float | None:
    """The median over log windows, leaving out the first (start-up) when there are others."""
    values = [v for _, v in sorted(history)]
    if len(values) > 1:
        values = values[1:]
    return float(np.median(values)) if values else None


def measure_sampling(target: EvalTarget) -> dict[str, Any]:
    """Images/s and peak memory of one batch at the run's sampling config, in one Ray worker."""
    import ray

    from raygen.platform.cluster.connect import cluster_gpus, init_ray

    classes = _check_sampling(target)
    init_ray(target.cfg.ray)
    use_gpu = cluster_gpus() > 0
    labels = balanced_labels(classes, target.cfg.sample.batch_size)
    actor = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(SamplerWorker).remote(
        ray.put(_payload(target)), 1, use_gpu)
    try:
        return ray.get(actor.measure.remote(labels, target.cfg.sample.seed))
    finally:
        ray.kill(actor)


def latest_eval(uri: str, run_id: str) -> dict[str, Any] | None:
    """The newest evaluation record (eval/eval-<time>.json) of a run, or None."""
    from raygen.platform import tracking

    names = sorted(a for a in tracking.list_artifacts(uri, run_id, "eval") if a.endswith(".json"))
    return json.loads(tracking.read_artifact_text(uri, run_id, names[-1])) if names else None


def _fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def identity_rows(ident: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """The report's lines on which evaluator, extractors, reference and protocol made the numbers."""
    if not ident:
        return [("eval", "evaluator", "not recorded (an evaluation by an earlier raygen)")]
    rows = [("eval", "evaluator", ident["evaluator"])]
    for name, x in ident["extractors"].items():
        what = "" if "standard" not in x else (" (pytorch-fid's release file)" if x["standard"] else " (other weights)")
        rows.append(("eval", "extractor", f"{name} {x['fingerprint']}{what}"))
    ref = ident.get("reference")
    if ref:
        where = f"{ref.get('kind', '?')}" + (f", {ref['resolution']}" if ref.get("resolution") else "") + \
            (f", sha256 {ref['sha256'][:16]}" if ref.get("sha256") else "")
        rows.append(("eval", "reference", f"{ref.get('name')} ({where})"))
    proto = ident.get("protocol")
    if proto:
        changed = f"; with changes: {'; '.join(proto['changed'])}" if proto["changed"] else ""
        rows.append(("eval", "protocol", f"{proto['name']}: {proto['model']}, {proto['paper']}{changed}"))
    return rows


def report(run: str, *, workdir: str = "work", tracking_uri: str | None = None, measure: bool = True) -> dict[str, Any]:
    """One table for a run: model, training throughput, sampling throughput and memory, eval metrics."""
    from raygen.platform import tracking

    uri = tracking.tracking_uri(workdir, tracking_uri)
    ref = run if ":/" in run or Path(run).is_dir() else f"runs:/{run}"
    target = resolve_target(ref, [f"workdir={workdir}"] + ([f"tracking.uri={tracking_uri}"] if tracking_uri else []), {})
    run_id = target.run_id or target.meta.get("run_id")
    if not run_id:
        raise UserError(f"'{run}' is not tied to an MLflow run; give a run id, runs:/RUN_ID or models:/NAME@ALIAS")
    r = tracking.get_run(uri, run_id)
    p, m, meta = r.data.params, r.data.metrics, target.meta
    hist = {k: tracking.metric_history(uri, run_id, k)
            for k in ("perf/samples_per_s", "perf/data_wait_frac", "mem/peak_gb", "perf/mfu")}
    sampled = measure_sampling(target) if measure else None
    s = target.cfg.sample
    n_params = p.get("derived.n_params")
    rows: list[tuple[str, str, str]] = [
        ("run", "id", f"{run_id} ({r.info.run_name}, {r.info.status})"),
        ("model", "family / size", f"{meta['family']} / {meta['size']}"),
        ("model", "parameters", f"{int(n_params):,}" if n_params else "-"),
        ("model", "data", f"{meta['data'].get('source')}, grid {meta['data']['grid'][0]}x{meta['data']['grid'][1]}, "
                          f"vocab {meta['data']['vocab_size']}, {meta['data']['num_classes']} classes, "
                          f"{target.image_size}x{target.image_size}x{target.channels} images"),
        ("training", "steps x batch", f"{p.get('train.steps', '-')} x {p.get('train.global_batch', '-')} on "
                                      f"{p.get('derived.workers', '-')} workers, ZeRO-{p.get('derived.zero_stage', '-')}, "
                                      f"{p.get('derived.precision', '-')}"),
        ("training", "samples/s", _fmt(_median_after_first(hist["perf/samples_per_s"]), ".1f")
         + " (median over log windows after the first)"),
        ("training", "data wait", _fmt(_median_after_first(hist["perf/data_wait_frac"]), ".1%")),
        ("training", "peak memory", _fmt(max((v for _, v in hist["mem/peak_gb"]), default=None), ".2f") + " GB (rank 0)"),
        ("training", "final loss", _fmt(m.get("train/loss"), ".4f")),
    ]
    if hist["perf/mfu"]:
        rows.append(("training", "MFU", _fmt(_median_after_first(hist["perf/mfu"]), ".1%")))
    config = f"cfg {s.cfg_scale:g}, temperature {s.temperature:g}, steps {s.steps or 'default'}, top-k {s.top_k}, " \
             f"top-p {s.top_p:g}" + (f", knobs {s.knobs}" if s.knobs else "")
    rows.append(("sampling", "config", config))
    if sampled:
        rows += [("sampling", "images/s", f"{sampled['images_per_s']:.1f} (one batch of {sampled['batch']}, "
                                          f"{sampled['device']}, 1 worker)"),
                 ("sampling", "peak memory", f"{sampled['peak_gb']:.2f} GB ({sampled['peak_what']})")]
    last = latest_eval(uri, run_id)
    if last is None:
        rows.append(("eval", "-", f"no evaluation yet (`raygen eval runs:/{run_id}`)"))
    else:
        ep = last["params"]
        rows.append(("eval", "config", f"n {last['n']}, cfg {ep.get('eval.sample.cfg_scale')}, temperature "
                                       f"{ep.get('eval.sample.temperature')}, steps {ep.get('eval.sample.steps') or 'default'}, "
                                       f"seed {ep.get('eval.sample.seed')}, reference {ep.get('eval.reference')}"))
        rows += identity_rows(last.get("identity"))
        paper = (last.get("identity") or {}).get("protocol", {}).get("scores", {})
        for k, v in sorted(last["metrics"].items()):
            if k.startswith("eval/"):
                name = k[len("eval/"):]
                theirs = paper.get(name)
                rows.append(("eval", name, _fmt(v, ".4g") + (f"  (paper {theirs:g})" if theirs is not None else "")))
    w1, w2 = max(len(a) for a, _, _ in rows), max(len(b) for _, b, _ in rows)
    lines = [f"{'section'.ljust(w1)}  {'metric'.ljust(w2)}  value", f"{'-' * w1}  {'-' * w2}  -----"]
    prev = None
    for a, b, c in rows:
        lines.append(f"{(a if a != prev else '').ljust(w1)}  {b.ljust(w2)}  {c}")
        prev = a
    text = "\n".join(lines) + "\n"
    tracking.log_text(uri, run_id, text, "report.txt")
    if sampled:
        tracking.log_metrics(uri, run_id, {"perf/sample_images_per_s": sampled["images_per_s"],
                                           "mem/sample_peak_gb": sampled["peak_gb"]}, int(meta.get("steps") or 0))
    return {"text": text, "run_id": run_id, "sampling": sampled, "rows": rows}


def paper_table(runs: list[str], *, workdir: str = "work", tracking_uri: str | None = None,
                measure: bool = True) -> dict[str, Any]:
    """Several evaluated models in the papers' layout, each followed by the row its protocol reproduces.

    Columns: model, params, steps, FID, sFID, IS, precision, recall, img/s. raygen's numbers come from
    each model's latest evaluation; img/s is measured here (one batch, one worker) unless measure=False,
    then the last logged measurement.
    """
    from raygen.platform import tracking

    uri = tracking.tracking_uri(workdir, tracking_uri)
    entries = []
    for run in runs:
        ref = run if ":/" in run or Path(run).is_dir() else f"runs:/{run}"
        target = resolve_target(ref, [f"workdir={workdir}"] + ([f"tracking.uri={tracking_uri}"] if tracking_uri else []),
                                {})
        run_id = target.run_id or target.meta.get("run_id")
        if not run_id:
            raise UserError(f"'{run}' is not tied to an MLflow run; give a run id, runs:/RUN_ID or models:/NAME@ALIAS")
        r = tracking.get_run(uri, run_id)
        last = latest_eval(uri, run_id)
        if last is None:
            raise UserError(f"'{run}' has no evaluation yet: `raygen eval {ref}` first")
        if measure:
            speed = measure_sampling(target)["images_per_s"]
        else:
            hist = tracking.metric_history(uri, run_id, "perf/sample_images_per_s")
            speed = hist[-1][1] if hist else None
        n_params = r.data.params.get("derived.n_params")
        entries.append({"model": f"raygen {target.meta['family']} {target.meta['size']} ({run})",
                        "params": int(n_params) if n_params else None,
                        "steps": last["params"].get("eval.sample.steps") or "default", "metrics": last["metrics"],
                        "images_per_s": speed, "protocol": (last.get("identity") or {}).get("protocol")})
    return {"text": format_paper_table(entries), "entries": entries}


def format_paper_table(entries: list[dict[str, Any]]) -> str:
    """Rows of (model, params, steps, FID, sFID, IS, Prec, Rec, img/s); an entry whose evaluation used a
    paper row is followed by that row's own numbers."""
    head = ["model", "params", "steps", "FID", "sFID", "IS", "Prec", "Rec", "img/s"]
    scores = (("fid", ".2f"), ("sfid", ".2f"), ("is", ".1f"), ("precision", ".2f"), ("recall", ".2f"))
    lines: list[list[str]] = []
    for e in entries:
        m = e["metrics"]
        lines.append([e["model"], f"{e['params'] / 1e6:.1f}M" if e["params"] else "-", str(e["steps"]),
                      *(_fmt(m.get(f"eval/{k}"), f) for k, f in scores), _fmt(e["images_per_s"], ".1f")])
        proto = e.get("protocol")
        if proto:
            sc = proto["scores"]
            lines.append([f"  paper {proto['model']}" + (" *" if proto["changed"] else ""), proto["params"],
                          str(proto["sample"].get("steps", "-")),
                          *(_fmt(sc.get(k), f) if k != "sfid" else "-" for k, f in scores),
                          _fmt(sc.get("images_per_s"), ".1f")])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in [head, *lines]) + "\n"
    if any(row[0].endswith(" *") for row in lines):
        text += "* evaluated with settings that differ from the paper's (see `raygen report RUN`)\n"
    if any(e.get("protocol") for e in entries):
        text += ("paper img/s come from the paper's hardware (its row's throughput setup); raygen's are measured "
                 "here, one batch on one worker\n")
    return text

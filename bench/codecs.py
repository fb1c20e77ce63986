"""Encode and decode throughput (images/s) of every codec in `raygen.models.tokenizers.CODECS`.

    OMP_NUM_THREADS=2 python bench/codecs.py              # CPU: 2 images per 256 px call, see below
    python bench/codecs.py --shapes digits                # only the 16 px digits shape
    python bench/codecs.py --device cuda                  # 16 images per 256 px call, 256 per digits call

Prints one JSON object. Every codec in `CODECS` is built (iterating the dict, so a new codec joins
automatically) at two shapes, with random weights from a seed (no checkpoint files):
  - 256px:  the papers' 256 x 256 RGB. vq is LlamaGen's VQ-16 (`VQConfig()`, f=16, 16x16 ids over
            16384 codes, 72M parameters) and kl is MAR's KL-16 (`tokenizer.kl.size=kl16`, f=16,
            16x16x16 latents, 66M parameters);
  - digits: 16 x 16 grayscale. kl is `size=debug` (f=2: 8x8x4 latents) and vq is the small f=2
            config the tests tokenize digits with (ch 32, ch_mult (1, 2), z 32, 64 codes of dim 4:
            8x8 ids). Both full-size models would build here too (f=16 divides 16) but give a 1x1 grid.
Every other codec gets its section's defaults (`config_cls()`): palette is 16 colours, one token per
pixel; pixels is one pixel per token. A codec that cannot be built at a shape is reported as
`{"skipped": reason}`. `sections` in each row is the config section it was built from.

Inputs are seeded random uint8 images (content does not change the cost of any of these codecs).
The palette is fitted on `fit_images(n, seed)` random images through its `from_config`, with n
capped at 2**18 pixels' worth (4 images at 256 px) so the k-means fit stays short; the fit is not timed.

For each codec and shape it reports, at `batch` images per call: encode_ms / decode_ms for one call
(best of --repeats after one warm-up call, under torch.inference_mode, synchronizing on CUDA; a
codec fast enough that one call takes under 20 ms is called `calls_per_repeat` times per repeat and
the mean per call kept), encode_images_per_s and decode_images_per_s = batch / that time, the grid,
the token kind (ids / latents / ...), vocab_size or latent_dim where the codec has one, and the
parameter count (buffers such as the palette are not parameters). decode is timed on the codec's
own encode output. Default batch: 16 at 256px and 256 at digits; on CPU the 256px batch is 2 (a
VQ-16 or KL-16 call costs ~1 s to encode and ~2 s to decode per image on 2 cores), which keeps
a full CPU run near 2 minutes. `--batch 8` sets every shape, `--batch 256px=4,digits=64` each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raygen.models.tokenizers import CODECS  # noqa: E402
from raygen.models.tokenizers.kl import KLCodecConfig  # noqa: E402
from raygen.models.tokenizers.vq import VQConfig  # noqa: E402

SHAPES = {"256px": (256, 3), "digits": (16, 1)}  # name -> (image side, channels)
BATCH = {"256px": 16, "digits": 256}
CPU_BATCH = {"256px": 2, "digits": 256}
SECTIONS = {  # shape -> codec -> config section; codecs not named here get config_cls()
    "256px": {"vq": lambda: VQConfig(seed=0), "kl": lambda: KLCodecConfig(size="kl16", seed=0)},
    "digits": {"vq": lambda: VQConfig(ch=32, ch_mult=(1, 2), z_channels=32, codebook_size=64, embed_dim=4, seed=0),
               "kl": lambda: KLCodecConfig(size="debug", seed=0)},
}
FIT_PIXELS = 2**18  # at most this many pixels' worth of images to fit a codec on (the palette's k-means)
MIN_REPEAT_S = 0.02  # a repeat of a faster call runs it several times


def random_images(n: int, side: int, channels: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, side, side, channels) uint8 from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, side, side, channels), generator=g, dtype=torch.uint8).to(device)


def timed(fn, device: torch.device, repeat: int) -> tuple[float, int]:
    """(best-of-`repeat` ms per call of fn(), calls per repeat) after one warm-up call; a call under
    MIN_REPEAT_S is repeated within each timed repeat and the mean per call kept."""
    def run(calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls

    first = run(1)  # warm-up; also sizes the repeats
    calls = 1 if first >= MIN_REPEAT_S else min(1000, math.ceil(MIN_REPEAT_S / max(first, 1e-6)))
    return min(run(calls) for _ in range(repeat)) * 1e3, calls


def sig(x: float) -> float:
    """x to 4 significant digits."""
    return float(f"{x:.4g}")


def section_for(name: str, cls, shape: str, side: int):
    make = SECTIONS.get(shape, {}).get(name)
    section = make() if make else cls.config_cls()
    if dataclasses.is_dataclass(section) and isinstance(getattr(section, "fit_images", None), int):
        section = dataclasses.replace(section, fit_images=min(section.fit_images, max(1, FIT_PIXELS // side**2)))
    return section


def bench_codec(name: str, cls, shape: str, batch: int, args, device: torch.device) -> dict:
    side, channels = SHAPES[shape]
    try:
        section = section_for(name, cls, shape, side)
        start = time.perf_counter()
        codec = cls.from_config(section, image_size=side, channels=channels,
                                fit_images=lambda n, seed: random_images(n, side, channels, seed))
        build_s = time.perf_counter() - start
        codec = codec.to(device).eval()
    except Exception as e:  # noqa: BLE001  a codec that cannot be built at this shape is reported, not fatal
        return {"skipped": f"{type(e).__name__}: {e}"}
    images = random_images(batch, side, channels, seed=1, device=device)
    with torch.inference_mode():
        tokens = codec.encode(images)
        enc_ms, enc_calls = timed(lambda: codec.encode(images), device, args.repeats)
        dec_ms, dec_calls = timed(lambda: codec.decode(tokens), device, args.repeats)
    row = {"batch": batch, "encode_images_per_s": sig(batch / enc_ms * 1e3),
           "decode_images_per_s": sig(batch / dec_ms * 1e3), "encode_ms": sig(enc_ms), "decode_ms": sig(dec_ms),
           "grid": list(codec.grid), "kind": codec.kind, "tokens_shape": list(tokens.shape[1:]),
           "parameters": sum(p.numel() for p in codec.parameters())}
    for attr in ("vocab_size", "latent_dim"):
        if hasattr(codec, attr):
            row[attr] = getattr(codec, attr)
    if enc_calls > 1 or dec_calls > 1:
        row["calls_per_repeat"] = {"encode": enc_calls, "decode": dec_calls}
    row["build_s"] = round(build_s, 2)
    row["section"] = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else repr(section)
    return row


def parse_batch(text: str | None, device: torch.device) -> dict[str, int]:
    batch = dict(BATCH if device.type == "cuda" else CPU_BATCH)
    if text:
        for part in text.split(","):
            key, _, value = part.rpartition("=")
            if key and key not in SHAPES:
                raise SystemExit(f"--batch: unknown shape {key!r}; expected {', '.join(SHAPES)}")
            for shape in [key] if key else SHAPES:
                batch[shape] = int(value)
    return batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", default=None,
                    help="images per call: N for every shape or 256px=N,digits=M (default 16/256; CPU 2/256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--codecs", default=None, help="comma-separated subset of CODECS (default: all)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = parse_batch(args.batch, device)
    shapes = args.shapes.split(",")
    for shape in shapes:
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; expected {', '.join(SHAPES)}")
    names = args.codecs.split(",") if args.codecs else list(CODECS)
    for name in names:
        if name not in CODECS:
            raise SystemExit(f"unknown codec {name!r}; known: {', '.join(CODECS)}")
    torch.manual_seed(0)
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "repeats": args.repeats, "shapes": {s: {"image_size": SHAPES[s][0], "channels": SHAPES[s][1]}
                                                   for s in shapes}}
    start = time.perf_counter()
    for shape in shapes:
        report[shape] = {}
        for name in names:
            t0 = time.perf_counter()
            report[shape][name] = bench_codec(name, CODECS[name], shape, batch[shape], args, device)
            print(f"bench/codecs.py: {shape} {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

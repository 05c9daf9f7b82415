"""Data-pipeline throughput on one core: (a) decoding from the zip with PIL, (b) the decoded
cache + batched crop/flip, (c) the cache + the full training recipe (crop/flip, TrivialAugment,
random erasing, mixup/cutmix with label smoothing), (d) decoding 12-MP photos to 224 px as the
cache does (JPEG draft scale) against a full decode and the same resize, interleaved, (e) random
erasing (p 0.25) on the 30-minute recipe's two batch shapes: timm's per-sample loop, which the CPU
path uses, against the batched version the GPU path uses, interleaved, in ms per batch, (f) Tiny
ImageNet for a 224-px model (the fine-tuning recipe): a generated set in its layout kept at 64 px
and resized per batch, against a cache entry decoded at 224 px: each entry's build time and size,
then the recipe's training batches (read, resize, augmentation), interleaved, in ms per batch.

    python benchmarks/data.py [--data ZIP_OR_FOLDER] [--batches 40] [--quick]

Uses ../shared/data/tiny-imagenet-200.zip when present, else a generated dataset. Prints a
table and writes benchmarks/results/data-<machine>.json.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TINY_ZIP, median, write_result  # noqa: E402

from cvtlab.data.augment import (  # noqa: E402
    AugmentConfig,
    BatchAugment,
    crop_flip,
    normalize,
    random_erase,
    resize_images,
)
from cvtlab.data.datamodule import ImageDataModule  # noqa: E402
from cvtlab.data.sources import open_source  # noqa: E402


def bench_decode(path: Path, n: int) -> float:
    source = open_source(path)
    files = [f for f in source.files() if f.lower().endswith((".jpeg", ".jpg", ".png"))][:n]
    t = time.perf_counter()
    for f in files:
        Image.open(io.BytesIO(source.read(f))).convert("RGB").load()
    return len(files) / (time.perf_counter() - t)


def _photo(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG: smooth colour fields with sensor-like noise, quality 90."""
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    pixels = np.asarray(smooth.resize(size, Image.BICUBIC), dtype=np.int16)
    pixels = (pixels + rng.integers(-20, 21, pixels.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _full_decode(data: bytes, size: int) -> np.ndarray:
    """The cache's decode without the reduced-scale JPEG decode: the baseline for (d)."""
    from cvtlab.data.decode import resize_and_center_crop

    return np.asarray(resize_and_center_crop(Image.open(io.BytesIO(data)).convert("RGB"), size))


def bench_photos(n: int, size: tuple[int, int], rounds: int = 3) -> dict:
    from cvtlab.data.decode import decode_image

    photos = [_photo(np.random.default_rng(i), size) for i in range(n)]
    times: dict[str, list[float]] = {"full": [], "draft": []}
    for _ in range(rounds):
        for key, fn in (("full", _full_decode), ("draft", lambda d, s: decode_image(d, s)[0])):
            t = time.perf_counter()
            for data in photos:
                fn(data, 224)
            times[key].append(n / (time.perf_counter() - t))
    diff = np.mean(
        [
            np.abs(_full_decode(d, 224).astype(np.float32) - decode_image(d, 224)[0]).mean()
            for d in photos
        ]
    )
    return {
        "full_decode": median(times["full"]),
        "draft_decode": median(times["draft"]),
        "mean_abs_diff_grey_levels": float(diff),
    }


def bench_loader(dm: ImageDataModule, batches: int, augment) -> float:
    loader = dm.train_dataloader()
    rates = []
    it = iter(loader)
    for _ in range(batches):
        t = time.perf_counter()
        try:
            images, labels = next(it)
        except StopIteration:
            it = iter(loader)
            images, labels = next(it)
        augment(images, labels)
        rates.append(len(images) / (time.perf_counter() - t))
    return median(rates)


def bench_erasing(shapes: list[tuple[int, int]], rounds: int, p: float = 0.25) -> dict:
    """ms per batch of random erasing, timm's loop against the batched mask, per (batch, px)."""
    timm_erase = RandomErasing(p, mode="pixel", device="cpu")
    ways = {"timm_loop": timm_erase, "batched": lambda x: random_erase(x, p)}
    out = {}
    for batch, size in shapes:
        # The layout BatchAugment erases: normalised, channels-last (B, 3, H, W).
        x = normalize(torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8))
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(rounds):
            for key, fn in ways.items():
                y = x.clone()
                t = time.perf_counter()
                fn(y)
                times[key].append(time.perf_counter() - t)
        out[f"{batch}x{size}px"] = {k: 1e3 * median(v) for k, v in times.items()}
    return out


def bench_kept_small(images: int, rounds: int, batch: int, size: int = 224) -> dict:
    """(f): a generated Tiny ImageNet of ``images`` images at 64 px in a fresh cache, opened for
    ``size`` px kept at 64 (``upscale=False``, as training does) and decoded at ``size``."""
    import yaml

    from cvtlab.data.cache import open_decoded
    from cvtlab.data.synthetic import make_synthetic_tiny_imagenet

    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny_imagenet_finetune.yaml"
    augment = BatchAugment(AugmentConfig(**yaml.safe_load(recipe.read_text())["augment"]), 10)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.dict(os.environ, {"CVTLAB_CACHE": str(Path(tmp) / "cache")}),
    ):
        per_class = max(2, images // 10 - 2)
        data = make_synthetic_tiny_imagenet(
            Path(tmp) / "shapes", train_per_class=per_class, val_per_class=2, test_images=0
        )
        entries, build_s = {}, {}
        for key, upscale in (("kept_64px", False), (f"decoded_{size}px", True)):
            t = time.perf_counter()
            entries[key] = open_decoded(data, size, workers=1, upscale=upscale)
            build_s[key] = time.perf_counter() - t
        rng = np.random.default_rng(0)
        n = len(entries["kept_64px"].labels)
        times: dict[str, list[float]] = {k: [] for k in entries}
        for r in range(rounds):
            for key in list(entries)[:: 1 if r % 2 else -1]:
                d = entries[key]
                t = time.perf_counter()
                rows = np.sort(rng.choice(n, min(batch, n), replace=False))
                x = resize_images(torch.from_numpy(np.array(d.images[rows])), size)
                augment(x, torch.from_numpy(d.labels[rows]))
                times[key].append(time.perf_counter() - t)
        return {
            "images": n,
            "bytes": {k: os.path.getsize(d.root / "images.npy") for k, d in entries.items()},
            "build_s": build_s,
            "ms_per_batch": {k: 1e3 * median(v[1:]) for k, v in times.items()},
            "batch": min(batch, n),
        }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(TINY_ZIP) if TINY_ZIP.is_file() else None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--decode-images", type=int, default=5000)
    p.add_argument("--photos", type=int, default=12, help="12-MP JPEGs for (d)")
    p.add_argument("--kept-images", type=int, default=4000, help="generated images for (f)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the target is per core
    if args.quick:
        args.batches, args.decode_images, args.batch_size = 3, 200, 64
    if args.data is None:
        from cvtlab.data.synthetic import make_synthetic_tiny_imagenet

        args.data = str(
            make_synthetic_tiny_imagenet(Path(tempfile.mkdtemp()) / "shapes", train_per_class=80)
        )
    dm = ImageDataModule(args.data, batch_size=args.batch_size)
    dm.setup()  # builds or reuses the decoded cache (not timed here)
    crop = lambda x, y: crop_flip(x, 4, True)  # noqa: E731
    full = BatchAugment(AugmentConfig(), dm.num_classes)
    results = {
        "a_decode_zip_pil": bench_decode(Path(args.data), args.decode_images),
        "b_cache_crop_flip": bench_loader(dm, args.batches, crop),
        "c_cache_full_recipe": bench_loader(dm, args.batches, full),
    }
    photo_size = (1600, 1200) if args.quick else (4032, 3024)
    photos = bench_photos(2 if args.quick else args.photos, photo_size)
    erasing = bench_erasing(
        [(8, 32)] if args.quick else [(256, 32), (96, 64)], 3 if args.quick else 50
    )
    kept = bench_kept_small(
        120 if args.quick else args.kept_images, 3 if args.quick else 20, 16 if args.quick else 128
    )
    print(f"data: {args.data}  batch {args.batch_size}, 1 thread")
    print(f"{'pipeline':<24} {'images/s':>10}")
    for k, v in results.items():
        print(f"{k:<24} {v:>10.0f}")
    print(
        f"cache + crop/flip is {results['b_cache_crop_flip'] / results['a_decode_zip_pil']:.1f}× decoding"
    )
    print(
        f"(d) {photo_size[0]}x{photo_size[1]} JPEGs to 224 px: full decode "
        f"{photos['full_decode']:.1f}/s, reduced-scale decode {photos['draft_decode']:.1f}/s "
        f"({photos['draft_decode'] / photos['full_decode']:.2f}x), "
        f"{photos['mean_abs_diff_grey_levels']:.2f} grey levels apart on average"
    )
    for shape, ms in erasing.items():
        print(
            f"(e) random erasing, batch {shape}: timm's loop {ms['timm_loop']:.2f} ms, "
            f"batched {ms['batched']:.2f} ms"
        )
    big, small = kept["bytes"]["decoded_224px"], kept["bytes"]["kept_64px"]
    ms = kept["ms_per_batch"]
    print(
        f"(f) {kept['images']} Tiny-ImageNet-layout images for 224 px: kept at 64 px "
        f"{small / 2**20:.0f} MiB in {kept['build_s']['kept_64px']:.1f} s, decoded at 224 px "
        f"{big / 2**20:.0f} MiB in {kept['build_s']['decoded_224px']:.1f} s ({big / small:.1f}x); "
        f"fine-tuning batch of {kept['batch']} {ms['kept_64px']:.0f} ms resized against "
        f"{ms['decoded_224px']:.0f} ms ({ms['decoded_224px'] / ms['kept_64px']:.2f}x)"
    )
    if not args.no_write:
        print(
            write_result(
                "data",
                {
                    "data": args.data,
                    "batch_size": args.batch_size,
                    "images_per_second": results,
                    "photos_to_224px": {"size": list(photo_size), **photos},
                    "random_erasing_ms_per_batch": erasing,
                    "tiny_imagenet_for_224px": kept,
                },
            )
        )
    return {**results, "d_photos": photos, "e_erasing_ms": erasing, "f_kept_small": kept}


if __name__ == "__main__":
    main()

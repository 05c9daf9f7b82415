"""Data-pipeline throughput on one core: (a) decoding from the zip with PIL, (b) the decoded
cache + batched crop/flip, (c) the cache + the full training recipe (crop/flip, TrivialAugment,
random erasing, mixup/cutmix with label smoothing).

    python benchmarks/data.py [--data ZIP_OR_FOLDER] [--batches 40] [--quick]

Uses ../shared/data/tiny-imagenet-200.zip when present, else a generated dataset. Prints a
table and writes benchmarks/results/data-<machine>.json.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TINY_ZIP, median, write_result  # noqa: E402

from cvtlab.data.augment import AugmentConfig, BatchAugment, crop_flip  # noqa: E402
from cvtlab.data.datamodule import ImageDataModule  # noqa: E402
from cvtlab.data.sources import open_source  # noqa: E402


def bench_decode(path: Path, n: int) -> float:
    source = open_source(path)
    files = [f for f in source.files() if f.lower().endswith((".jpeg", ".jpg", ".png"))][:n]
    t = time.perf_counter()
    for f in files:
        Image.open(io.BytesIO(source.read(f))).convert("RGB").load()
    return len(files) / (time.perf_counter() - t)


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(TINY_ZIP) if TINY_ZIP.is_file() else None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--decode-images", type=int, default=5000)
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
    print(f"data: {args.data}  batch {args.batch_size}, 1 thread")
    print(f"{'pipeline':<24} {'images/s':>10}")
    for k, v in results.items():
        print(f"{k:<24} {v:>10.0f}")
    print(
        f"cache + crop/flip is {results['b_cache_crop_flip'] / results['a_decode_zip_pil']:.1f}× decoding"
    )
    if not args.no_write:
        print(
            write_result(
                "data",
                {"data": args.data, "batch_size": args.batch_size, "images_per_second": results},
            )
        )
    return results


if __name__ == "__main__":
    main()

"""``cvtlab data info | show | download``."""

from __future__ import annotations

import argparse
import json

from ..errors import CvtLabError


def info(data: str, img_size: int = 64) -> dict:
    """What ``cvtlab data info`` reports, as a dict (decodes the dataset into the cache once)."""
    from .cache import open_decoded
    from .download import resolve_data

    path = resolve_data(data)
    # The entry a training run at img_size uses (Tiny ImageNet stays at 64 px above that).
    d = open_decoded(path, img_size, upscale=False)
    m = d.manifest
    splits = {k: b - a for k, (a, b) in m["splits"].items()}
    return {
        # The path given: the cache, shared by every path to the same data, keeps the first.
        "path": str(path),
        "kind": m["kind"],
        "classes": len(m["classes"]),
        "splits": splits,
        # A split without labels (Tiny ImageNet's test folder) serves prediction only.
        "unlabelled": [k for k, n in splits.items() if n and (d.split(k)[1] < 0).all()],
        "grayscale": m["grayscale"],
        "modes": m.get("modes", {}),
        "sizes": m.get("sizes", {}),
        "skipped": m["skipped"],
        "cache": str(d.root),
        "cache_img_size": d.img_size,
        "run_splits": run_splits(d),
    }


def run_splits(d, val_per_class: int = 10) -> dict:
    """The splits a training run makes of the data (with the default ``val_per_class`` and
    seed): each one's size and the stored splits its images come from. Tiny ImageNet's
    official ``val`` is the test set, and validation is carved from ``train``."""
    from .splits import plan_splits

    try:
        plan = plan_splits(d, val_per_class)
    except ValueError:  # no training images: the data can be predicted on, not trained on
        return {}
    ranges = d.manifest["splits"]
    described = {}
    for name, rows in plan.items():
        sources = [
            k for k, (a, b) in ranges.items() if len(rows) and ((rows >= a) & (rows < b)).any()
        ]
        described[name] = {"images": int(len(rows)), "from": sources}
    return described


def _cmd_info(args: argparse.Namespace) -> None:
    report = info(args.path, args.img_size)
    if args.format == "json":
        print(json.dumps(report, indent=2))
        return
    print(f"{report['path']} ({report['kind']}): {report['classes']} classes")
    for split, n in report["splits"].items():
        note = ", no labels" if split in report["unlabelled"] else ""
        print(f"  {split:<6} {n:>7} images, {report['grayscale'].get(split, 0)} grayscale{note}")
    print("  modes: " + ", ".join(f"{k} {v}" for k, v in report["modes"].items()))
    print("  sizes: " + ", ".join(f"{k} {v}" for k, v in report["sizes"].items()))
    print(f"  skipped: {len(report['skipped'])}")
    for s in report["skipped"][:20]:
        print(f"    {s['file']}: {s['reason']}")
    if len(report["skipped"]) > 20:
        print(f"    … and {len(report['skipped']) - 20} more (see --format json)")
    if report["run_splits"]:
        parts = []
        for name, split in report["run_splits"].items():
            carved = (
                f" (from {', '.join(split['from'])})" if split["from"] not in ([], [name]) else ""
            )
            parts.append(f"{name} {split['images']}{carved}")
        print("  a training run uses: " + ", ".join(parts))
    print(f"  decoded cache: {report['cache']} ({report['cache_img_size']} px)")


def _cmd_show(args: argparse.Namespace) -> None:
    from ..report import sample_grid
    from .cache import open_decoded
    from .download import resolve_data

    d = open_decoded(resolve_data(args.path), args.img_size, upscale=False)
    split = args.split
    if split is None:  # an image folder without split folders has one split, "all"
        split = "train" if "train" in d.manifest["splits"] else next(iter(d.manifest["splits"]))
    title = f"{args.path} — {split}"
    if split not in d.manifest["splits"] and split in ("train", "val", "test"):
        # A folder without split folders: the split a training run carves from it.
        import numpy as np

        from .splits import plan_splits

        rows = np.sort(plan_splits(d)[split])
        images, labels = d.images[rows], d.labels[rows]
        title += " (as a training run carves it)"
    else:
        images, labels = d.split(split)
    if not len(images):
        raise CvtLabError(f"{args.path}: the {split} split is empty")
    out = sample_grid(
        images, labels, d.class_names, n=args.n, seed=args.seed, path=args.out, title=title
    )
    print(out)


def _cmd_download(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .download import download
    from .tiny_imagenet import MD5, URL

    md5 = None if args.no_check else (args.md5 or MD5)
    print(download(args.url or URL, Path(args.out) if args.out else None, md5))


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import positive_int

    data = sub.add_parser("data", help="inspect, show and download datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = dsub.add_parser("info", help="classes, split counts, sizes, modes, skipped files")
    p.add_argument("path", help="Tiny ImageNet zip or folder, an image folder, or tiny-imagenet")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument(
        "--img-size", type=positive_int, default=64, help="size the images are decoded to"
    )
    p.set_defaults(func=_cmd_info)

    p = dsub.add_parser("show", help="a grid of samples with their class names, as a PNG")
    p.add_argument("path")
    p.add_argument(
        "--split",
        help="a split as stored: train, val, test or all (default: train, else the one); "
        "for a folder without split folders, train, val or test as a training run carves them",
    )
    p.add_argument("--n", type=positive_int, default=32, help="how many images the grid shows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--img-size", type=positive_int, default=64)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=_cmd_show)

    p = dsub.add_parser(
        "download", help="fetch the official Tiny ImageNet zip into the cache folder"
    )
    p.add_argument("--url", help="where to fetch it from (default: the official address)")
    p.add_argument("--md5", help="the checksum it must have (default: the official zip's)")
    p.add_argument("--no-check", action="store_true", help="skip the checksum (for mirrors)")
    p.add_argument("--out", default=None, help="where to save (default: the cache folder)")
    p.set_defaults(func=_cmd_download)

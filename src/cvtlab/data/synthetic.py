"""A small procedural dataset in the Tiny ImageNet layout: shapes and textures, deterministic.

It lets a fresh machine without the real data (or a network) run the real workflow end to end,
and gives the tests data of known structure. Some images are stored as grayscale JPEGs, as in
Tiny ImageNet.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = [
    ("n90000001", "disc"),
    ("n90000002", "square"),
    ("n90000003", "triangle"),
    ("n90000004", "ring"),
    ("n90000005", "cross"),
    ("n90000006", "horizontal stripes"),
    ("n90000007", "vertical stripes"),
    ("n90000008", "checkerboard"),
    ("n90000009", "polka dots"),
    ("n90000010", "diagonal stripes"),
]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _draw(kind: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    bg, fg = _colour(rng), _colour(rng)
    while sum(abs(a - b) for a, b in zip(bg, fg)) < 150:
        fg = _colour(rng)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(12, 24))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    period = int(rng.integers(6, 12))
    width = max(2, period // 2)
    if kind == 0:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == 1:
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == 2:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == 3:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(3, r // 3))
    elif kind == 4:
        t = max(3, r // 3)
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fg)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fg)
    elif kind == 5:
        for y in range(int(rng.integers(0, period)), size, period):
            d.rectangle([0, y, size, y + width - 1], fill=fg)
    elif kind == 6:
        for x in range(int(rng.integers(0, period)), size, period):
            d.rectangle([x, 0, x + width - 1, size], fill=fg)
    elif kind == 7:
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2 == 0:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    elif kind == 8:
        dot = max(2, period // 3)
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                d.ellipse([x - dot, y - dot, x + dot, y + dot], fill=fg)
    else:
        for k in range(-size, 2 * size, period):
            d.line([(k, 0), (k + size, size)], fill=fg, width=width)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_synthetic_tiny_imagenet(
    root: str | Path,
    *,
    train_per_class: int = 260,
    val_per_class: int = 40,
    test_images: int = 40,
    classes: int = 10,
    seed: int = 0,
    grayscale_every: int = 17,
) -> Path:
    """Write ``root/`` in the Tiny ImageNet layout and return it. Deterministic in ``seed``."""
    root = Path(root)
    chosen = CLASSES[:classes]
    rng = np.random.default_rng(seed)
    counter = 0

    def save(img: Image.Image, path: Path) -> None:
        nonlocal counter
        counter += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        if counter % grayscale_every == 0:
            img = img.convert("L")
        img.save(path, "JPEG", quality=90)

    (root).mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w, _ in reversed(chosen)))
    (root / "words.txt").write_text(
        "".join(f"{w}\t{n}\n" for w, n in CLASSES) + "n00000001\tentity\n"
    )
    for label, (wnid, _) in enumerate(chosen):
        boxes = []
        for k in range(train_per_class):
            name = f"{wnid}_{k}.JPEG"
            save(_draw(label, rng), root / "train" / wnid / "images" / name)
            boxes.append(f"{name}\t0\t0\t63\t63\n")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    annotations = []
    val_labels = np.repeat(np.arange(len(chosen)), val_per_class)
    rng.shuffle(val_labels)
    for k, label in enumerate(val_labels):
        save(_draw(int(label), rng), root / "val" / "images" / f"val_{k}.JPEG")
        annotations.append(f"val_{k}.JPEG\t{chosen[label][0]}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    for k in range(test_images):
        save(
            _draw(int(rng.integers(len(chosen))), rng), root / "test" / "images" / f"test_{k}.JPEG"
        )
    return root


def zip_folder(folder: str | Path, dest: str | Path) -> Path:
    """Zip ``folder`` with its name as the single top folder, as the official zip is laid out."""
    folder, dest = Path(folder), Path(dest)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, Path(folder.name) / path.relative_to(folder))
    return dest

"""Datasets: Tiny ImageNet (real zip when present, generated otherwise), image folders, the
decoded cache, augmentation and the data commands."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvtlab import CvtLabError
from cvtlab.data.augment import BatchAugment, crop_flip, random_erase
from cvtlab.data.augment_config import AugmentConfig
from cvtlab.data.cache import load_index, open_decoded
from cvtlab.data.datamodule import EpochShuffle, ImageDataModule
from cvtlab.data.splits import plan_splits
from cvtlab.data.synthetic import make_synthetic_tiny_imagenet, zip_folder

from .conftest import run_cli, run_cli_here


# -- the real zip --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_decoded():
    from .conftest import TINY_ZIP

    if not TINY_ZIP.is_file():
        pytest.skip(f"real Tiny ImageNet zip not found at {TINY_ZIP}")
    return open_decoded(TINY_ZIP, 64)


@pytest.mark.slow
def test_real_zip_counts_grayscale_and_labels(tiny_decoded):
    d = tiny_decoded
    assert d.splits == {"train": 100_000, "val": 10_000, "test": 2_000}
    assert d.manifest["grayscale"]["train"] == 1821
    assert d.manifest["grayscale"]["val"] == 168
    assert len(d.classes) == 200 and d.classes == sorted(d.classes)
    assert d.images.shape[1:] == (64, 64, 3) and d.images.dtype == np.uint8
    # Class index = position in sorted wnids; names come from words.txt.
    train_files = d.files("train")
    first = d.labels[: d.splits["train"]]
    assert all(d.classes[label] in path for label, path in zip(first[::997], train_files[::997]))
    assert d.class_names[d.classes.index("n01443537")] == "goldfish, Carassius auratus"
    assert np.bincount(d.split("val")[1], minlength=200).tolist() == [50] * 200
    assert (d.split("test")[1] == -1).all()
    # Runs test on the official val images and hold out 10 train images a class for selection.
    rows = plan_splits(d)
    assert {k: len(v) for k, v in rows.items()} == {"train": 98_000, "val": 2_000, "test": 10_000}
    assert (d.labels[rows["test"]] == d.split("val")[1]).all()
    assert d.manifest["skipped"] == []


@pytest.mark.slow
def test_real_zip_val_labels_and_boxes_follow_the_annotations(tiny_zip):
    index = load_index(tiny_zip)
    with zipfile.ZipFile(tiny_zip) as zf:
        line = zf.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()[0]
    name, wnid, *box = line.split("\t")
    label = dict(index.splits["val"])[f"val/images/{name}"]
    assert index.classes[label] == wnid
    assert index.boxes[f"val/images/{name}"] == tuple(int(v) for v in box)
    assert len(index.boxes) == 110_000


@pytest.mark.slow
def test_real_zip_info_json(tiny_decoded):
    r = run_cli_here("data", "info", str(tiny_decoded.manifest["source"]), "--format", "json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["classes"] == 200
    assert info["splits"] == {"train": 100000, "val": 10000, "test": 2000}
    assert info["grayscale"]["train"] == 1821
    assert info["skipped"] == []
    assert info["unlabelled"] == ["test"]


def test_data_info_tells_which_splits_have_no_labels(shapes_small, tmp_path):
    """Tiny ImageNet's test folder carries no labels; a folder's test split of class folders
    does."""
    r = run_cli_here("data", "info", str(shapes_small))
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:4]}
    assert lines["test"].endswith("no labels") and "no labels" not in lines["val"]
    from cvtlab.data.commands import info

    root = tmp_path / "photos"
    for name in ("train/cat/a.jpg", "train/dog/b.jpg", "test/cat/c.jpg", "test/dog/d.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_jpeg())
    assert info(str(root))["unlabelled"] == []


def test_data_info_says_which_images_a_run_trains_validates_and_tests_on(shapes_small, tmp_path):
    """Tiny ImageNet's held-out test set is its official val split and validation is carved
    from train: the split counts as stored would mislead without the run's own."""
    from cvtlab.data.commands import info

    r = run_cli_here("data", "info", str(shapes_small))
    assert "a training run uses: train 500, val 100 (from train), test 100 (from val)" in r.stdout
    # The official zip extracted into a folder of its own: that folder is the dataset, not an
    # image folder of one class.
    outer = tmp_path / "extracted"
    outer.mkdir()
    (outer / shapes_small.name).symlink_to(shapes_small)
    report = info(str(outer))
    assert (report["kind"], report["classes"], report["path"]) == ("tiny-imagenet", 10, str(outer))
    assert report["run_splits"]["test"] == {"images": 100, "from": ["val"]}


@pytest.mark.slow
def test_real_zip_splits_policy(tiny_decoded):
    rows = plan_splits(tiny_decoded, val_per_class=10, seed=0)
    assert len(rows["val"]) == 2000 and len(rows["train"]) == 98_000 and len(rows["test"]) == 10_000
    assert np.bincount(tiny_decoded.labels[rows["val"]], minlength=200).tolist() == [10] * 200
    assert not set(rows["val"]) & set(rows["train"])
    assert (rows["test"] >= 100_000).all()  # the official val split, held out as test
    again = plan_splits(tiny_decoded, val_per_class=10, seed=0)
    assert np.array_equal(again["val"], rows["val"])
    other = plan_splits(tiny_decoded, val_per_class=10, seed=1)
    assert not np.array_equal(other["val"], rows["val"])


# -- generated Tiny ImageNet: zip, folder, read-only -------------------------------------------
def test_zip_and_folder_decode_to_the_same_pixels(shapes_small, tmp_path):
    z = zip_folder(shapes_small, tmp_path / "shapes.zip")
    a, b = open_decoded(shapes_small), open_decoded(z)
    assert a.splits == b.splits == {"train": 600, "val": 100, "test": 8}
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.manifest["grayscale"]["train"] > 0  # the generator stores some as grayscale JPEG
    assert a.class_names[0] == "disc"  # names from words.txt, classes by sorted wnid


def test_read_only_dataset_folder_gets_nothing_written_beside_it(tmp_path):
    src = make_synthetic_tiny_imagenet(
        tmp_path / "ro", train_per_class=5, val_per_class=2, test_images=2
    )
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for p in [src, *src.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        d = open_decoded(src)
        assert d.splits == {"train": 50, "val": 20, "test": 2}
    finally:
        for p in [src, *src.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


CACHE_PROBE = (
    "from cvtlab.data.cache import open_decoded\n"
    "import sys\n"
    "d = open_decoded(sys.argv[1])\n"
    "print(d.built_now, d.splits['train'])\n"
)


def test_cache_is_reused_across_processes_and_rebuilt_when_the_source_changes(tmp_path):
    src = make_synthetic_tiny_imagenet(
        tmp_path / "ds", train_per_class=6, val_per_class=2, test_images=1
    )
    env = {**os.environ, "CVTLAB_CACHE": str(tmp_path / "cache")}

    def probe():
        r = subprocess.run(
            [sys.executable, "-c", CACHE_PROBE, str(src)], capture_output=True, text=True, env=env
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert probe() == ["True", "60"]
    assert probe() == ["False", "60"]
    # An older cvtlab's copy of this dataset at this size (another format, another folder) is
    # deleted by the next build; another dataset's entry is left alone.
    decoded = tmp_path / "cache" / "decoded"
    [entry] = [p for p in decoded.iterdir() if p.is_dir()]
    manifest = json.loads((entry / "manifest.json").read_text())
    older, other = decoded / "ds-64px-0123456789ab", decoded / "ds-64px-ba9876543210"
    for path, source, fmt in ((older, manifest["source"], 2), (other, "/elsewhere/ds", 2)):
        path.mkdir()
        (path / "images.npy").write_bytes(b"x" * 1000)
        (path / "manifest.json").write_text(
            json.dumps({"format": fmt, "source": source, "img_size": 64})
        )
    extra = src / "train" / "n90000001" / "images" / "n90000001_99.JPEG"
    shutil.copy(src / "train" / "n90000001" / "images" / "n90000001_0.JPEG", extra)
    assert probe() == ["True", "61"]
    assert not older.exists() and other.exists()
    assert probe() == ["False", "61"]


def test_killed_build_leaves_nothing_a_later_run_trusts(tmp_path):
    src = make_synthetic_tiny_imagenet(
        tmp_path / "ds", train_per_class=150, val_per_class=5, test_images=1
    )
    cache = tmp_path / "cache"
    # TMPDIR: timm imports wandb, whose two temporary folders a killed process leaves behind
    env = {**os.environ, "CVTLAB_CACHE": str(cache), "TMPDIR": str(tmp_path)}
    code = (
        "import sys, cvtlab.data.cache as c, cvtlab.data.decode as d\n"
        "real = c.decode_image\n"
        "def slow(data, size, crop=1.0):\n"
        "    import time; time.sleep(0.002); return real(data, size, crop)\n"
        "c.decode_image = slow\n"
        "c.open_decoded(sys.argv[1], workers=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(src)], env=env)
    import time

    deadline = time.time() + 60
    while time.time() < deadline and not list((cache / "decoded").glob("*.tmp-*")):
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be killed"
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    entries = [p for p in (cache / "decoded").iterdir() if p.is_dir() and ".tmp-" not in p.name]
    assert not any((p / "manifest.json").exists() for p in entries)
    os.environ["CVTLAB_CACHE"], old = str(cache), os.environ["CVTLAB_CACHE"]
    try:
        d = open_decoded(src)
    finally:
        os.environ["CVTLAB_CACHE"] = old
    assert d.built_now and d.splits["train"] == 1500
    assert d.images[-1].any()  # the last image was really decoded


_MARKS: Path | None = None  # where the patched decode below marks each chunk it decoded


def _decode_chunk_interrupted_first(source, npy, start, paths, size, crop=1.0):
    """The cache's chunk decode, with Ctrl-C arriving in the first chunk. At module level so
    that the pool's workers can unpickle it."""
    import cvtlab.data.cache as cache

    if start == 0:
        raise KeyboardInterrupt
    time.sleep(0.05)
    (_MARKS / str(start)).touch()
    return cache._decode_chunk_real(source, npy, start, paths, size, crop)


def test_ctrl_c_during_a_build_stops_without_decoding_the_rest(tmp_path, monkeypatch):
    """Ctrl-C reaches the workers too; the chunks not yet started are dropped rather than
    decoded before the command can stop, and nothing half-built is left."""
    import cvtlab.data.cache as cache

    src = make_synthetic_tiny_imagenet(
        tmp_path / "ds", train_per_class=16, val_per_class=2, test_images=0
    )
    marks = tmp_path / "done"
    marks.mkdir()
    # Forked workers see every patch.
    monkeypatch.setattr(sys.modules[__name__], "_MARKS", marks)
    monkeypatch.setattr(cache, "_decode_chunk_real", cache._decode_chunk, raising=False)
    monkeypatch.setattr(cache, "_decode_chunk", _decode_chunk_interrupted_first)
    monkeypatch.setattr(cache, "_CHUNK", 6)
    monkeypatch.setenv("CVTLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        open_decoded(src, workers=2)
    assert len(list(marks.iterdir())) <= 8  # of 30 chunks: those already handed to a worker
    assert not [p for p in (tmp_path / "cache" / "decoded").iterdir() if p.is_dir()]


# -- bad input ---------------------------------------------------------------------------------
def _jpeg(colour=(200, 10, 10), size=(64, 64), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 128).save(buf, "JPEG")
    return buf.getvalue()


def _classes_and_items(index) -> tuple[list[str], list[tuple[str, int]]]:
    """An image folder's classes and its (file, label) pairs, sorted."""
    return index.classes, sorted(index.splits["all"])


def _folder(root, classes):
    for cls, files in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (root / cls / name).write_bytes(data)
    return root


def test_broken_images_are_skipped_with_their_names_and_reasons(tmp_path):
    good = {f"{i}.jpg": _jpeg() for i in range(4)}
    root = _folder(
        tmp_path / "f",
        {
            "cats": {
                **good,
                "truncated.jpg": _jpeg()[:300],
                "empty.jpg": b"",
                "notes.txt": b"hello",
            },
            "dogs": {**good, "fake.png": b"not a png at all"},
        },
    )
    d = open_decoded(root)
    assert d.splits == {"all": 8}
    reasons = {os.path.basename(s["file"]): s["reason"] for s in d.manifest["skipped"]}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.txt", "fake.png"}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.txt"] == "not an image file ('.txt')"
    assert reasons["fake.png"] == "not an image (unrecognised content)"
    assert "corrupt or truncated" in reasons["truncated.jpg"]
    assert all(str(root) in s["file"] for s in d.manifest["skipped"])
    assert (d.images.reshape(8, -1).max(axis=1) > 0).all()  # every kept row is a real image


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = _folder(tmp_path / "f", {"cats": {"a.jpg": _jpeg()}, "dogs": {}})
    with pytest.raises(CvtLabError, match=r"dogs: class folder holds no images"):
        load_index(root)


def test_zip_that_is_not_a_dataset(tmp_path):
    z = tmp_path / "random.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with pytest.raises(CvtLabError, match="no class folders found"):
        load_index(z)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK but not really")
    with pytest.raises(CvtLabError, match="bad.zip: not a readable zip"):
        load_index(bad)


def test_missing_val_annotations_and_unknown_wnid(tmp_path):
    src = make_synthetic_tiny_imagenet(
        tmp_path / "t", train_per_class=2, val_per_class=1, test_images=0
    )
    ann = src / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.unlink()
    with pytest.raises(CvtLabError, match=r"val_annotations.txt: missing"):
        load_index(src)
    ann.write_text(text + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(
        CvtLabError,
        match=rf"val_annotations.txt:{text.count(chr(10)) + 1}: unknown wnid 'n99999999'",
    ):
        load_index(src)


def test_cli_data_errors_are_one_line(tmp_path):
    r = run_cli("data", "info", str(tmp_path / "absent.zip"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "absent.zip" in r.stderr
    # Counts and sizes are checked before any work: 0 once divided by zero mid-decode.
    for args, flag in [
        (["info", str(tmp_path), "--img-size", "0"], "--img-size"),
        (["show", str(tmp_path), "--n", "0", "--out", str(tmp_path / "g.png")], "--n"),
        (
            ["show", str(tmp_path), "--img-size", "-3", "--out", str(tmp_path / "g.png")],
            "--img-size",
        ),
    ]:
        r = run_cli_here("data", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"argument {flag}: must be a whole number of at least 1" in r.stderr
    # A file system's refusal is one line that names the path, not a traceback.
    shapes = make_synthetic_tiny_imagenet(
        tmp_path / "shapes", train_per_class=2, val_per_class=2, test_images=2, classes=2
    )
    if os.path.isdir("/proc/self"):  # Linux: no file can be created in /proc
        r = run_cli_here("data", "show", str(shapes), "--n", "2", "--out", "/proc/grid.png")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "cvtlab: error:" in r.stderr and "/proc/grid.png" in r.stderr


# -- image folders ----------------------------------------------------------------------------
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_any_mode_and_size_becomes_rgb_at_the_input_size(tmp_path):
    modes = {
        "l.PNG": _png(Image.new("L", (90, 50), 100)),
        "la.png": _png(Image.new("LA", (30, 30), (100, 0))),  # fully transparent → white
        "p.bmp": (lambda b: (Image.new("P", (40, 80), 3).save(b, "BMP"), b.getvalue())[1])(
            io.BytesIO()
        ),
        "rgba.webp": (
            lambda b: (Image.new("RGBA", (70, 70), (0, 0, 255, 255)).save(b, "WEBP"), b.getvalue())[
                1
            ]
        )(io.BytesIO()),
        "cmyk.JPEG": (
            lambda b: (Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(b, "JPEG"), b.getvalue())[
                1
            ]
        )(io.BytesIO()),
        "i16.png": _png(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))),
    }
    root = _folder(tmp_path / "f", {"a": modes, "b": {"x.jpg": _jpeg(size=(300, 200))}})
    d = open_decoded(root, 48)
    assert d.images.shape == (7, 48, 48, 3) and d.manifest["skipped"] == []
    files = d.files("all")
    la = d.images[files.index("a/la.png")]
    assert (la == 255).all()
    cmyk = d.images[files.index("a/cmyk.JPEG")]
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # CMYK (0,255,255,0) is red
    assert d.manifest["modes"]["L"] == 1 and d.manifest["grayscale"]["all"] >= 3


def test_photos_are_decoded_upright_and_large_jpegs_at_reduced_scale():
    from cvtlab.data.decode import decode_image

    # 80×40 stored, left half red and right half blue; EXIF orientation 6 shows it turned a
    # quarter clockwise (40×80, red on top), as a phone held upright saves it.
    stored = Image.new("RGB", (80, 40), (220, 0, 0))
    stored.paste((0, 0, 220), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    pixels, mode, size = decode_image(buf.getvalue(), 32)
    assert size == (80, 40) and mode == "RGB"
    top, bottom = pixels[:12].reshape(-1, 3).mean(0), pixels[-12:].reshape(-1, 3).mean(0)
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0], (top, bottom)

    # A 1,600×1,200 JPEG decoded at 1/8 scale before resizing to 64 px: within a grey level of
    # resizing the full decode.
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    large = Image.fromarray(small).resize((1600, 1200), Image.BICUBIC)
    buf = io.BytesIO()
    large.save(buf, "JPEG", quality=90)
    got = decode_image(buf.getvalue(), 64)[0].astype(np.float32)
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    full = full.resize((85, 64), Image.BILINEAR, reducing_gap=3.0).crop((10, 0, 74, 64))
    assert np.abs(got - np.asarray(full, dtype=np.float32)).mean() < 1.0


def test_folder_with_split_subfolders_and_stratified_split_without(tmp_path):
    jpg = _jpeg()
    split_root = tmp_path / "s"
    for split, n in (("train", 30), ("val", 5), ("test", 4)):
        for cls in ("a", "b", "c"):
            _folder(split_root / split, {cls: {f"{i}.jpg": jpg for i in range(n)}})
    d = open_decoded(split_root)
    assert d.splits == {"train": 90, "val": 15, "test": 12}
    rows = plan_splits(d, 10, 0)
    assert {k: len(v) for k, v in rows.items()} == {"train": 90, "val": 15, "test": 12}

    flat = tmp_path / "flat"
    _folder(flat, {cls: {f"{i}.jpg": jpg for i in range(50)} for cls in ("a", "b", "c")})
    d = open_decoded(flat)
    rows = plan_splits(d, 5, seed=3)
    assert np.bincount(d.labels[rows["val"]]).tolist() == [5, 5, 5]
    assert np.bincount(d.labels[rows["test"]]).tolist() == [10, 10, 10]
    assert len(set(rows["train"]) | set(rows["val"]) | set(rows["test"])) == 150


# -- augmentation and loading --------------------------------------------------------------
def test_crop_flip_is_a_per_sample_shift_and_mirror():
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.int32).reshape(2, 8, 8, 3)
    assert torch.equal(crop_flip(x, 0, False), x)
    torch.manual_seed(0)
    flipped = [crop_flip(x, 0, True) for _ in range(20)]
    for out in flipped:
        for i in range(2):
            assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(1))
    assert any(not torch.equal(o[0], x[0]) for o in flipped) and any(
        torch.equal(o[0], x[0]) for o in flipped
    )
    shifted = crop_flip(x, 2, False)
    assert shifted.shape == x.shape and shifted.dtype == x.dtype

    def reflect(i):
        i = abs(i)
        return 2 * 7 - i if i > 7 else i

    # Each sample is the input shifted by one (dy, dx) in [-2, 2]², reflected at the border.
    for i in range(2):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if all(
                torch.equal(shifted[i, r, c], x[i, reflect(r + dy), reflect(c + dx)])
                for r in range(8)
                for c in range(8)
            )
        ]
        assert len(matches) == 1


def test_normalize_matches_the_imagenet_statistics_from_uint8_and_float():
    from cvtlab.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize

    images = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (images.permute(0, 3, 1, 2).double() / 255 - m.double()) / s.double()
    got = normalize(images)
    assert got.shape == (3, 3, 5, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    as_float = images.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(normalize(as_float).double(), want, rtol=0, atol=1e-5)
    assert torch.equal(as_float, images.permute(0, 3, 1, 2).float() / 255)  # input untouched
    # Without crop or flip, training batches are exactly the normalised images.
    plain = BatchAugment(
        AugmentConfig(
            crop="none",
            flip=False,
            auto_augment=None,
            random_erase=0,
            mixup=0,
            cutmix=0,
            label_smoothing=0,
        ),
        10,
    )
    x, labels = plain(images, torch.arange(3))
    assert torch.equal(x, got) and labels.tolist() == [0, 1, 2]


def test_random_crop_takes_full_resolution_windows_at_varying_places():
    from cvtlab.data.augment import random_crop

    x = torch.randn(64, 3, 12, 12)
    out = random_crop(x, 8)
    assert out.shape == (64, 3, 8, 8)
    places = []
    for i in range(64):
        found = [
            (t, left)
            for t in range(5)
            for left in range(5)
            if torch.equal(out[i], x[i, :, t : t + 8, left : left + 8])
        ]
        assert len(found) == 1  # an exact window: same pixels, nothing resampled
        places.append(found[0])
    assert len(set(places)) > 10  # per sample, not one window for the batch
    with pytest.raises(CvtLabError, match="cannot crop 16x16 from 12x12"):
        random_crop(x, 16)


def test_batched_random_erase_fills_one_rectangle_in_about_p_of_the_samples():
    torch.manual_seed(0)
    x = torch.full((2000, 3, 16, 16), 7.0)
    out = random_erase(x, 0.25)
    changed = out != 7.0
    erased = changed.flatten(1).any(1)
    assert 0.21 < erased.float().mean().item() < 0.29
    for i in torch.nonzero(erased).flatten()[:200].tolist():
        where = changed[i].any(0)  # the same pixels in every channel
        assert torch.equal(where, changed[i].all(0))
        rows, cols = torch.nonzero(where.any(1)).flatten(), torch.nonzero(where.any(0)).flatten()
        # One solid rectangle, within the image and the area limits (2% to 1/3 of 256 pixels,
        # rounding allowed).
        box = where[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and where.sum() == box.numel()
        assert 2 <= box.numel() <= 0.4 * 256
    noise = out[erased][changed[erased]]
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1
    assert torch.equal(random_erase(x, 0.0), x)


def test_batch_augment_outputs_normalised_floats_and_soft_targets():
    x = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8)
    y = torch.randint(0, 10, (16,))
    images, targets = BatchAugment(AugmentConfig(), 10)(x, y)
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
    assert targets.shape == (16, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    plain, hard = BatchAugment(
        AugmentConfig(
            auto_augment=None,
            mixup=0,
            cutmix=0,
            random_erase=0,
            label_smoothing=0,
            crop="none",
            flip=False,
        ),
        10,
    )(x, y)
    assert torch.equal(hard, y)
    assert abs(plain.mean().item()) < 1.0


def test_epoch_shuffle_resumes_mid_epoch_and_shards_ranks():
    full = list(EpochShuffle(100, seed=3))
    s = EpochShuffle(100, seed=3)
    s.resume(0, 40)
    assert list(s) == full[40:]
    s.set_epoch(1)
    assert sorted(s) == list(range(100)) and list(s) != full
    ranks = [list(EpochShuffle(101, 3, r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 51 and set(ranks[0]) | set(ranks[1]) == set(range(101))


def test_datamodule_batches_are_uint8_and_deterministic(shapes_small):
    dm = ImageDataModule(shapes_small, batch_size=32, seed=1)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert (
        images.shape == (32, 64, 64, 3)
        and images.dtype == torch.uint8
        and labels.dtype == torch.int64
    )
    dm2 = ImageDataModule(shapes_small, batch_size=32, seed=1)
    dm2.setup()
    again, _ = next(iter(dm2.train_dataloader()))
    assert torch.equal(images, again)
    with pytest.raises(CvtLabError, match="larger than the 500 training images"):
        bad = ImageDataModule(shapes_small, batch_size=501)
        bad.setup()


def test_data_show_writes_a_png(shapes_small, tmp_path):
    out = tmp_path / "grid.png"
    r = run_cli_here("data", "show", str(shapes_small), "--n", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 400


def test_data_show_of_a_folder_without_split_folders_shows_its_one_split(tmp_path):
    root = tmp_path / "photos"
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(root / name / f"{i}.png")
    out = tmp_path / "grid.png"
    r = run_cli_here("data", "show", str(root), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).format == "PNG"
    # Its validation and test images are those a training run carves from it.
    out.unlink()
    r = run_cli_here("data", "show", str(root), "--split", "test", "--out", str(out))
    assert r.returncode == 0 and Image.open(out).format == "PNG", r.stderr
    r = run_cli_here("data", "show", str(root), "--split", "holdout", "--out", str(out))
    assert r.returncode == 2 and "no split 'holdout' (it has all)" in r.stderr


def test_tiff_gif_and_pnm_images_are_read_and_a_cache_that_skipped_them_is_rebuilt(
    tmp_path, monkeypatch
):
    from cvtlab.data import cache, decode

    def save(path, img, **kw):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        return path

    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    root = tmp_path / "f"
    save(root / "red" / "a.png", red)
    save(root / "red" / "b.tif", red)
    save(root / "red" / "c.tiff", red, compression="tiff_lzw")
    save(root / "red" / "d.gif", red, save_all=True, append_images=[blue])  # first frame red
    save(root / "red" / "e.ppm", red)
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))  # square: no crop
    save(root / "grey" / "a.png", Image.new("L", (40, 30), 128))
    save(root / "grey" / "b.tif", Image.fromarray(ramp))  # a 16-bit scan (I;16)
    save(root / "grey" / "c.pgm", Image.new("L", (40, 30), 128))
    (root / "grey" / "notes.txt").write_text("not an image")

    # The cvtlab before: five suffixes, and the cache format before.
    with monkeypatch.context() as m:
        m.setattr(decode, "IMAGE_SUFFIXES", (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
        m.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION - 1)
        assert open_decoded(root).splits == {"all": 2}

    d = open_decoded(root)
    assert d.built_now and d.splits == {"all": 8}
    reasons = {os.path.basename(s["file"]): s["reason"] for s in d.manifest["skipped"]}
    assert reasons == {"notes.txt": "not an image file ('.txt')"}
    rows = dict(zip(d.manifest["files"], d.images))
    for name in ("a.png", "b.tif", "c.tiff", "d.gif", "e.ppm"):
        assert (rows[f"red/{name}"].reshape(-1, 3).mean(0) == [255, 0, 0]).all(), name
    assert (rows["grey/c.pgm"] == 128).all()
    scan = rows["grey/b.tif"][..., 0].astype(int)  # the full 16-bit range, scaled to 8 bits
    assert scan.min() <= 5 and scan.max() >= 250 and (np.diff(scan, axis=1) >= 0).all()
    assert not open_decoded(root).built_now  # rebuilt once, not every time


def test_a_damaged_member_of_a_zip_is_skipped_alone(tmp_path, monkeypatch):
    """A member whose bytes no longer match its CRC (a bad download, a bad disk) is skipped
    with its reason, as an undecodable image is; the rest of the dataset decodes."""
    monkeypatch.setenv("CVTLAB_CACHE", str(tmp_path / "cache"))
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in ("cat/a.jpg", "cat/b.jpg", "dog/c.jpg", "dog/d.jpg"):
            zf.writestr(f"photos/{name}", _jpeg((10, 200, 10) if "cat" in name else (9, 9, 200)))
    raw = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("photos/cat/b.jpg")
    # The member's data starts after its 30-byte local header, its name and its extra field.
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200] ^= 0xFF
    z.write_bytes(bytes(raw))
    d = open_decoded(z)
    assert sum(d.splits.values()) == 3
    assert [s["file"].rsplit(":", 1)[-1] for s in d.manifest["skipped"]] == ["cat/b.jpg"]
    assert "damaged in the zip" in d.manifest["skipped"][0]["reason"]


def test_a_zip_made_on_macos_with_images_in_subfolders_of_their_class(tmp_path):
    """Finder's "Compress" adds a __MACOSX/ tree of resource forks named like the images, and
    .DS_Store files; people sort a class's photos into subfolders (by date, by source)."""
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for name in ("cat/a.png", "cat/2019/b.png", "cat/2019/june/c.png", "dog/d.png"):
            zf.writestr(f"photos/{name}", png.getvalue())
            folder, _, base = name.rpartition("/")
            zf.writestr(f"__MACOSX/photos/{folder}/._{base}", b"\x00\x05\x16\x07 resource fork")
        zf.writestr("photos/.DS_Store", b"\x00\x00\x00\x01Bud1")
        zf.writestr("photos/dog/.DS_Store", b"\x00\x00\x00\x01Bud1")
    index = load_index(z)
    assert _classes_and_items(index) == (
        ["cat", "dog"],
        [("cat/2019/b.png", 0), ("cat/2019/june/c.png", 0), ("cat/a.png", 0), ("dog/d.png", 1)],
    )
    assert index.skipped == []
    # With split folders, the class is the folder under the split.
    root = tmp_path / "splits"
    for name in ("train/cat/x/a.png", "train/dog/b.png", "test/cat/y/z/c.png", "test/dog/d.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png.getvalue())
    index = load_index(root)
    assert index.splits["train"] == [("train/cat/x/a.png", 0), ("train/dog/b.png", 1)]
    assert index.splits["test"] == [("test/cat/y/z/c.png", 0), ("test/dog/d.png", 1)]


def test_a_full_disk_is_one_line_before_decoding_and_a_killed_builds_folder_is_cleared(
    tmp_path, monkeypatch
):
    import errno

    from cvtlab.data import cache

    monkeypatch.setenv("CVTLAB_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "f", {"cats": {"a.jpg": _jpeg()}, "dogs": {"b.jpg": _jpeg()}})

    def disk_full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    decoded = []
    real_decode = cache._decode_chunk
    monkeypatch.setattr(cache, "_decode_chunk", lambda *a: decoded.append(1) or real_decode(*a))
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", disk_full)
        with pytest.raises(CvtLabError, match=r"decoded: no room for the decoded cache \(0 MiB"):
            open_decoded(root)
    assert not decoded  # stopped before decoding anything
    entries = tmp_path / "cache" / "decoded"
    assert [p.name for p in entries.iterdir() if not p.name.endswith(".lock")] == []
    # A build killed outright (SIGKILL, or SIGBUS on a full disk before this check) leaves its
    # folder; the next build of the entry clears it.
    orphan = entries / (cache._entry_dir(cache.open_source(root), 64).name + ".tmp-999999")
    (orphan / "images.npy").parent.mkdir()
    (orphan / "images.npy").write_bytes(b"\0" * 1000)
    d = open_decoded(root)
    assert d.splits == {"all": 2} and not orphan.exists()


def test_a_damaged_cache_entry_is_decoded_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CVTLAB_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "f", {"cats": {"a.jpg": _jpeg()}, "dogs": {"b.jpg": _jpeg()}})
    first = open_decoded(root)
    want = np.array(first.images)
    npy = first.root / "images.npy"
    for damage in (
        lambda: os.truncate(npy, 1000),  # a disk error cut the array short
        lambda: (first.root / "labels.npy").unlink(),
    ):
        damage()
        with caplog.at_level("WARNING", logger="cvtlab.data"):
            again = open_decoded(root)
        assert again.built_now and np.array_equal(again.images, want)
        assert "damaged" in caplog.text and "decoding the dataset again" in caplog.text
        caplog.clear()
    assert not open_decoded(root).built_now


def test_an_image_too_large_to_decode_safely_is_a_counted_skip(tmp_path, monkeypatch):
    """Pillow refuses images over its pixel limit (a warning up to twice it, an error beyond):
    a gigapixel scan among a folder's photos is skipped and named, not a crash mid-build."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # instead of a 100-MP file
    png = {}
    for name, side in (("small.png", 64), ("large.png", 120), ("huge.png", 200)):
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (0, 90, 0)).save(buf, format="PNG")
        png[name] = buf.getvalue()
    root = _folder(tmp_path / "f", {"a": png, "b": {"small.png": png["small.png"]}})
    d = open_decoded(root)
    assert d.splits == {"all": 2}
    reasons = {os.path.basename(s["file"]): s["reason"] for s in d.manifest["skipped"]}
    assert set(reasons) == {"large.png", "huge.png"}
    assert all(r.startswith("too large to decode (Image size (") for r in reasons.values())


def test_a_folder_of_links_to_class_folders(tmp_path):
    """A subset of a dataset is often made of links to its class folders; a link back up the
    tree is read once, not followed round."""
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 120)).save(png, format="PNG")
    full = _folder(
        tmp_path / "full",
        {c: {f"{i}.png": png.getvalue() for i in range(3)} for c in ("cat", "dog", "owl")},
    )
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "cat").symlink_to(full / "cat", target_is_directory=True)
    (subset / "dog").mkdir()
    (subset / "dog" / "0.png").symlink_to(full / "dog" / "0.png")
    (subset / "dog" / "again").symlink_to(subset, target_is_directory=True)
    assert _classes_and_items(load_index(subset)) == (
        ["cat", "dog"],
        [("cat/0.png", 0), ("cat/1.png", 0), ("cat/2.png", 0), ("dog/0.png", 1)],
    )


def test_a_cache_folder_that_cannot_be_made_is_one_error_naming_the_setting(
    shapes_small, tmp_path, monkeypatch
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CVTLAB_CACHE", str(blocker))
    with pytest.raises(CvtLabError, match=r"a-file/decoded: the decoded cache cannot be made"):
        open_decoded(shapes_small, 64)


def _noise_png(size=(300, 200), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return _png(Image.fromarray(pixels))


def test_crop_views_are_the_official_evaluations(tmp_path):
    """A crop of 0.875 is ImageNet's evaluation (shorter side to 256, centre 224); squash resizes
    the whole image; 1.0 is cvtlab's own view. Checked against Pillow's resize and crop."""
    from cvtlab.data.decode import crop_label, decode_image, parse_crop

    data = _noise_png()
    ref = Image.open(io.BytesIO(data)).convert("RGB")
    want = {
        1.0: ref.resize((336, 224), Image.BILINEAR).crop((56, 0, 280, 224)),
        0.875: ref.resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240)),
        "squash": ref.resize((224, 224), Image.BILINEAR),
    }
    for crop, image in want.items():
        got = decode_image(data, 224, crop)[0]
        assert np.abs(got.astype(int) - np.asarray(image).astype(int)).max() <= 1, crop
    assert not np.array_equal(decode_image(data, 224, 0.875)[0], decode_image(data, 224)[0])
    assert crop_label(0.875, 224) == "shorter side to 256, centre 224x224 (crop 0.875)"
    assert parse_crop("0.875") == 0.875 and parse_crop("Squash") == "squash"
    for bad in ("0", "1.5", "half", "-0.5", "nan"):
        with pytest.raises(CvtLabError, match=f"--crop must be a fraction.*{bad}"):
            parse_crop(bad)


def test_each_crop_is_a_cache_entry_of_its_own(tmp_path):
    root = _folder(
        tmp_path / "f", {"a": {"x.png": _noise_png(seed=1)}, "b": {"y.png": _noise_png(seed=2)}}
    )
    whole = open_decoded(root, 32)
    cropped = open_decoded(root, 32, crop=0.5)
    squashed = open_decoded(root, 32, crop="squash")
    assert len({whole.root, cropped.root, squashed.root}) == 3
    assert cropped.manifest["crop"] == 0.5 and "crop0.5" in cropped.root.name
    assert not np.array_equal(np.asarray(whole.images), np.asarray(cropped.images))
    # Opening one does not count the others as older copies to delete, and each is reused.
    for entry, crop in ((whole, 1.0), (cropped, 0.5), (squashed, "squash")):
        again = open_decoded(root, 32, crop=crop)
        assert again.root == entry.root and not again.built_now


def test_spawned_processes_open_the_cache_file_instead_of_copying_it(tmp_path):
    """DataLoader workers on macOS and Windows, and ddp_spawn, are spawned: what they are sent is
    pickled, and a pickled memory map is a full copy of the decoded images."""
    import pickle

    from torch.utils.data import DataLoader

    from cvtlab.data.datamodule import CachedImages, _keep_batch

    images = {f"{i}.png": _noise_png((64, 64), seed=i) for i in range(12)}
    root = _folder(tmp_path / "f", {"a": images, "b": images})
    d = open_decoded(root)
    rows = np.arange(24)[::-1].copy()
    for obj in (d, CachedImages(d, rows)):
        blob = pickle.dumps(obj)
        assert len(blob) < d.images.nbytes / 10
        assert np.array_equal(np.asarray(pickle.loads(blob).images), np.asarray(d.images))
    # A slice of the map is not the file: it travels as the copy it is.
    part = type(d)(d.root, d.images[3:5], d.labels[3:5], d.manifest)
    assert np.array_equal(pickle.loads(pickle.dumps(part)).images, d.images[3:5])
    loader = DataLoader(
        CachedImages(d, rows),
        batch_size=8,
        num_workers=1,
        multiprocessing_context="spawn",
        collate_fn=_keep_batch,
    )
    x, y = next(iter(loader))
    assert torch.equal(x, torch.from_numpy(np.asarray(d.images[rows[:8]])))
    assert torch.equal(y, torch.from_numpy(d.labels[rows[:8]]))


def test_decoding_without_fork_fallocate_or_flock(tmp_path, monkeypatch):
    """macOS has no posix_fallocate and spawns its workers; Windows has no fcntl either. The
    cache builds the same images there, and a disk without room is still one line up front."""
    from cvtlab.data import cache

    images = {f"{i}.png": _noise_png((80, 60), seed=i) for i in range(10)}
    root = _folder(tmp_path / "f", {"a": images, "b": images})
    monkeypatch.setenv("CVTLAB_CACHE", str(tmp_path / "forked"))
    want = np.asarray(open_decoded(root, 32, workers=1).images)
    monkeypatch.setenv("CVTLAB_CACHE", str(tmp_path / "spawned"))
    monkeypatch.setattr(cache, "_START_METHOD", "spawn")
    monkeypatch.setattr(cache, "_CHUNK", 4)
    monkeypatch.delattr(os, "posix_fallocate")
    monkeypatch.setattr(cache, "fcntl", None)
    d = open_decoded(root, 32, workers=2)
    assert d.built_now and np.array_equal(np.asarray(d.images), want)
    monkeypatch.setenv("CVTLAB_CACHE", str(tmp_path / "full"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 5))
    with pytest.raises(CvtLabError, match=r"no room for the decoded cache \(0 MiB needed, 0 MiB"):
        open_decoded(root, 32, workers=1)


def test_tiny_imagenet_above_its_size_is_kept_at_64_px_and_resized_per_batch(shapes_small):
    """A 224-px run on Tiny ImageNet (the fine-tuning recipe) decoded 16.9 GB of upscaled copies
    of its 64-px images; with upscale=False it reads the 64-px entry and resizes each batch, to
    the same pixels within 2 grey levels, for the whole image and for centre crops."""
    from cvtlab.data.augment import resize_images

    at64 = open_decoded(shapes_small, 64)
    kept = open_decoded(shapes_small, 128, upscale=False)
    assert kept.root == at64.root and kept.img_size == 64 and not kept.built_now
    upscaled = open_decoded(shapes_small, 128)  # the default still stores what it is asked
    assert upscaled.img_size == 128 and upscaled.images.shape[1:] == (128, 128, 3)
    resized = resize_images(torch.from_numpy(np.array(kept.images)), 128)
    assert resized.dtype == torch.uint8 and resized.shape == upscaled.images.shape
    diff = np.abs(resized.numpy().astype(int) - np.asarray(upscaled.images, dtype=int))
    assert diff.max() <= 2 and diff.mean() < 0.1
    # The data module hands out batches at the size asked unless told the model resizes them.
    for upscale, side in ((True, 128), (False, 64)):
        dm = ImageDataModule(str(shapes_small), img_size=128, batch_size=8, upscale=upscale)
        dm.setup()
        images, _ = next(iter(dm.train_dataloader()))
        assert images.shape == (8, side, side, 3)
    # `cvtlab data info` prepares, and names, the entry a run at that size uses.
    from cvtlab.data.commands import info

    assert info(str(shapes_small), 224)["cache_img_size"] == 64
    # Squashing a square image is its whole-image view: no entry of its own at its own size.
    assert open_decoded(shapes_small, 64, crop="squash", upscale=False).root == at64.root
    # A centre crop is the kept images resized to size / crop and cut (the official 0.875 at
    # 128 px: shorter side to 146, centre 128); at 56 px the resize is to 64, none at all.
    for size, within in ((128, 2), (56, 0)):
        assert open_decoded(shapes_small, size, crop=0.875, upscale=False).root == at64.root
        decoded = np.asarray(open_decoded(shapes_small, size, crop=0.875).images, dtype=int)
        resized = resize_images(torch.from_numpy(np.array(kept.images)), size, crop=0.875)
        assert resized.shape == decoded.shape
        assert np.abs(resized.numpy().astype(int) - decoded).max() <= within
    # Below its size it is decoded as asked.
    assert open_decoded(shapes_small, 32, upscale=False).img_size == 32
    assert open_decoded(shapes_small, 48, crop=0.875, upscale=False).img_size == 48


def test_resizing_through_float_for_gpus_matches_pillow():
    """CUDA resizes uint8 batches through float: the same pixels as Pillow, to a grey level."""
    from cvtlab.data.augment import _resize_through_float

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    for size in (96, 224):
        want = np.stack(
            [np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in small]
        )
        got = _resize_through_float(torch.from_numpy(small).permute(0, 3, 1, 2), size)
        got = got.permute(0, 2, 3, 1).numpy()
        assert got.dtype == np.uint8 and np.abs(got.astype(int) - want).max() <= 1


def test_a_tiny_imagenet_layout_with_other_image_sizes_is_decoded_at_the_size_asked(tmp_path):
    src = make_synthetic_tiny_imagenet(
        tmp_path / "odd", train_per_class=3, val_per_class=1, test_images=1, classes=2
    )
    first = next((src / "train").rglob("*.JPEG"))
    Image.open(first).resize((80, 60)).save(first)
    d = open_decoded(src, 96, upscale=False)
    assert d.img_size == 96 and d.images.shape[1:] == (96, 96, 3)


def test_an_image_folder_of_small_squares_is_kept_at_their_size(tmp_path, monkeypatch):
    """A CIFAR-like folder (32x32 images) for a 96-px model is kept at 32 px, learnt from the
    images' headers once; photos, or squares of mixed sizes, are decoded at the size asked."""
    import cvtlab.data.cache as cache
    from cvtlab.data.augment import resize_images

    squares = {
        c: {f"{i}.png": _noise_png((32, 32), 10 * k + i) for i in range(3)}
        for k, c in enumerate("ab")
    }
    root = _folder(tmp_path / "small", squares)
    kept = open_decoded(root, 96, upscale=False)
    assert kept.img_size == 32 and kept.root == open_decoded(root, 32).root
    upscaled = np.asarray(open_decoded(root, 96).images, dtype=int)
    resized = resize_images(torch.from_numpy(np.array(kept.images)), 96).numpy()
    assert np.abs(resized.astype(int) - upscaled).max() <= 2
    # The headers are read once; a changed folder is read again.
    monkeypatch.setattr(cache, "_side_from_headers", lambda source: pytest.fail("read again"))
    assert open_decoded(root, 64, upscale=False).img_size == 32
    monkeypatch.undo()
    (root / "b" / "big.png").write_bytes(_noise_png((40, 40), 99))
    assert open_decoded(root, 96, upscale=False).img_size == 96
    photos = {"a": {"x.png": _noise_png(seed=1)}, "b": {"y.png": _noise_png(seed=2)}}
    assert open_decoded(_folder(tmp_path / "f", photos), 96, upscale=False).img_size == 96

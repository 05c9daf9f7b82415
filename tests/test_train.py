"""The workflow end to end: train → eval → predict → export, kill and resume, DDP, bad input."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image

import cvtlab

from .conftest import run_cli, run_cli_here

FAST = [
    "--model",
    "cvt_seed",
    "--batch-size",
    "50",
    "--accelerator",
    "cpu",
    "--devices",
    "1",
    "--logger",
    "csv",
]


RUN_LAYOUT = [
    "config.yaml",
    "checkpoints/last.ckpt",
    "checkpoints/best.ckpt",
    "metrics.csv",
    "metrics.json",
    "report/curves.png",
    "report/test_predictions.png",
    "report/confused_pairs.png",
    "report/per_class_accuracy.json",
]


def recipe(tmp_path, **extra):
    data = {
        "lr": 8.0e-3,
        "warmup_epochs": 0.5,
        "ckpt_every_n_steps": 4,
        "augment": {"auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "random_erase": 0.0},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def trained(shapes_small, tmp_path_factory):
    """One short real run shared by the eval/predict/export tests (in this process, so that
    their exact comparisons with it never depend on two processes' thread counts)."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "run"
    r = run_cli_here(
        "train",
        "--config",
        recipe(tmp),
        "--data",
        str(shapes_small),
        "--epochs",
        "3",
        "--out",
        str(out),
        *FAST,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_run_folder_layout_and_metrics(trained):
    out, r = trained
    for rel in RUN_LAYOUT:
        assert (out / rel).is_file(), rel
    m = json.loads((out / "metrics.json").read_text())
    for key in ("val_top1", "val_top5", "test_top1", "test_top5"):
        assert 0.0 <= m[key] <= 1.0
    assert m["epochs"] == 3 and m["steps"] == 30 and m["train_images_per_second"] > 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["train_images"]) for row in rows] == [500, 500, 500]  # 10 batches of 50
    assert m["train_images"] == 1500
    # What the figures were measured on, for anyone comparing or publishing them.
    assert (
        m["machine"]["torch"] == torch.__version__ and m["machine"]["cvtlab"] == cvtlab.__version__
    )
    assert m["machine"]["cores"] >= 1 and m["machine"]["cpu"]
    assert ("gpu" in m["machine"]) == torch.cuda.is_available()
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,step,lr")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "cvt_seed" and saved["epochs"] == 3 and saved["lr"] == 8.0e-3
    assert "test top-1" in r.stdout and "top-5" in r.stdout and m["num_classes"] == 10
    # Written to anything but a terminal, progress is one readable line per epoch, not a redrawn
    # bar (a pipe: test_ddp_on_two_cpu_processes).
    lines = [line for line in r.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in lines] == ["epoch 0/2", "epoch 1/2", "epoch 2/2"]
    for line, row in zip(lines, csv.DictReader(rows)):
        assert f"step {row['step']}" in line and f"val top-1 {float(row['val_top1']):.4f}" in line
    assert "\r" not in r.stdout + r.stderr


def test_progress_lines_within_a_long_epoch(shapes_small, tmp_path, monkeypatch, capsys):
    from cvtlab.train import run as run_module
    from cvtlab.train.config import make_config
    from cvtlab.train.progress import ProgressLines, progress_callback

    assert type(progress_callback(None, interactive=True)).__name__ == "TQDMProgressBar"
    # Every step counts as long past the last line: each gets one.
    monkeypatch.setattr(
        run_module, "progress_callback", lambda h, budget: ProgressLines(h, 0.0, budget)
    )
    cfg = make_config(
        recipe(tmp_path, limit_train_batches=3, ckpt_every_n_steps=0),
        data=str(shapes_small),
        out=str(tmp_path / "run"),
        model="cvt_seed",
        epochs=2,
        batch_size=50,
        accelerator="cpu",
        precision="32",
        max_minutes=5,
    )
    run_module.train(cfg)
    out = capsys.readouterr().out.splitlines()
    steps = [line.split("  ")[:2] for line in out if "img/s" in line and "val top-1" not in line]
    assert steps == [["epoch 0/1", f"step {i} (batch {i}/3)"] for i in (1, 2, 3)] + [
        ["epoch 1/1", f"step {3 + i} (batch {i}/3)"] for i in (1, 2, 3)
    ]
    assert sum(line.startswith("epoch ") and "val top-1" in line for line in out) == 2
    assert all(line.endswith(" of 5m00s") for line in out if line.startswith("epoch "))


@pytest.mark.skipif(
    shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler"
)
def test_a_compiled_run_trains_and_saves_weights_that_load_uncompiled(shapes_small, tmp_path):
    out = tmp_path / "run"
    r = run_cli_here(
        "train",
        "--config",
        recipe(tmp_path, limit_train_batches=2, ckpt_every_n_steps=0),
        "--data",
        str(shapes_small),
        "--epochs",
        "1",
        "--compile",
        "--out",
        str(out),
        *FAST,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and not any("_orig_mod" in key for key in state)
    r = run_cli_here("eval", "--checkpoint", str(out), "--format", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["top1"] == pytest.approx(m["test_top1"], abs=0.011)


def test_eval_reproduces_the_runs_test_top1(trained):
    out, _ = trained
    m = json.loads((out / "metrics.json").read_text())
    # The run folder stands for the checkpoint the run tested (here the best-validating one).
    r = run_cli_here("eval", "--checkpoint", str(out), "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    e = json.loads(r.stdout)
    assert e["n"] == 100 and e["split"] == "test"
    assert e["top1"] == m["test_top1"] and e["top5"] == m["test_top5"]
    assert e["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert e["machine"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        r = run_cli_here("eval", "--checkpoint", str(out), "--device", "cuda")
        assert r.returncode == 2 and "--device cuda: PyTorch sees no CUDA GPU" in r.stderr
    assert len(e["per_class"]) == 10 and all(0 <= v <= 1 for v in e["per_class"].values())


def test_eval_on_data_with_other_classes_is_refused(trained, shapes_small, tmp_path):
    """Ten classes, but not the checkpoint's: scoring them would report a wrong accuracy."""
    out, _ = trained
    other = tmp_path / "other"
    shutil.copytree(shapes_small, other)
    words = (other / "words.txt").read_text().replace("\tsquare\n", "\tsquircle\n")
    (other / "words.txt").write_text(words)
    r = run_cli_here("eval", "--checkpoint", str(out), "--data", str(other))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "classes the checkpoint does not predict: 'squircle'" in r.stderr


def test_eval_matches_classes_by_name_on_a_held_out_set_with_some_of_them(trained, tmp_path):
    """A folder of one's own with three of the model's ten classes, in another order: each
    image is scored against the model's output for its class's name."""
    from cvtlab.inference import load_predictor

    out, _ = trained
    predictor = load_predictor(out)
    folder = tmp_path / "mine"
    picked = predictor.class_names[7], predictor.class_names[2], predictor.class_names[5]
    rng = np.random.default_rng(0)
    for name in picked:
        (folder / name).mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(folder / name / f"{i}.png")
    r = run_cli_here(
        "eval", "--checkpoint", str(out), "--data", str(folder), "--split", "all", "--format",
        "json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout)
    assert scored["n"] == 12 and scored["num_classes"] == 10
    lo, hi = scored["top1_ci95"]
    assert lo <= scored["top1"] <= hi
    assert set(scored["per_class"]) == set(picked)
    # The same figures by hand: the model's predictions against its own indices for the names.
    from cvtlab.data.cache import open_decoded

    decoded = open_decoded(folder, 64)
    want = [predictor.class_names.index(decoded.class_names[y]) for y in decoded.labels]
    probs = predictor.probabilities(np.asarray(decoded.images))
    hits = (probs.argmax(-1).numpy() == np.array(want)).astype(float)
    assert scored["top1"] == pytest.approx(hits.mean())
    for name in picked:
        mine = [h for h, y in zip(hits, decoded.labels) if decoded.class_names[y] == name]
        assert scored["per_class"][name] == pytest.approx(np.mean(mine))


def test_eval_on_every_labelled_image_of_a_dataset(trained, shapes_small):
    """--split all scores a held-out set of one's own whole, not the share that training would
    have carved from it for testing."""
    out, _ = trained
    r = run_cli_here("eval", "--checkpoint", str(out), "--split", "all", "--format", "json")
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout)
    # 60 training and 10 labelled val images in each of 10 classes; the test images are
    # unlabelled.
    assert scored["split"] == "all" and scored["n"] == 700
    test = json.loads(run_cli_here("eval", "--checkpoint", str(out), "--format", "json").stdout)
    assert test["n"] == 100  # the default: the test split alone


@pytest.mark.parametrize(
    "args, flag",
    [
        (["eval", "--batch-size", "0"], "--batch-size"),
        (["predict", "--topk", "0", "x.png"], "--topk"),
        (["predict", "--topk", "five", "x.png"], "--topk"),
        (["predict", "--batch-size", "0", "x.png"], "--batch-size"),
    ],
)
def test_eval_and_predict_counts_are_checked_in_one_line(trained, args, flag):
    out, _ = trained
    r = run_cli_here(args[0], "--checkpoint", str(out), *args[1:])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"argument {flag}: must be a whole number of at least 1" in r.stderr


def test_weights_without_class_names_are_evaluated_predicted_and_exported(
    trained, shapes_small, tmp_path
):
    """An export without class names (as official weights come) is scored on any data with as
    many classes, predicts numbered classes, and its re-export claims no names."""
    from cvtlab.evaluation import evaluate
    from cvtlab.inference import load_predictor
    from cvtlab.prediction import predict

    out, _ = trained
    nameless = tmp_path / "nameless.safetensors"
    cvtlab.save_weights(cvtlab.create_model("cvt_seed", num_classes=10), nameless)
    predictor = load_predictor(nameless)
    assert not predictor.names_known and predictor.class_names == [str(i) for i in range(10)]
    e = evaluate(str(nameless), str(shapes_small), batch_size=64, device="cpu")
    # Output i scores the data's class i; the per-class figures take the data's names.
    assert e["n"] == 100 and len(e["per_class"]) == 10 and "disc" in e["per_class"]
    image = shapes_small / "test" / "images" / "test_0.JPEG"
    [r] = predict(str(nameless), [str(image)], topk=10, device="cpu")
    assert sorted(p["class"] for p in r["predictions"]) == sorted(predictor.class_names)
    again = tmp_path / "again.safetensors"
    assert (
        run_cli_here(
            "export", "--checkpoint", str(nameless), "--format", "safetensors", "--out", str(again)
        ).returncode
        == 0
    )
    assert getattr(cvtlab.from_pretrained(again), "class_names", None) is None
    # Named weights keep their names through the same path.
    assert load_predictor(out).names_known
    # The Python API checks its counts as the command line does.
    for call in (
        lambda: evaluate(str(out), batch_size=0),
        lambda: predict(str(out), [str(image)], batch_size=0),
        lambda: predict(str(out), [str(image)], topk=0),
        lambda: predict(str(out), [str(image)], device="tpu"),
    ):
        with pytest.raises(cvtlab.CvtLabError, match="--batch-size|--topk|--device"):
            call()


def test_out_paths_that_cannot_be_written_are_one_line(trained, shapes_small, tmp_path):
    out, _ = trained
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = [
        (["export", "--format", "onnx", "--out", str(tmp_path)], "is a folder; name the file"),
        (["export", "--format", "safetensors", "--out", str(a_file / "m.st")], "is a file"),
        (["export", "--out", str(tmp_path / "m.pt")], "name a .safetensors or .onnx file"),
        (["train", "--data", str(shapes_small), "--out", str(a_file)], "run folder must be a"),
        (["train", "--data", str(shapes_small), "--out", str(a_file / "run")], "is a file"),
    ]
    for args, words in cases:
        if args[0] == "export":
            args = [args[0], "--checkpoint", str(out), *args[1:]]
        r = run_cli_here(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr and str(a_file if "train" in args else tmp_path) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing left behind


def test_ema_run_validates_tests_and_serves_the_averaged_weights(
    shapes_small, tmp_path, monkeypatch
):
    """--ema-decay keeps an EMA of the weights: validation reports both, the test and every
    later command use the EMA; the recipe flags land in the run's config."""
    from safetensors.torch import load_file

    from cvtlab.inference import load_predictor

    out = tmp_path / "ema"
    flags = ["--ema-decay", "0.9", "--weight-decay", "0.01", "--label-smoothing", "0.05"]
    flags += ["--ema-warmup-power", "1", "--ema-warmup-gamma", "2"]
    r = run_cli_here(
        "train", "--config", recipe(tmp_path), "--data", str(shapes_small), "--epochs", "2",
        "--out", str(out), "--warmup-epochs", "0.25", *flags, *FAST,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    keys = ("ema_decay", "weight_decay", "label_smoothing", "warmup_epochs")
    assert [saved[k] for k in keys] == [0.9, 0.01, 0.05, 0.25]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_top1" in header and "val_top1_raw" in header

    assert (saved["ema_warmup_power"], saved["ema_warmup_gamma"]) == (1.0, 2.0)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert (hparams["ema_warmup_power"], hparams["ema_warmup_gamma"]) == (1.0, 2.0)
    state = ckpt["state_dict"]
    ema = {k[len("ema.module.") :]: v for k, v in state.items() if k.startswith("ema.module.")}
    raw = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())

    served = load_predictor(out / "checkpoints" / "last.ckpt").model.state_dict()
    assert all(torch.equal(served[k], ema[k]) for k in served)
    # Loaded as weights (for fine-tuning, --pretrained), the run folder and its checkpoint give
    # the EMA too: the model its test scored.
    from cvtlab.inference import resolve_checkpoint

    for source in (out, out / "checkpoints" / "last.ckpt"):
        sd = torch.load(resolve_checkpoint(source), map_location="cpu", weights_only=True)
        want = {k[11:]: v for k, v in sd["state_dict"].items() if k.startswith("ema.module.")}
        loaded = cvtlab.from_pretrained(source).state_dict()
        assert loaded.keys() == want.keys()
        assert all(torch.equal(loaded[k], want[k]) for k in loaded)
    assert run_cli_here(
        "export", "--checkpoint", str(out / "checkpoints" / "last.ckpt"), "--format",
        "safetensors", "--out", str(tmp_path / "ema.safetensors"),
    ).returncode == 0  # fmt: skip
    exported = load_file(str(tmp_path / "ema.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in exported)

    # The report's curves show validation of both the EMA and the trained weights.
    from cvtlab import report

    drawn = {}

    def keep(fig, path):
        drawn["labels"] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
        return path

    with open(out / "metrics.csv", newline="") as f:
        rows = [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]
    monkeypatch.setattr(report, "_save", keep)
    report.curves(rows, tmp_path / "curves.png")
    assert "validation top-1 (EMA)" in drawn["labels"]
    assert "validation top-1 (trained weights)" in drawn["labels"]


def test_curves_count_whole_epochs_and_leave_out_a_top5_that_cannot_miss(monkeypatch, tmp_path):
    from cvtlab import report

    drawn = {}

    def keep(fig, path):
        drawn["labels"] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
        fig.canvas.draw()
        drawn["ticks"] = [t for ax in fig.axes for t in ax.get_xticks()]
        return path

    monkeypatch.setattr(report, "_save", keep)
    rows = [
        {"epoch": e, "train_loss_epoch": 1.0 - e / 4, "val_loss": 0.9 - e / 4,
         "train_top1": 0.4 + e / 10, "val_top1": 0.5 + e / 10, "val_top5": 1.0}
        for e in range(2)
    ]  # fmt: skip
    report.curves(rows, tmp_path / "c.png", num_classes=3)
    assert "validation top-5" not in drawn["labels"] and "validation top-1" in drawn["labels"]
    assert drawn["ticks"] and all(float(t).is_integer() for t in drawn["ticks"])
    report.curves(rows, tmp_path / "c.png", num_classes=200)
    assert "validation top-5" in drawn["labels"]


def test_class_names_no_font_draws_are_named_in_one_warning(tmp_path, caplog):
    """Matplotlib warns twice per missing character and figure; the report names them once."""
    from cvtlab import report

    odd = "\U0010fffd"  # a private-use character: no font draws it
    names = [f"cat{odd}", "dog"]
    images = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2):
            report.sample_grid(images, labels, names, path=tmp_path / f"g{i}.png", predicted=labels)
        report.warn_missing_glyphs("the report")
        report.warn_missing_glyphs("the report")  # nothing new since the last call
    assert not [w for w in caught if "Glyph" in str(w.message)]
    named = [r.getMessage() for r in caplog.records if r.name == "cvtlab.report"]
    assert named == [
        f"the report: no installed font draws {odd}; those characters show as boxes in the plots"
    ]


@pytest.mark.skipif(
    shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler"
)
def test_compiled_inference_matches_eager_at_any_batch_and_freezes_the_weights(trained):
    from cvtlab.inference import CompiledForInference, load_predictor

    out, _ = trained
    model = load_predictor(out).model.eval()
    compiled = CompiledForInference(model, batch_size=8)
    x = torch.randn(19, 3, 64, 64)
    with torch.inference_mode():
        eager = model(x)
        # Smaller batches are padded and larger ones split: one compiled shape serves them all.
        for n in (8, 5, 19):
            torch.testing.assert_close(compiled(x[:n]), eager[:n], atol=2e-4, rtol=1e-4)
        # Frozen (what makes it fast): weights were folded and packed into constants at the
        # first call, so the compiled code no longer computes what the changed model does.
        for p in model.parameters():
            p.mul_(0.5)
        changed = model(x[:8])
        assert not torch.allclose(changed, eager[:8], atol=1e-2)
        assert not torch.allclose(compiled(x[:8]), changed, atol=1e-2)

    # `cvtlab eval --compile` scores what the eager model scores.
    eval_args = ["eval", "--checkpoint", str(out), "--format", "json"]
    runs = [run_cli_here(*eval_args, *extra) for extra in ([], ["--compile"])]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    plain, fast = (json.loads(r.stdout) for r in runs)
    assert fast["compiled"] and not plain["compiled"]
    assert abs(fast["top1"] - plain["top1"]) <= 1 / plain["n"]


def test_eval_in_bf16_keeps_the_accuracy(trained):
    out, _ = trained
    ckpt = str(out / "checkpoints" / "best.ckpt")
    r = run_cli_here("eval", "--checkpoint", ckpt, "--precision", "bf16", "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    e = json.loads(r.stdout)
    m = json.loads((out / "metrics.json").read_text())
    assert e["precision"] == "bf16" and abs(e["top1"] - m["test_top1"]) <= 0.02
    auto = run_cli_here("eval", "--checkpoint", ckpt, "--precision", "auto", "--format", "json")
    assert auto.returncode == 0, auto.stderr[-2000:]
    a = json.loads(auto.stdout)  # names what `auto` chose on this CPU
    assert a["precision"] in ("32", "bf16") and abs(a["top1"] - m["test_top1"]) <= 0.02
    bad = run_cli_here("eval", "--checkpoint", ckpt, "--precision", "fp8")
    assert bad.returncode != 0 and "--precision must be 32, bf16 or auto, not 'fp8'" in bad.stderr


def test_flip_averaged_eval_is_mirror_invariant_and_keeps_the_accuracy(
    trained, shapes_small, tmp_path
):
    """--flip scores an image and its mirror image the same, with or without --shift, and
    stays near the plain top-1."""
    from cvtlab.inference import load_predictor, view_averaged

    out, _ = trained
    ckpt = str(out / "checkpoints" / "best.ckpt")
    model = load_predictor(ckpt).model
    x = torch.randn(6, 3, 64, 64)
    with torch.inference_mode():
        plain, mirrored = model(x), model(x.flip(-1))
        assert not torch.allclose(plain, mirrored, atol=1e-4)  # the model alone is not symmetric
        for shift in (0, 2):
            averaged = view_averaged(model, x, flip=True, shift=shift)
            torch.testing.assert_close(averaged, view_averaged(model, x.flip(-1), True, shift))
            assert torch.allclose(averaged.exp().sum(-1), torch.ones(6))
        torch.testing.assert_close(view_averaged(model, x), plain.log_softmax(-1))
    m = json.loads((out / "metrics.json").read_text())
    for flags in (["--flip"], ["--flip", "--shift", "2"]):
        r = run_cli_here("eval", "--checkpoint", ckpt, *flags, "--format", "json")
        assert r.returncode == 0, r.stderr[-2000:]
        e = json.loads(r.stdout)
        assert e["flip"] is True and e["shift"] == (2 if "--shift" in flags else 0)
        assert e["n"] == 100 and abs(e["top1"] - m["test_top1"]) <= 0.1
    for bad in ("-1", "64"):
        r = run_cli_here("eval", "--checkpoint", ckpt, "--shift", bad)
        assert r.returncode != 0 and f"--shift must be from 0 to 63 pixels, not {bad}" in r.stderr
    # predict --flip: an image file and its mirrored copy get the same classes and probabilities
    sample = shapes_small / "test" / "images" / "test_1.JPEG"
    mirrored = tmp_path / "mirrored.png"
    Image.open(sample).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    outs = [
        run_cli_here("predict", "--checkpoint", ckpt, str(f), *flag, "--format", "json")
        for flag in ([], ["--flip"], ["--flip", "--shift", "3"])
        for f in (sample, mirrored)
    ]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    plain, plain_m, *averaged = [json.loads(r.stdout)[0]["predictions"] for r in outs]
    assert plain != plain_m
    for flip, flip_m in (averaged[:2], averaged[2:]):
        assert [p["class"] for p in flip] == [p["class"] for p in flip_m]
        for a, b in zip(flip, flip_m):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    assert averaged[0] != averaged[2]  # the shifted views count


def test_a_run_is_evaluated_at_another_size_and_crop(trained):
    """--img-size runs a run's weights at another multiple of its stride, --crop takes the centre
    of each image (a view of its own in the cache); the text output names a view not the run's."""
    out, _ = trained
    ckpt = str(out / "checkpoints" / "best.ckpt")
    runs = {
        flags: run_cli_here("eval", "--checkpoint", ckpt, *flags, "--format", "json")
        for flags in ((), ("--img-size", "96", "--crop", "0.875"))
    }
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    own, other = (json.loads(r.stdout) for r in runs.values())
    assert (own["img_size"], own["crop"]) == (64, 1.0)
    assert (other["img_size"], other["crop"], other["n"]) == (96, 0.875, own["n"])
    assert other["loss"] != own["loss"]
    # The view is made per batch from the 64-px images: Pillow's own decoding at 96 px, centre
    # 0.875, scores the same to rounding.
    import torch.nn.functional as F

    from cvtlab.data.augment import normalize
    from cvtlab.data.cache import open_decoded
    from cvtlab.data.splits import plan_splits
    from cvtlab.inference import load_predictor

    seen = open_decoded(json.loads(runs[()].stdout)["data"], 96, crop=0.875)
    rows = plan_splits(seen, 10, 0)["test"]
    model = load_predictor(ckpt, 96, 0.875).model.eval()
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(np.array(seen.images[rows]))))
    loss = F.cross_entropy(logits, torch.from_numpy(seen.labels[rows])).item()
    # (The short run's model is near chance, so a view that is not the same moves its loss by
    # only 1e-4; the same view at rounding moves it by 1e-6.)
    assert other["loss"] == pytest.approx(loss, rel=2e-5)
    r = run_cli_here("eval", "--checkpoint", ckpt, "--crop", "squash")
    assert r.returncode == 0 and r.stdout.startswith("images: whole image resized to 64x64\n")


def test_shifted_views_move_the_image_and_reflect_its_border():
    """--shift s: the views are the image moved s pixels each way, the uncovered border filled
    as training's reflection-padded crops fill it."""
    from cvtlab.inference import view_averaged

    seen: list[torch.Tensor] = []

    def recorder(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.clone())
        return torch.zeros(len(v), 5)

    x, s = torch.randn(2, 3, 9, 11), 2
    out = view_averaged(recorder, x, flip=True, shift=s)
    torch.testing.assert_close(out.exp(), torch.full((2, 5), 0.2))
    assert len(seen) == 10 and all(v.shape == x.shape for v in seen)
    assert torch.equal(seen[0], x) and torch.equal(seen[1], x.flip(-1))
    for image, views in ((x, seen[2:6]), (x.flip(-1), seen[6:])):
        down, up, right, left = views
        assert torch.equal(down[..., s:, :], image[..., :-s, :])
        assert torch.equal(down[..., :s, :], image[..., 1 : s + 1, :].flip(-2))
        assert torch.equal(up[..., :-s, :], image[..., s:, :])
        assert torch.equal(right[..., s:], image[..., :-s])
        assert torch.equal(left[..., :-s], image[..., s:])
        assert torch.equal(left[..., -s:], image[..., -s - 1 : -1].flip(-1))


def test_predict_any_image_and_skip_a_broken_one(trained, shapes_small, tmp_path):
    out, _ = trained
    odd = tmp_path / "odd.png"
    Image.new("RGBA", (100, 37), (200, 30, 30, 128)).save(odd)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    sample = shapes_small / "test" / "images" / "test_0.JPEG"
    r = run_cli_here(
        "predict",
        "--checkpoint",
        str(out / "checkpoints" / "best.ckpt"),
        str(sample),
        str(odd),
        str(broken),
        "--topk",
        "3",
        "--format",
        "json",
    )
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [len(x.get("predictions", [])) for x in results] == [3, 3, 0]
    names = {
        "disc",
        "square",
        "triangle",
        "ring",
        "cross",
        "horizontal stripes",
        "vertical stripes",
        "checkerboard",
        "polka dots",
        "diagonal stripes",
    }
    for res in results[:2]:
        probs = [p["probability"] for p in res["predictions"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
        assert {p["class"] for p in res["predictions"]} <= names
    assert "broken.jpg" in results[2]["error"]
    assert "1 of 3 images could not be read" in r.stderr
    # As text, the skipped image's line names it once.
    r = run_cli_here("predict", "--checkpoint", str(out), str(broken))
    assert r.returncode == 1
    assert r.stdout.startswith(f"{broken}: skipped (") and r.stdout.count(str(broken)) == 1, (
        r.stdout
    )


def test_predict_a_folder_of_images_and_an_empty_folder(trained, shapes_small, tmp_path):
    """A folder stands for its images (subfolders too, sorted); other files and hidden ones are
    passed over, and a folder without images is reported like an unreadable image."""
    out, _ = trained
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    images = shapes_small / "test" / "images"
    shutil.copy(images / "test_0.JPEG", photos / "b.JPEG")
    Image.open(images / "test_1.JPEG").save(photos / "more" / "a.png")
    (photos / "notes.txt").write_text("not an image")
    (photos / "._b.JPEG").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata, not a photo
    (photos / ".thumbnails").mkdir()
    shutil.copy(images / "test_0.JPEG", photos / ".thumbnails" / "b.JPEG")
    (tmp_path / "empty").mkdir()
    r = run_cli_here(
        "predict",
        "--checkpoint",
        str(out),
        str(photos),
        str(tmp_path / "empty"),
        "--format",
        "json",
        "--device",
        "cpu",
    )
    results = json.loads(r.stdout)
    assert [x["image"] for x in results] == [
        str(photos / "b.JPEG"),
        str(photos / "more" / "a.png"),
        str(tmp_path / "empty"),
    ]
    assert [len(x.get("predictions", [])) for x in results] == [5, 5, 0]
    assert "a folder without images" in results[2]["error"]
    assert "1 of 3 images could not be read" in r.stderr
    # Images are predicted in batches: the same answers as one at a time.
    from cvtlab.prediction import predict

    one_by_one = predict(str(out), [str(photos)], batch_size=1)
    for a, b in zip(results, one_by_one):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"]):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)


def test_predict_the_images_in_a_zip_or_in_a_folder_of_one(trained, shapes_small, tmp_path):
    """``photos.zip`` stands for the images in it and ``photos.zip:photos/more`` for those under
    that folder, named by their path in the zip; macOS clutter and other files are passed over,
    a damaged image is reported alone, and the answers are the same as from the files."""
    import zipfile

    out, _ = trained
    images = shapes_small / "test" / "images"
    first, second = (images / "test_0.JPEG").read_bytes(), (images / "test_1.JPEG").read_bytes()
    photos = tmp_path / "photos.zip"
    with zipfile.ZipFile(photos, "w") as zf:
        zf.writestr("photos/b.JPEG", first)
        zf.writestr("photos/more/a.jpg", second)
        zf.writestr("photos/more/broken.jpg", b"\xff\xd8 not really")
        zf.writestr("photos/notes.txt", "not an image")
        zf.writestr("__MACOSX/photos/._b.JPEG", b"\x00\x05\x16\x07")
    r = run_cli_here(
        "predict",
        "--checkpoint",
        str(out),
        str(photos),
        f"{photos}:photos/more/",
        f"{photos}:photos/elsewhere",
        "--format",
        "json",
        "--device",
        "cpu",
    )
    results = json.loads(r.stdout)
    named = [f"{photos}:photos/{n}" for n in ("b.JPEG", "more/a.jpg", "more/broken.jpg")]
    assert [x["image"] for x in results] == [*named, *named[1:], f"{photos}:photos/elsewhere"]
    assert [len(x.get("predictions", [])) for x in results] == [5, 5, 0, 5, 0, 0]
    assert named[2] in results[2]["error"]
    assert "no images under photos/elsewhere in the zip" in results[5]["error"]
    assert "3 of 6 images could not be read" in r.stderr
    from cvtlab.prediction import predict

    files = predict(str(out), [str(images / "test_0.JPEG"), str(images / "test_1.JPEG")])
    for a, b in zip(results[:2], files):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
    # Not a zip after all: one line for it, the others still predicted.
    fake = tmp_path / "fake.zip"
    fake.write_text("not a zip")
    results = predict(str(out), [str(fake), str(images / "test_0.JPEG")])
    assert "not a readable zip file" in results[0]["error"] and "predictions" in results[1]


def test_compare_puts_runs_side_by_side_and_names_the_settings_that_differ(trained, tmp_path):
    """A finished run against one still going, with two settings changed: the figures of each,
    the curves, and exactly the settings that differ."""
    out, _ = trained
    other = tmp_path / "other" / "run"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("checkpoints", "report", "logs"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    decay, flip = cfg["weight_decay"], cfg["augment"]["flip"]
    cfg["weight_decay"], cfg["augment"]["flip"] = decay + 0.1, not flip
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    (other / "metrics.json").unlink()  # no test yet: still training, or stopped
    rows = (other / "metrics.csv").read_text().splitlines()
    (other / "metrics.csv").write_text("\n".join(rows[:3]) + "\n")  # two epochs logged

    plot = tmp_path / "curves.png"
    r = run_cli_here("compare", str(out), str(other), "--plot", str(plot), "--format", "json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    finished, going = result["runs"]
    m = json.loads((out / "metrics.json").read_text())
    assert finished["finished"] and finished["test_top1"] == m["test_top1"]
    assert (finished["epochs"], finished["steps"]) == (3, 30)
    assert finished["machine"] == m["machine"] and finished["precision"] == m["precision"]
    assert not going["finished"] and going["test_top1"] is None
    assert (going["epochs"], going["steps"]) == (2, 20)
    assert going["val_top1"] == max(row["val_top1"] for row in going["history"])
    assert finished["run"] != going["run"] and going["run"].endswith("other/run")
    assert finished["test_top5"] == m["test_top5"]
    assert result["differences"] == {
        "augment.flip": {finished["run"]: flip, going["run"]: not flip},
        "weight_decay": {finished["run"]: decay, going["run"]: decay + 0.1},
    }
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = run_cli_here("compare", str(out), str(other))
    assert r.returncode == 0, r.stderr
    assert f"{100 * m['test_top1']:.2f}%" in r.stdout and "(running or stopped)" in r.stdout
    assert "settings that differ:" in r.stdout and f"weight_decay: {finished['run']}: " in r.stdout

    # A run of four classes: its top-5 is trivially 100%, so there is none to show.
    few = tmp_path / "few"
    shutil.copytree(out, few, ignore=shutil.ignore_patterns("checkpoints", "report", "logs"))
    (few / "metrics.json").write_text(json.dumps(m | {"num_classes": 4}))
    r = run_cli_here("compare", str(few), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runs"][0]["test_top5"] is None


def test_compare_refuses_what_is_not_a_run_in_one_line(trained, tmp_path):
    out, _ = trained
    r = run_cli_here("compare", str(out), str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path}: not a cvtlab run folder" in r.stderr
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("checkpoints", "report", "logs"))
    (broken / "metrics.csv").write_text("epoch,step\nfirst,10\n")
    r = run_cli_here("compare", str(out), str(broken))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{broken / 'metrics.csv'}: not a metrics.csv cvtlab wrote" in r.stderr


def test_a_runs_speed_is_its_images_over_its_training_time():
    """With progressive resizing the epochs run at very different speeds: the run's figure is
    all its images over all the seconds they took, not the median epoch (which no stretch of
    the run ran at). Runs logged before epochs recorded their images keep the median."""
    from cvtlab.compare import history_figures

    rows = [
        {"epoch": e, "step": 100 * (e + 1), "val_top1": 0.1 * e, "elapsed_s": 0.0,
         "train_images_per_second": ips, "train_images": 100_000}
        for e, ips in enumerate([400.0, 400.0, 100.0, 100.0])
    ]  # fmt: skip
    figures = history_figures(rows)
    # 400,000 images in 250 + 250 + 1,000 + 1,000 seconds.
    assert figures["train_images"] == 400_000
    assert figures["train_images_per_second"] == pytest.approx(160.0)
    old = [{k: v for k, v in r.items() if k != "train_images"} for r in rows]
    assert history_figures(old)["train_images_per_second"] == pytest.approx(250.0)
    assert history_figures(old)["train_images"] is None


def test_export_safetensors_and_onnx_match_pytorch(trained, tmp_path):
    out, _ = trained
    ckpt = out / "checkpoints" / "best.ckpt"
    # The run folder stands for the checkpoint its test scored: best.ckpt under the default rule.
    # Without --format the suffix of --out names it.
    r = run_cli_here("export", "--checkpoint", str(out), "--out", str(tmp_path / "m.safetensors"))
    assert r.returncode == 0, r.stderr
    r = run_cli_here(
        "export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")
    )
    assert r.returncode == 0, r.stderr
    from cvtlab.inference import load_predictor

    reference = load_predictor(ckpt).model
    exported = cvtlab.from_pretrained(tmp_path / "m.safetensors").eval()
    assert exported.class_names[0] == "disc"
    # Both files are readable as any file written here is (safetensors alone makes them 0600).
    modes = {(tmp_path / name).stat().st_mode & 0o777 for name in ("m.safetensors", "m.onnx")}
    assert len(modes) == 1, modes
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            want = reference(x)
            assert torch.equal(exported(x), want)
        got = session.run(None, {"images": x.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-4


def test_onnx_export_carries_what_a_program_needs_to_classify_with_it(trained, tmp_path):
    """Run outside cvtlab, the ONNX file alone (graph and metadata) gives the probabilities and
    class names that ``cvtlab predict`` gives for a photo that is not the model's size."""
    out, _ = trained
    onnx_path = tmp_path / "m.onnx"
    r = run_cli_here("export", "--checkpoint", str(out), "--out", str(onnx_path))
    assert r.returncode == 0, r.stderr
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(photo)
    r = run_cli_here(
        "predict", "--checkpoint", str(out), str(photo), "--format", "json", "--topk", "3"
    )
    assert r.returncode == 0, r.stderr
    want = {p["class"]: p["probability"] for p in json.loads(r.stdout)[0]["predictions"]}

    session = ort.InferenceSession(str(onnx_path))
    meta = session.get_modelmeta().custom_metadata_map
    size = int(meta["image_size"])
    names = json.loads(meta["class_names"])
    mean, std = np.array(json.loads(meta["mean"])), np.array(json.loads(meta["std"]))
    # The preprocessing as the metadata words it, in plain Pillow and numpy.
    img = Image.open(photo).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = (np.asarray(img, dtype=np.float32) / 255 - mean) / std
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    logits = session.run(None, {"images": x})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert len(names) == len(probs) == 10 and names[0] == "disc"
    got = {name: float(p) for name, p in zip(names, probs) if name in want}
    assert got == pytest.approx(want, abs=1e-4)
    assert meta["model"] and meta["cvtlab_version"] == cvtlab.__version__
    # Given back to cvtlab, the export is pointed to ONNX Runtime and to what cvtlab reads.
    r = run_cli_here("predict", "--checkpoint", str(onnx_path), str(photo))
    assert r.returncode == 2 and "an ONNX export runs in ONNX Runtime" in r.stderr


def _step_of(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except Exception:
        return -1


@pytest.mark.slow
def test_ctrl_c_then_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(
    shapes_small, tmp_path
):
    config = recipe(tmp_path, ckpt_every_n_steps=3)
    common = [
        "--config",
        config,
        "--data",
        str(shapes_small),
        "--epochs",
        "3",
        "--seed",
        "7",
        "--train-sizes",
        "0:32",  # trained at 32 px, a quarter of the cost per step; validated at 64
        *FAST,
    ]
    full = tmp_path / "full"
    r = run_cli_here("train", *common, "--out", str(full))
    assert r.returncode == 0, r.stderr[-3000:]

    cut = tmp_path / "cut"
    last = cut / "checkpoints" / "last.ckpt"

    # timm imports wandb, whose two temporary folders a killed process leaves behind: not in /tmp.
    # The killed runs use this process's thread count, so that their sums are rounded as the
    # runs here round them.
    killed_env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }

    def start_and_wait_for_step(args: list[str], least: int, log) -> tuple[subprocess.Popen, int]:
        cmd = [sys.executable, "-m", "cvtlab.cli", "train", *args, "--out", str(cut)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=killed_env)
        deadline, step = time.time() + 300, -1
        while time.time() < deadline and proc.poll() is None:
            step = _step_of(last) if last.exists() else -1
            if step >= least:
                break
            time.sleep(0.05)
        return proc, step

    # Ctrl-C mid-epoch: the step in progress is saved (not only the periodic one, every 3
    # steps) and the command says how to go on.
    with open(tmp_path / "stderr.txt", "w+") as log:
        proc, step = start_and_wait_for_step(common, 3, log)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        log.seek(0)
        err = log.read()
    stopped = _step_of(last)
    assert proc.returncode == 130, err[-3000:]
    assert 3 <= step < stopped < 30, (step, stopped)
    assert f"stopped: SIGINT at step {stopped} " in err
    assert f"Continue with: cvtlab train --resume --out {cut}" in err

    # Killed outright later on: the last periodic checkpoint survives intact.
    proc, step = start_and_wait_for_step(["--resume"], 15, subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 15 <= step < 30 and step % 10 != 0, step  # mid second epoch (10 steps per epoch)
    assert _step_of(last) == step

    r = run_cli_here("train", "--resume", "--out", str(cut))
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    assert b["steps"] == a["steps"] == 30
    assert b["train_images"] == a["train_images"] == 30 * 50  # every image counted once
    assert abs(a["test_top1"] - b["test_top1"]) <= 0.005
    assert len((cut / "metrics.csv").read_text().strip().splitlines()) == 4
    # The step-by-step log went on across both interruptions: the same entries as the
    # uninterrupted run's, none lost and none twice, the same losses and accuracies, the epoch
    # means of training loss and top-1 over every batch of the epochs resumed mid-way included.
    full_log, cut_log = _logged(full), _logged(cut)
    assert full_log.keys() == cut_log.keys()
    for (step, key), value in full_log.items():
        if key.startswith(("train_loss", "train_top1", "val_", "test_")):
            assert cut_log[step, key] == pytest.approx(value, abs=5e-3), (step, key)
        elif key in ("img_s", "train_images_per_second"):  # measured since the resume
            assert cut_log[step, key] > 0, (step, key)


def test_sigterm_to_a_whole_job_with_loader_workers_saves_and_stops(shapes_small, tmp_path):
    """A batch scheduler's SIGTERM (and a terminal's Ctrl-C) reaches every process of the job,
    the data loader's workers too: the run still finishes its step, saves it and stops in one
    line, rather than failing on a worker the signal killed."""
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    config = recipe(tmp_path, ckpt_every_n_steps=3, num_workers=2)
    cmd = [sys.executable, "-m", "cvtlab.cli", "train", "--config", config, "--data"]
    cmd += [str(shapes_small), "--epochs", "6", "--train-sizes", "0:32", *FAST, "--out", str(out)]
    with open(tmp_path / "stderr.txt", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if last.exists() and _step_of(last) >= 3:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        log.seek(0)
        err = log.read()
    assert proc.returncode == 143, err[-3000:]
    stopped = _step_of(last)
    assert 3 <= stopped < 60
    assert f"stopped: SIGTERM at step {stopped} " in err


def _logged(run) -> dict[tuple[int, str], float]:
    import csv

    with open(run / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    entries = [
        ((int(r["step"]), k), float(v))
        for r in rows
        for k, v in r.items()
        if v and k not in ("step", "epoch")  # on every row
    ]
    assert len(entries) == len(dict(entries))  # no step logged twice
    return dict(entries)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(shapes_small, tmp_path):
    base = [
        "--config",
        recipe(tmp_path),
        "--data",
        str(shapes_small),
        "--epochs",
        "3",
        "--model",
        "cvt_seed",
        "--train-sizes",
        "0:32",
        "--accelerator",
        "cpu",
        "--logger",
        "csv",
    ]
    one = tmp_path / "one"
    r = run_cli_here("train", *base, "--batch-size", "50", "--devices", "1", "--out", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = run_cli(
        "train",
        *base,
        "--batch-size",
        "25",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--out",
        str(two),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # One set of progress lines (the first process's), and no false alarm from DDP's reducer.
    assert [line.split("  ")[0] for line in r.stdout.splitlines() if line.startswith("epoch ")] == [
        "epoch 0/2",
        "epoch 1/2",
        "epoch 2/2",
    ]
    assert "Grad strides" not in r.stderr
    for rel in RUN_LAYOUT:
        assert (two / rel).is_file(), rel
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["processes"] == 2 and m2["steps"] == m1["steps"] == 30
    # Synced metrics: the two processes' test top-1 is the whole test set's, as one process sees it.
    r = run_cli_here(
        "eval", "--checkpoint", str(two / "checkpoints" / "best.ckpt"), "--format", "json"
    )
    assert json.loads(r.stdout)["top1"] == m2["test_top1"]
    assert abs(m1["test_top1"] - m2["test_top1"]) <= 0.15


@pytest.mark.slow
def test_demo_runs_the_whole_workflow_far_above_chance(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr[-3000:]
    latest = json.loads((tmp_path / "demo" / "latest.json").read_text())
    assert latest["test_top1"] >= 0.4  # 10 classes: chance is 0.1
    run = tmp_path / "demo" / latest["run"].rsplit("/", 1)[-1]
    assert (run / "report" / "test_predictions.png").is_file()
    assert "predictions on unlabelled test images" in r.stdout and "run folder" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
        (["--lr", "0"], ["--lr must be positive"]),
        (["--lr", "-1"], ["--lr must be positive"]),
        (["--lr-decay", "step"], ["--lr-decay must be cosine or linear, not 'step'"]),
        (["--batch-size", "100000"], ["--batch-size 100000", "500 training images"]),
        (["--model", "cvt_31"], ["unknown model 'cvt_31'"]),
        (["--train-sizes", "0-32"], ["--train-sizes", "'0-32'", "FROM_EPOCH:SIZE"]),
        (["--train-sizes", "0:96:crop"], ["cannot crop 96 px from 64-px images"]),
        (["--train-sizes", "0:32,2:128"], ["train_sizes: 128 px is above the model's 64 px"]),
        (["--train-sizes", "1:32"], ["train_sizes must be", "starting at epoch 0"]),
        (["--train-sizes", "0:32.5"], ["--train-sizes", "'0:32.5'", "FROM_EPOCH:SIZE"]),
        (["--train-sizes", "0:32,2.5:64"], ["phase from epoch 2.5 needs budget_schedule"]),
        (["--test-checkpoint", "final"], ["--test-checkpoint", "best or last", "'final'"]),
        (["--optimizer", "sgd"], ["--optimizer must be adamw or muon, not 'sgd'"]),
        (["--train-batch-sizes", "0:big"], ["--train-batch-sizes", "'0:big'", "FROM_EPOCH:BATCH"]),
        (["--train-batch-sizes", "1:256"], ["train_batch_sizes must be", "starting at epoch 0"]),
        (["--train-batch-sizes", "0:600"], ["train_batch_sizes: batch 600", "500 training images"]),
        (
            ["--model", "cvt_xs_64", "--train-sizes", "0:40"],
            ["train_sizes", "image size 40", "total stride 16"],
        ),
        (["--whiten-stem", "--pretrained", "w.pth"], ["--whiten-stem", "--pretrained"]),
        (["--limit-train-batches", "0"], ["--limit-train-batches must be at least 1"]),
        (["--num-nodes", "0"], ["--num-nodes must be at least 1, got 0"]),
        # Lightning's own checks of the hardware flags, as one line naming them.
        (["--strategy", "foo"], ["--strategy foo", "invalid strategy name"]),
        (["--devices", "abc"], ["--devices abc", "should be an int > 0"]),
        (["--accelerator", "tpu"], ["--accelerator tpu", "torch_xla"]),
    ],
)
def test_training_mistakes_are_one_line(shapes_small, tmp_path, args, words):
    r = run_cli_here(
        "train", "--data", str(shapes_small), "--out", str(tmp_path / "o"), "--epochs", "1", *args
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    # Refused before training: the corrected command may use the same --out.
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_a_dataset_of_one_class_is_refused_before_training(tmp_path):
    """One class folder trained a classifier of one class, then failed on its report."""
    for i in range(6):
        (tmp_path / "data" / "cats").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / "data" / "cats" / f"{i}.png")
    r = run_cli_here(
        "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), *FAST[:2]
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "one class ('cats')" in r.stderr and "at least two classes" in r.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_muon_run_checkpoints_its_momentum_for_the_blocks_matrices(shapes_small, tmp_path):
    out = tmp_path / "run"
    r = run_cli_here(
        "train",
        "--config",
        recipe(tmp_path),
        "--data",
        str(shapes_small),
        "--epochs",
        "1",
        "--optimizer",
        "muon",
        "--out",
        str(out),
        *FAST,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"] == "muon"
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (opt,) = ckpt["optimizer_states"]
    muon = [g for g in opt["param_groups"] if g["muon"]]
    assert len(muon) == 1 and muon[0]["params"]
    buffers = [i for i in muon[0]["params"] if "momentum_buffer" in opt["state"].get(i, {})]
    assert buffers == muon[0]["params"]  # every matrix stepped with Muon, none with AdamW
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10

    # A Muon run saved before Muon took the patch embeddings (they sat in AdamW's group) cannot
    # be resumed into today's groups: one line that says what to do, not a Lightning traceback.
    moved = muon[0]["params"][-1]
    muon[0]["params"].remove(moved)
    next(g for g in opt["param_groups"] if not g["muon"])["params"].append(moved)
    torch.save(ckpt, out / "checkpoints" / "last.ckpt")
    r = run_cli_here("train", "--resume", "--out", str(out), "--epochs", "2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert "--resume" in r.stderr and "--pretrained" in r.stderr


def test_recipe_with_unknown_key_and_occupied_output(trained, shapes_small, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nlearning_rate: 0.1\n")
    r = run_cli_here(
        "train", "--config", str(bad), "--data", str(shapes_small), "--out", str(tmp_path / "o")
    )
    assert r.returncode == 2 and "unknown key(s) learning_rate" in r.stderr
    out, _ = trained
    r = run_cli_here(
        "train", "--data", str(shapes_small), "--out", str(out), "--epochs", "1", *FAST
    )
    assert r.returncode == 2 and "holds another run" in r.stderr and "--resume" in r.stderr


def test_checkpoint_of_another_architecture(trained, shapes_small, tmp_path):
    out, _ = trained
    r = run_cli_here(
        "train",
        "--data",
        str(shapes_small),
        "--out",
        str(tmp_path / "o"),
        "--epochs",
        "1",
        "--pretrained",
        str(out / "checkpoints" / "best.ckpt"),
        *FAST[:-6],
        "--model",
        "cvt_xs_64",
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "a cvt_seed, this run trains a cvt_xs_64; give --model cvt_seed" in r.stderr
    # Refused before training: nothing claims the folder for the corrected command.
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_a_run_folder_in_use_by_another_run_is_refused(shapes_small, tmp_path):
    """A second run in a folder a run is training in (a --resume in another terminal, a
    requeued job) would overwrite its checkpoints: refused in one line naming the holder."""
    from cvtlab.train.run import hold_run_folder

    out = tmp_path / "busy"
    claim = hold_run_folder(out)
    try:
        for extra in ([], ["--resume"]):
            r = run_cli_here(
                "train", "--data", str(shapes_small), "--out", str(out), "--epochs", "1", *FAST,
                *extra,
            )  # fmt: skip
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert "another cvtlab train is running in it" in r.stderr
            assert f"pid {os.getpid()} on " in r.stderr
    finally:
        claim.close()
    hold_run_folder(out).close()  # released with its holder
    # A resume of no run creates nothing.
    r = run_cli_here("train", "--resume", "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and "there is no run to resume" in r.stderr
    assert not (tmp_path / "none").exists()


def test_runs_without_out_get_folders_of_their_own(shapes_small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", str(shapes_small), "--epochs", "1", *FAST]
    args += ["--limit-train-batches", "1"]
    for folder in ("cvt_seed", "cvt_seed-2"):
        r = run_cli_here(*args)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"run folder: runs/{folder} " in r.stdout
        assert (tmp_path / "runs" / folder / "metrics.json").is_file()
    r = run_cli_here("train", "--resume")
    assert r.returncode == 2 and "--resume needs --out" in r.stderr


def test_data_too_small_for_validation_trains_and_tests_its_last_checkpoint(tmp_path):
    """Two images a class leave none to carve a validation split from: the run says so once,
    tests its last checkpoint and reports no best validation score (it printed 0.0000 at epoch
    None, beside Lightning's warnings about the missing metric and the empty loader)."""
    for name, colour in (("red", (250, 20, 20)), ("blue", (20, 20, 250)), ("green", (20, 250, 20))):
        (tmp_path / "tiny" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), colour).save(tmp_path / "tiny" / name / f"{i}.png")
    out = tmp_path / "run"
    r = run_cli_here(
        "train", "--data", str(tmp_path / "tiny"), "--out", str(out), "--epochs", "1", *FAST[:2],
        "--batch-size", "2", "--accelerator", "cpu", "--logger", "none",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("no validation images") == 1 and "monitored key" not in r.stderr
    assert "(no validation images)" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_top1"] is None and metrics["test_checkpoint"].endswith("last.ckpt")


def _renamed_classes(shapes_small, folder):
    """The same images as ``shapes_small``'s training split, under ten other class names."""
    for i, images in enumerate(sorted((shapes_small / "train").glob("*/images"))):
        (folder / f"kind {i}").mkdir(parents=True)
        for path in sorted(images.glob("*.JPEG"))[:24]:
            (folder / f"kind {i}" / path.name).symlink_to(path)
    return folder


def test_finetuning_on_other_classes_starts_a_fresh_head(trained, shapes_small, tmp_path):
    from cvtlab.models.pretrained import start_from_pretrained

    out, _ = trained
    run = cvtlab.from_pretrained(out)
    saved, run_names = run.state_dict(), run.class_names
    for class_names, head_from_run in ((run_names, True), ([f"kind {i}" for i in range(10)], 0)):
        model = cvtlab.create_model("cvt_seed", num_classes=10)
        fresh = model.head.weight.detach().clone()
        line = start_from_pretrained(model, out, "cvt_seed", class_names)
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in saved.items() if not k.startswith("head."))
        expected = saved["head.weight"] if head_from_run else fresh
        assert torch.equal(model.head.weight, expected)
        assert ("its head included" in line) == head_from_run
    # Some of the run's classes, in another order: the head starts from their rows.
    model = cvtlab.create_model("cvt_seed", num_classes=3)
    line = start_from_pretrained(model, out, "cvt_seed", [run_names[i] for i in (7, 2, 5)])
    assert torch.equal(model.head.weight, saved["head.weight"][[7, 2, 5]])
    assert torch.equal(model.head.bias, saved["head.bias"][[7, 2, 5]])
    assert "its head's rows for these 3 classes (of its 10)" in line

    # Through the command: the run says what it started from, in the folder a refused start
    # left free.
    data = _renamed_classes(shapes_small, tmp_path / "kinds")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "ft"), "--epochs", "1"]
    args += ["--pretrained", str(out), *FAST, "--limit-train-batches", "1"]
    refused = run_cli_here(*args[:-2], "--model", "cvt_xs_64")
    assert refused.returncode == 2
    r = run_cli_here(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"starting from {out}: cvt_seed weights and a fresh 10-class head" in r.stdout
    assert "(its head predicts 10 other classes)" in r.stdout


def test_a_schedule_phase_the_epochs_never_reach_is_named(capsys):
    from cvtlab.train.config import TrainConfig
    from cvtlab.train.run import _warn_unreached_phases

    cfg = TrainConfig(epochs=3, train_sizes=[[0, 32], [4, 64]], train_batch_sizes=[[0, 256]])
    _warn_unreached_phases(cfg, 64)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "cvtlab: warning: train_sizes: the phase from epoch 4 (64 px) never starts in a "
        "3-epoch run, which trains at 32 px while validation and test run at 64 px; give "
        "--epochs 5 or more"
    ]
    cfg = TrainConfig(epochs=5, train_sizes=[[0, 32], [4, 64]], train_batch_sizes=[[0, 256]])
    _warn_unreached_phases(cfg, 64)
    assert capsys.readouterr().err == ""


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(shapes_small, tmp_path):
    out = tmp_path / "nan"
    r = run_cli_here(
        "train",
        "--config",
        recipe(tmp_path, ckpt_every_n_steps=1, grad_clip=None, warmup_epochs=0),
        "--data",
        str(shapes_small),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--lr",
        "1e30",
        *FAST,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "training loss became" in r.stderr and "last good checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_real_zip_train_eval_predict_export(tiny_zip, tmp_path):
    """A short run on the real Tiny ImageNet: 30 training batches, then the full 10k test set
    (the official val images)."""
    out = tmp_path / "real"
    cfg = recipe(tmp_path, limit_train_batches=30, ckpt_every_n_steps=0, train_sizes=[[0, 32]])
    r = run_cli_here(
        "train",
        "--config",
        cfg,
        "--data",
        str(tiny_zip),
        "--epochs",
        "1",
        "--out",
        str(out),
        "--model",
        "cvt_seed",
        "--batch-size",
        "64",
        "--accelerator",
        "cpu",
        "--logger",
        "csv",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 30 and 0 <= m["test_top1"] <= 1
    best = str(out / "checkpoints" / "best.ckpt")
    # The held-out val split (10 a class), not the 10k test set again: the same reproduction
    # at a fifth of the cost. Synthetic runs check the test split's (test_eval_reproduces_...).
    r = run_cli_here("eval", "--checkpoint", best, "--split", "val", "--format", "json")
    e = json.loads(r.stdout)
    assert e["n"] == 2_000 and e["top1"] == m["val_top1"]
    # The unlabelled test images, read from the zip: 2,000 here, 10,000 in the official one.
    r = run_cli_here(
        "predict", "--checkpoint", best, f"{tiny_zip}:tiny-imagenet-200/test", "--format", "json"
    )
    results = json.loads(r.stdout)
    assert len(results) >= 2_000 and all(len(x["predictions"]) == 5 for x in results)
    assert results[0]["image"] == f"{tiny_zip}:tiny-imagenet-200/test/images/test_0.JPEG"
    r = run_cli_here(
        "export", "--checkpoint", best, "--format", "onnx", "--out", str(tmp_path / "m.onnx")
    )
    assert r.returncode == 0 and (tmp_path / "m.onnx").stat().st_size > 100_000


def test_tensorboard_logger_needs_no_account(shapes_small, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "tb"
    r = run_cli_here(
        "train",
        "--config",
        recipe(tmp_path, limit_train_batches=2),
        "--data",
        str(shapes_small),
        "--epochs",
        "1",
        "--out",
        str(out),
        *FAST[:-2],
        "--logger",
        "tensorboard",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged, images = set(), set()  # fit, test and the report each write a file
    for events in (out / "logs").glob("events.out.tfevents.*"):
        tags = EventAccumulator(str(events), size_guidance={"images": 0}).Reload().Tags()
        logged |= set(tags["scalars"])
        images |= set(tags["images"])
    assert {"train_loss_epoch", "val_top1", "val_loss", "test_top1"} <= logged, logged
    # The report's figures are in TensorBoard's Images tab, and the whole recipe in its hparams.
    assert images == {f"report/{p.stem}" for p in (out / "report").glob("*.png")}, images
    assert len(images) == 3
    hparams = yaml.full_load((out / "logs" / "hparams.yaml").read_text())  # betas: a tuple
    assert hparams["run"]["data"] == str(shapes_small) and hparams["run"]["epochs"] == 1


def test_wandb_logs_offline_and_a_resumed_run_continues_its_wandb_run(shapes_small, tmp_path):
    """The seed notebook's logger needs no account offline, and ``--resume`` goes on with the
    same W&B run rather than starting a second one."""
    out = tmp_path / "wb"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = run_cli(
        "train", "--config", recipe(tmp_path, limit_train_batches=2), "--data",
        str(shapes_small), "--epochs", "1", "--out", str(out), *FAST[:-2], "--logger", "wandb",
        env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    run_id = (out / "wandb_run_id").read_text().strip()
    [first] = (out / "wandb").glob("offline-run-*")
    assert first.name.endswith(f"-{run_id}") and (first / f"run-{run_id}.wandb").stat().st_size
    # The report's three figures are images of the W&B run, and its config holds the recipe
    # (the run's own settings, such as its data and time budget, not only the model's).
    assert len(list((first / "files" / "media" / "images").glob("report_*.png"))) == 3
    record = (first / f"run-{run_id}.wandb").read_bytes()
    assert f'"data":"{shapes_small}"'.encode() in record and b'"max_minutes":null' in record
    r = run_cli("train", "--resume", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)


def test_matmul_precision_is_applied_and_recorded(shapes_small, tmp_path, monkeypatch):
    from cvtlab.train.config import make_config
    from cvtlab.train.precision import choose_cpu_precision, product_rates
    from cvtlab.train.run import train

    monkeypatch.delenv("CVTLAB_AUTO_PRECISION", raising=False)

    before = torch.get_float32_matmul_precision()
    cfg = make_config(
        recipe(tmp_path, limit_train_batches=2, ckpt_every_n_steps=0),
        data=str(shapes_small),
        out=str(tmp_path / "run"),
        model="cvt_seed",
        epochs=1,
        accelerator="cpu",
        matmul_precision="high",
        precision="auto",
    )
    try:
        torch.set_float32_matmul_precision("highest")
        metrics = train(cfg)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    saved = make_config(tmp_path / "run" / "config.yaml")
    assert saved.matmul_precision == "high" and saved.precision == "auto"
    # The run records what `auto` became on this machine: what a fresh measurement picks, unless
    # this CPU's two rates sit so close to the bound that the two measurements may disagree.
    rates = product_rates()
    fp32, bf16 = rates[torch.float32], rates[torch.bfloat16]
    assert metrics["precision"] in ("32", "bf16-mixed")
    if not 1.1 < bf16 / fp32 < 1.5:
        assert metrics["precision"] == choose_cpu_precision(fp32, bf16)


@pytest.mark.slow
def test_finetune_recipe_starts_from_official_format_weights(shapes_small, tmp_path):
    # The official ImageNet file cannot be downloaded here: a CvT-13 state dict saved with the
    # official key names stands in for it, so the recipe's loading path is the real one.
    official = tmp_path / "CvT-13-224x224-IN-1k.pth"
    torch.save(cvtlab.create_model("cvt_13").state_dict(), official)
    out = tmp_path / "ft"
    r = run_cli_here(
        "train",
        "--config",
        "tiny_imagenet_finetune",
        "--pretrained",
        str(official),
        "--data",
        str(shapes_small),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--accelerator",
        "cpu",
        "--devices",
        "1",
        "--logger",
        "none",
        "--limit-train-batches",
        "2",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "cvt_13" and 0 <= m["test_top1"] <= 1
    assert m["precision"] in ("32", "bf16-mixed")  # the recipe's auto, measured here
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["img_size"] == 224 and saved["pretrained"] == str(official)
    # Trained at 224 px from the 64-px images, resized per batch: no 224-px copy was decoded.
    assert not whole_image_entries("shapes", 224)


@pytest.mark.parametrize("how", ["resize", "crop"])
def test_progressive_resizing_trains_small_then_full_size_and_validates_full_size(
    shapes_small, tmp_path, how
):
    """train_sizes: epoch 0 trains on 32-px batches (resized or cropped), epoch 1 on 64-px;
    validation stays 64."""
    import lightning as L

    from cvtlab.train.config import make_config
    from cvtlab.train.run import train

    seen = []

    class Sizes(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(("train", trainer.current_epoch, batch[0].shape[-1]))

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            seen.append(("val", trainer.current_epoch, batch[0].shape[-1]))

    cfg = make_config(
        recipe(tmp_path, limit_train_batches=2, ckpt_every_n_steps=0),
        data=str(shapes_small),
        out=str(tmp_path / "run"),
        model="cvt_xs_64",
        epochs=2,
        batch_size=50,
        accelerator="cpu",
        train_sizes=[[0, 32, how], [1, 64]],
    )
    metrics = train(cfg, extra_callbacks=[Sizes()])
    train_sizes = {(e, s) for kind, e, s in seen if kind == "train"}
    assert train_sizes == {(0, 32), (1, 64)}
    assert {s for kind, _, s in seen if kind == "val"} == {64}
    assert metrics["epochs"] == 2 and np.isfinite(metrics["test_loss"])


def test_whiten_stem_starts_the_run_from_the_first_phase_patches(shapes_small, tmp_path):
    """whiten_stem: the stem the first step sees is the whitening of training images at the
    first phase's size (32 px here)."""
    import lightning as L

    from cvtlab.data.datamodule import ImageDataModule
    from cvtlab.train.config import make_config
    from cvtlab.train.run import train
    from cvtlab.train.whitening import whiten_stem

    first = {}

    class FirstStem(L.Callback):
        def on_train_start(self, trainer, module):
            first["weight"] = module.model.stage0.patch_embed.proj.weight.detach().clone()

    cfg = make_config(
        recipe(tmp_path, limit_train_batches=2, ckpt_every_n_steps=0),
        data=str(shapes_small),
        out=str(tmp_path / "run"),
        model="cvt_xs_64",
        epochs=2,
        batch_size=50,
        accelerator="cpu",
        train_sizes=[[0, 32], [1, 64]],
        whiten_stem=True,
        seed=5,
    )
    metrics = train(cfg, extra_callbacks=[FirstStem()])
    assert metrics["epochs"] == 2 and np.isfinite(metrics["test_loss"])
    dm = ImageDataModule(str(shapes_small), seed=5)
    dm.setup()
    expected = cvtlab.create_model("cvt_xs_64", num_classes=dm.num_classes)
    whiten_stem(expected, dm.data.images, dm.rows["train"], size=32, seed=5)
    assert torch.allclose(first["weight"], expected.stage0.patch_embed.proj.weight, atol=1e-5)


def whole_image_entries(dataset: str, size: int) -> list[str]:
    """The decoded cache's entries of ``dataset`` at ``size`` px, whole-image view (the view a
    training run decodes; other tests make centre-crop entries of their own)."""
    from cvtlab.data.cache import cache_root

    pattern = rf"{dataset}-{size}px-[0-9a-f]{{12}}"
    return [p.name for p in (cache_root() / "decoded").iterdir() if re.fullmatch(pattern, p.name)]


def test_a_run_above_tiny_imagenets_size_trains_from_its_64_px_images(shapes_small, tmp_path):
    """A 96-px run on data in the Tiny ImageNet layout decodes no 96-px copy: its batches are
    resized from the 64-px entry, for training, validation, the whitened stem, the run's test
    and a later `cvtlab eval`, which scores the checkpoint as the run did."""
    import lightning as L

    from cvtlab.data.datamodule import ImageDataModule
    from cvtlab.evaluation import evaluate
    from cvtlab.train.config import make_config
    from cvtlab.train.run import train
    from cvtlab.train.whitening import whiten_stem

    seen, first = set(), {}

    class Seen(L.Callback):
        def on_train_start(self, trainer, module):
            first["stem"] = module.model.stage0.patch_embed.proj.weight.detach().clone()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.add(("train", batch[0].shape[-1]))

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            seen.add(("val", batch[0].shape[-1]))

    out = tmp_path / "run"
    cfg = make_config(
        recipe(tmp_path, limit_train_batches=2, ckpt_every_n_steps=0),
        data=str(shapes_small),
        out=str(out),
        model="cvt_xs_64",
        img_size=96,
        epochs=1,
        batch_size=50,
        accelerator="cpu",
        whiten_stem=True,
        seed=3,
    )
    metrics = train(cfg, extra_callbacks=[Seen()])
    # A whitened run without a size schedule once lost its config.yaml (a flag was reused).
    assert (out / "config.yaml").is_file()
    assert seen == {("train", 96), ("val", 96)}
    assert whole_image_entries("shapes", 64) and not whole_image_entries("shapes", 96)
    dm = ImageDataModule(str(shapes_small), img_size=96, seed=3, upscale=False)
    dm.setup()
    assert dm.data.img_size == 64
    expected = cvtlab.create_model("cvt_xs_64", num_classes=dm.num_classes, img_size=96)
    whiten_stem(expected, dm.data.images, dm.rows["train"], size=96, seed=3)
    assert torch.allclose(first["stem"], expected.stage0.patch_embed.proj.weight, atol=1e-5)
    result = evaluate(str(out), split="test")
    assert result["img_size"] == 96 and result["top1"] == pytest.approx(metrics["test_top1"])
    assert result["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)


def test_a_resumed_whitened_run_keeps_its_trained_stem(shapes_small, tmp_path):
    """--resume continues from the stem the checkpoint holds, not from a fresh whitening."""
    import lightning as L

    from cvtlab.train.config import make_config
    from cvtlab.train.run import train

    stems = []

    class FirstStem(L.Callback):
        def on_train_start(self, trainer, module):
            stems.append(module.model.stage0.patch_embed.proj.weight.detach().clone())

    class Cut(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            # Lightning runs checkpoint callbacks last, so last.ckpt holds step 2 here.
            if trainer.global_step == 3:
                raise RuntimeError("cut")

    def config(**extra):
        return make_config(
            recipe(tmp_path, ckpt_every_n_steps=2, warmup_epochs=0),
            data=str(shapes_small),
            out=str(tmp_path / "run"),
            model="cvt_xs_64",
            epochs=1,
            batch_size=50,
            accelerator="cpu",
            train_sizes=[[0, 32]],
            whiten_stem=True,
            seed=5,
            **extra,
        )

    with pytest.raises(RuntimeError, match="cut"):
        train(config(), extra_callbacks=[FirstStem(), Cut()])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    saved = ckpt["state_dict"]["model.stage0.patch_embed.proj.weight"]
    assert not torch.allclose(saved, stems[0], atol=1e-4), "two steps should move the stem"
    train(config(resume=True), extra_callbacks=[FirstStem()])
    assert torch.equal(stems[1], saved)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_batch_schedule_trains_larger_batches_while_small(shapes_small, tmp_path, decay):
    """train_batch_sizes: epoch 0 draws batches of 100 at 32 px, epoch 1 batches of 50 at 64 px;
    the schedule counts images, so a step of 100 moves the rate's decay (cosine or linear) twice
    as far as one of 50, and it reaches its end after the epochs' images whatever the batch."""
    import lightning as L

    from cvtlab.train.config import make_config
    from cvtlab.train.run import train

    steps = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            # Inside the step: the rate the optimiser applies to this batch.
            lr = optimizer.param_groups[0]["lr"]
            steps.append((trainer.current_epoch, lr))

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            steps.append(("shape", trainer.current_epoch, batch[0].shape[0], batch[0].shape[-1]))

    cfg = make_config(
        recipe(tmp_path, ckpt_every_n_steps=0, warmup_epochs=0, min_lr_ratio=0.0),
        data=str(shapes_small),
        out=str(tmp_path / "run"),
        model="cvt_seed",
        epochs=2,
        batch_size=50,
        accelerator="cpu",
        train_sizes=[[0, 32], [1, 64]],
        train_batch_sizes=[[0, 100], [1, 50]],
        lr_decay=decay,
    )
    metrics = train(cfg, extra_callbacks=[Record()])
    shapes = [s[1:] for s in steps if s[0] == "shape"]
    n_train = 10 * (60 - 10)  # shapes_small: 10 classes of 60, 10 each held out for validation
    per_epoch = {e: [(b, px) for ep, b, px in shapes if ep == e] for e in (0, 1)}
    assert per_epoch[0] == [(100, 32)] * (n_train // 100)
    assert per_epoch[1] == [(50, 64)] * (n_train // 50)
    assert metrics["epochs"] == 2 and metrics["steps"] == n_train // 100 + n_train // 50
    rates = [s for s in steps if s[0] != "shape"]
    peak = cfg.peak_lr
    total = 2 * (n_train // 50)
    for i, (e, lr) in enumerate(rates):
        # Position in steps of 50 images: two per 100-image step.
        done = 2 * i if e == 0 else 2 * (n_train // 100) + (i - n_train // 100)
        falling = (
            0.5 * (1 + np.cos(np.pi * done / total)) if decay == "cosine" else 1 - done / total
        )
        expected = peak * falling
        assert lr == pytest.approx(expected, rel=1e-6), (i, e)
    history = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert len(history) == 2 and all(row.split(",")[6] for row in history)  # validated each epoch
    with pytest.raises(cvtlab.CvtLabError, match="train_batch_sizes must be"):
        make_config(train_batch_sizes=[[1, 100]])


def test_batch_schedule_resumes_mid_epoch_where_it_stopped(shapes_small, tmp_path):
    """A run cut after 3 steps of 100 images resumes with the epoch's last 200 images, not
    after 3 × batch_size of them, and ends as the uninterrupted run does."""
    import lightning as L

    from cvtlab.train.config import make_config
    from cvtlab.train.run import train

    class Cut(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            # Lightning runs checkpoint callbacks last, so last.ckpt holds step 3 here.
            if trainer.global_step == 4:
                raise RuntimeError("cut")

    def config(out, **extra):
        return make_config(
            recipe(tmp_path, ckpt_every_n_steps=3, warmup_epochs=0),
            data=str(shapes_small),
            out=str(tmp_path / out),
            model="cvt_seed",
            epochs=2,
            batch_size=50,
            seed=3,
            accelerator="cpu",
            train_sizes=[[0, 32]],
            train_batch_sizes=[[0, 100], [1, 50]],
            **extra,
        )

    full = train(config("full"))
    with pytest.raises(RuntimeError, match="cut"):
        train(config("cut"), extra_callbacks=[Cut()])
    resumed = train(config("cut", resume=True))
    assert full["steps"] == resumed["steps"] == 500 // 100 + 500 // 50
    assert resumed["test_top1"] == pytest.approx(full["test_top1"], abs=0.005)
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], rel=1e-3)


def test_a_run_folder_moved_before_resuming_keeps_its_best_checkpoint(
    shapes_small, tmp_path, capsys
):
    """A run folder copied elsewhere (off a cluster node, say) resumes with the best score it
    had: a later epoch that validates no better does not replace ``best.ckpt``. A setting
    changed on resuming (here: one more epoch) is named, and config.yaml records it."""
    import warnings

    import lightning as L

    from cvtlab.train.config import make_config
    from cvtlab.train.run import train

    class Cut(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 14:  # last.ckpt holds step 12, mid second epoch
                raise RuntimeError("cut")

    def config(out, **extra):
        # A rate too small to change a prediction: every epoch validates the same, so the
        # first epoch's checkpoint stays the best.
        return make_config(
            recipe(tmp_path, ckpt_every_n_steps=3, lr=1e-9),
            data=str(shapes_small),
            out=str(tmp_path / out),
            model="cvt_seed",
            batch_size=50,
            seed=3,
            accelerator="cpu",
            train_sizes=[[0, 32]],
            **{"epochs": 3, **extra},
        )

    with pytest.raises(RuntimeError, match="cut"):
        train(config("node"), extra_callbacks=[Cut()])
    shutil.move(tmp_path / "node", tmp_path / "home")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(config("home", resume=True, epochs=4))
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    best = torch.load(tmp_path / "home/checkpoints/best.ckpt", weights_only=True)
    assert best["epoch"] == resumed["best_epoch"] == 0
    assert resumed["test_checkpoint"] == str(tmp_path / "home/checkpoints/best.ckpt")
    assert resumed["steps"] == 40
    assert "resuming with changed settings: epochs 3 -> 4\n" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "home" / "config.yaml").read_text())
    assert (saved["epochs"], saved["out"], saved["resume"]) == (4, str(tmp_path / "home"), False)


def test_ema_warmup_power_sets_when_the_decay_reaches_ema_decay():
    """With power 1 the EMA is the plain mean of the steps until 1/(1 - ema_decay) steps, then
    the EMA at ema_decay; timm's 2/3 is still under the cap there."""
    from cvtlab.train.config import make_config
    from cvtlab.train.module import CvTClassifier

    power_one = CvTClassifier(
        "cvt_seed", {"num_classes": 3}, ["a", "b", "c"], ema_decay=0.9, ema_warmup_power=1.0
    )
    default = CvTClassifier("cvt_seed", {"num_classes": 3}, ["a", "b", "c"], ema_decay=0.9)
    assert power_one.ema.get_decay(step=5) == pytest.approx(0.8)  # the mean of 5 updates
    assert power_one.ema.get_decay(step=11) == pytest.approx(0.9)
    assert default.ema.get_decay(step=11) == pytest.approx(1 - 11 ** (-2 / 3))
    assert default.ema.get_decay(step=11) < 0.9
    assert make_config("demo").ema_warmup_power == pytest.approx(2 / 3)
    # gamma 10: the mean of about a tenth of the steps so far, never capped at 0.9999
    tenth = CvTClassifier(
        "cvt_seed",
        {"num_classes": 3},
        ["a", "b", "c"],
        ema_decay=0.9999,
        ema_warmup_power=1.0,
        ema_warmup_gamma=10.0,
    )
    assert 1 / (1 - tenth.ema.get_decay(step=10_001)) == pytest.approx(1_001)


def test_a_non_finite_loss_flag_blocks_any_checkpoint_save():
    """On accelerators the loss check is deferred; a pending non-finite flag still stops saving."""
    from cvtlab.train.module import CvTClassifier

    module = CvTClassifier("cvt_seed", {"num_classes": 3}, ["a", "b", "c"])
    module._nonfinite = torch.tensor(False)
    module.on_save_checkpoint({})  # a finite history saves normally
    module._nonfinite = torch.tensor(True)
    with pytest.raises(FloatingPointError, match="non-finite"):
        module.on_save_checkpoint({})


def test_a_run_shorter_than_regularise_min_steps_trains_without_erasing_or_smoothing():
    """regularise_min_steps: a run of fewer optimiser steps drops random erasing and label
    smoothing (on the steps its epochs plan here; under a time budget on its projected pace, in
    the budget test below), and a resumed run keeps what its checkpoint settled."""
    from cvtlab.data.augment import normalize
    from cvtlab.train.config import TrainConfig
    from cvtlab.train.module import CvTClassifier, planned_steps

    # 4 epochs of 6,400 images in batches of 256, then 16 in batches of 96 (67 steps each).
    assert planned_steps(20 * 50, 50, 128, [[0, 256], [4, 96]]) == 4 * 25 + 16 * 67
    assert planned_steps(20 * 50, 50, 128, None) == 1000
    augment = {
        "crop": "none",
        "flip": False,
        "auto_augment": None,
        "mixup": 0.0,
        "cutmix": 0.0,
        "random_erase": 1.0,
        "label_smoothing": 0.1,
    }

    def module(min_steps):
        return CvTClassifier(
            "cvt_seed",
            {"num_classes": 3},
            ["a", "b", "c"],
            label_smoothing=0.1,
            augment=augment,
            total_steps=1000,
            steps_per_epoch=50,
            batch_size=128,
            train_batch_sizes=[[0, 256], [4, 96]],
            regularise_min_steps=min_steps,
        )

    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    kept, dropped = module(1172), module(1173)
    for m in (kept, dropped):
        m._settle_regularisation()
    assert kept.regularisation == {"projected_steps": 1172, "off_from_step": None}
    x, targets = kept.augment(images, labels)
    assert targets.shape == (4, 3) and not torch.equal(x, normalize(images.clone()))
    assert dropped.regularisation == {"projected_steps": 1172, "off_from_step": 0}
    x, targets = dropped.augment(images, labels)
    assert torch.equal(targets, labels) and torch.equal(x, normalize(images.clone()))
    assert dropped.label_smoothing == 0.0 and kept.label_smoothing == 0.1
    checkpoint = {}
    dropped.on_save_checkpoint(checkpoint)
    resumed = module(None)  # the checkpoint's decision stands, whatever the resumed run says
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.regularisation == dropped.regularisation
    assert resumed.augment.cfg.random_erase == 0.0 and resumed.label_smoothing == 0.0
    with pytest.raises(cvtlab.CvtLabError, match="regularise_min_steps must be a whole number"):
        TrainConfig(regularise_min_steps=0)


def test_budget_schedule_ends_the_lr_and_size_schedule_with_the_time_budget(shapes_small, tmp_path):
    """budget_schedule: with far more epochs than the budget holds, the resize and the cosine
    follow the clock, so the run switches to full size half-way through the budget and ends
    annealed when the budget is spent."""
    import lightning as L

    from cvtlab.train.config import make_config
    from cvtlab.train.run import train

    seen, norms, erasing = [], [], []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            seen.append((time.perf_counter(), batch[0].shape[-1], lr))
            # (the batch was augmented before this hook: as the module stood then)
            erasing.append((trainer.global_step, module.augment.cfg.random_erase))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            # The gradients the optimiser stepped with (cleared only before the next backward).
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    budget_min = 0.2
    # A run far shorter than regularise_min_steps drops erasing and smoothing once 5% of its
    # budget projects its length.
    augment = {"auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "random_erase": 0.25}
    cfg = make_config(
        recipe(
            tmp_path,
            ckpt_every_n_steps=0,
            warmup_epochs=1,
            augment=augment,
            label_smoothing=0.1,
            regularise_min_steps=10**9,
        ),
        data=str(shapes_small),
        out=str(tmp_path / "run"),
        model="cvt_seed",
        epochs=1000,
        batch_size=50,
        accelerator="cpu",
        train_sizes=[[0, 32], [500, 64]],
        max_minutes=budget_min,
        budget_schedule=True,
        # bf16 autocast where this CPU's bf16 products are fast; without bf16 instructions (Zen 3:
        # 0.01x fp32) a bf16 run would get through one epoch of its 12 s, so fp32 there.
        precision="auto",
        grad_clip=0.01,
        test_checkpoint="last",
    )
    metrics = train(cfg, extra_callbacks=[Record()])
    start, peak = seen[0][0], cfg.peak_lr
    assert 2 < metrics["epochs"] < 1000  # stopped by the clock, not by the epochs
    sizes = [s for _, s, _ in seen]
    switch = sizes.index(64)
    assert set(sizes[:switch]) == {32} and set(sizes[switch:]) == {64}
    # The switch comes about half-way through the budget (the clock includes validation).
    assert 0.3 < (seen[switch][0] - start) / (budget_min * 60) < 0.7
    lrs = [lr for _, _, lr in seen]
    assert max(lrs) > 0.9 * peak and lrs[-1] < 0.1 * peak
    # The fused AdamW still clips the gradients (under bf16 autocast where auto chose it).
    assert norms and max(norms) <= 0.01 * 1.001
    assert np.isfinite(metrics["test_loss"])
    off = metrics["regularisation"]["off_from_step"]
    assert [e for step, e in erasing] == [0.25] * off + [0.0] * (len(erasing) - off)
    assert [step for step, _ in erasing][off] == off
    # The projection, from the pace of the first seconds, is of the run's order of steps.
    assert 0.3 < metrics["regularisation"]["projected_steps"] / metrics["steps"] < 3
    # test_checkpoint: last scores the weights at the end of the budget, the annealed ones.
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert metrics["test_checkpoint"] == str(last)
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == metrics["steps"]
    assert saved["regularisation"] == metrics["regularisation"]
    from cvtlab.evaluation import evaluate

    # (the run tested under bf16 autocast, evaluate in fp32: a prediction may flip)
    # The run folder resolves to last.ckpt, the checkpoint this run tested.
    assert evaluate(str(tmp_path / "run"), str(shapes_small))["top1"] == pytest.approx(
        metrics["test_top1"], abs=0.02
    )
    with pytest.raises(cvtlab.CvtLabError, match="max_minutes"):
        make_config(recipe(tmp_path), budget_schedule=True)


DDP_BUDGET_SCRIPT = """
import json, sys
import lightning as L
import torch
from cvtlab.train.config import make_config
from cvtlab.train.run import train

class Checksum(L.Callback):
    def on_train_end(self, trainer, module):
        total = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
        lr = torch.tensor(trainer.optimizers[0].param_groups[0]["lr"], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(torch.stack([total, lr]))
        if trainer.is_global_zero:
            with open(sys.argv[3], "w") as f:
                json.dump(gathered.tolist(), f)

cfg = make_config(sys.argv[1], data=sys.argv[2], out=sys.argv[4], model="cvt_seed", epochs=1000,
                  batch_size=25, devices=2, strategy="ddp", accelerator="cpu", logger="none",
                  train_sizes=[[0, 32], [850, 64]], train_batch_sizes=[[0, 50], [850, 25]],
                  max_minutes=0.15, budget_schedule=True)
train(cfg, extra_callbacks=[Checksum()])
"""


@pytest.mark.slow
def test_budget_schedule_keeps_ddp_replicas_identical(shapes_small, tmp_path):
    """Under DDP every process follows process 0's clock, so the replicas take the same steps,
    with the same images, batch and rate at each."""
    script = tmp_path / "ddp_budget.py"
    script.write_text(DDP_BUDGET_SCRIPT)
    result = tmp_path / "ranks.json"
    r = subprocess.run(
        [
            sys.executable,
            str(script),
            recipe(tmp_path, ckpt_every_n_steps=0),
            str(shapes_small),
            str(result),
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (sum0, lr0), (sum1, lr1) = json.loads(result.read_text())
    assert sum0 == sum1 and lr0 == lr1
    # Annealed by the clock: by its steps (a sliver of 1000 epochs) it would be near the peak.
    # The clock is read every 10 steps, and the switch to 64 px at 85% of the budget is decided by
    # such a reading: once the run reaches it, the last reading is late even if 64-px steps crawl.
    assert lr0 < 0.25 * 8.0e-3 * 25 / 512


def test_last_checkpoint_holds_the_final_step_when_the_last_epoch_sets_no_best(tmp_path):
    """Lightning writes its last.ckpt at an epoch's end only beside a new best; a run whose
    validation top-1 stops improving must still end with its final weights in last.ckpt."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from cvtlab.train.callbacks import EpochHistory
    from cvtlab.train.config import make_config
    from cvtlab.train.run import build_trainer

    class FlatValidation(L.LightningModule):
        """Trains a linear layer; its validation top-1 is the same every epoch."""

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def validation_step(self, batch, batch_idx):
            self.log("val_top1", 0.5)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    # Step checkpoints every 5 steps (5, 10), epochs of 4 steps: the last step, 12, is neither.
    cfg = make_config(epochs=3, ckpt_every_n_steps=5, accelerator="cpu", devices=1, logger="none")
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)
    module = FlatValidation()
    trainer = build_trainer(cfg, tmp_path, EpochHistory(tmp_path / "metrics.csv"))
    trainer.fit(module, data, data)
    ckpts = tmp_path / "checkpoints"
    best = torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["global_step"] == 4 and trainer.global_step == 12
    assert last["global_step"] == 12
    assert torch.equal(last["state_dict"]["layer.weight"], module.layer.weight.detach())
    assert len(last["callbacks"]["EpochHistory"]["rows"]) == 3  # the last epoch's row is in it
    # Resuming from it continues with the next epoch, not the last one again.
    more = build_trainer(
        make_config(**{**cfg.to_dict(), "epochs": 4}), tmp_path, EpochHistory(tmp_path / "m.csv")
    )
    more.fit(FlatValidation(), data, data, ckpt_path=str(ckpts / "last.ckpt"))
    assert more.global_step == 16


def test_a_run_folder_resolves_to_the_checkpoint_its_test_scored(tmp_path):
    from cvtlab import CvtLabError
    from cvtlab.inference import resolve_checkpoint

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"x")
    # Unfinished, no best yet: the last checkpoint.
    assert resolve_checkpoint(run) == ckpts / "last.ckpt"
    (ckpts / "best.ckpt").write_bytes(b"x")
    # Unfinished: the recipe's rule (best by default, last when the recipe says so).
    assert resolve_checkpoint(run) == ckpts / "best.ckpt"
    (run / "config.yaml").write_text("test_checkpoint: last\n")
    assert resolve_checkpoint(run) == ckpts / "last.ckpt"
    # Finished: what metrics.json names, by file name, so a moved run folder still resolves.
    elsewhere = "/somewhere/else/checkpoints/best.ckpt"
    (run / "metrics.json").write_text(json.dumps({"test_checkpoint": elsewhere}))
    assert resolve_checkpoint(str(run)) == ckpts / "best.ckpt"
    # Files and folders that are not run folders pass through unchanged.
    assert resolve_checkpoint(ckpts / "last.ckpt") == ckpts / "last.ckpt"
    assert resolve_checkpoint(ckpts) == ckpts
    # A folder that is neither a run nor a Hugging Face folder: one line that names both.
    r = run_cli_here("eval", "--checkpoint", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "config.json" in r.stderr and "run folder" in r.stderr
    (ckpts / "best.ckpt").unlink()
    with pytest.raises(CvtLabError, match=r"run: a run folder without its checkpoint \(.*best"):
        resolve_checkpoint(run)


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_one_before(
    tmp_path, monkeypatch
):
    import errno

    from cvtlab import CvtLabError
    from cvtlab.train import callbacks
    from cvtlab.train.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def save_on_a_full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(callbacks.torch, "save", save_on_a_full_disk)
    with pytest.raises(CvtLabError, match=r"last.ckpt: the checkpoint could not be written"):
        io.save_checkpoint({"step": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_onnx_export_without_the_onnx_package_says_what_to_install(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as in an install without the extra
    out, _ = trained
    r = run_cli_here("export", "--checkpoint", str(out), "--format", "onnx", "--out", "m.onnx")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "pip install 'cvtlab[onnx]'" in r.stderr


def test_resuming_from_a_damaged_checkpoint_is_one_line(trained, shapes_small, tmp_path):
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    last = run / "checkpoints" / "last.ckpt"
    whole = last.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"not a checkpoint"):
        last.write_bytes(damaged)
        r = run_cli_here("train", "--resume", "--out", str(run))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert f"--resume: {last} cannot be read (cut short, or not a checkpoint)" in r.stderr


def test_resuming_with_fewer_epochs_than_trained_is_one_line(trained, tmp_path):
    out, _ = trained  # trained 3 epochs
    run = tmp_path / "run"
    shutil.copytree(out, run)
    r = run_cli_here("train", "--resume", "--out", str(run), "--epochs", "2")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"--epochs 2: the run in {run} has trained 3 epochs already; give --epochs 4" in r.stderr


def test_resuming_refuses_what_the_checkpoint_cannot_go_on_with_and_keeps_its_config(
    trained, tmp_path
):
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    config = (run / "config.yaml").read_text()
    other = tmp_path / "other"
    for c in range(10):
        (other / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 64), (25 * c, i, 0)).save(other / f"class{c}" / f"{i}.png")
    for flags, says in (
        (["--model", "cvt_xs_64"], "--model cvt_xs_64: the run in"),
        (["--optimizer", "muon"], "--optimizer muon: the run in"),
        (["--ema-decay", "0.99"], "not turn the EMA on or off"),
        (["--data", str(other)], f"--data {other}: not the classes the run trains on"),
    ):
        r = run_cli_here("train", "--resume", "--out", str(run), "--epochs", "4", *flags)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert says in r.stderr
        # A refused resume leaves the run as it was: the next one goes on with its settings.
        assert (run / "config.yaml").read_text() == config


def test_summary_of_a_trained_model_is_its_own_architecture_and_head(trained):
    from cvtlab.inference import load_predictor

    out, _ = trained
    r = run_cli_here("summary", str(out), "--format", "json")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    want = load_predictor(out).model
    assert table["total_params"] == sum(p.numel() for p in want.parameters())
    assert table["layers"][-1]["output_shape"] == [10]  # the run's 10 classes


def test_wilson_interval_of_an_accuracy():
    from cvtlab.evaluation import wilson_interval

    z2 = 1.96**2
    # All of n right: the lower end is n / (n + z²); none right: the upper end z² / (n + z²).
    assert wilson_interval(1.0, 24) == pytest.approx([24 / (24 + z2), 1.0])
    assert wilson_interval(0.0, 24) == pytest.approx([0.0, z2 / (24 + z2)])
    # Symmetric about one half, and about ±1.96·sqrt(p(1-p)/n) when n is large.
    lo, hi = wilson_interval(0.5, 10_000)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * 0.0098, rel=1e-3)
    assert wilson_interval(0.9, 80)[1] - wilson_interval(0.9, 80)[0] > hi - lo


def test_a_moved_runs_missing_data_says_to_pass_data(trained, shapes_small, tmp_path):
    """A run folder copied to another machine names its data where it was: eval and resume say
    so, and take --data with where it is now."""
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(shapes_small), "/elsewhere/shapes"))
    hint = "/elsewhere/shapes: no such dataset file or folder (the data the run trained on"
    for args in (["eval", "--checkpoint", str(run)], ["train", "--resume", "--out", str(run)]):
        r = run_cli_here(*args)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert hint in r.stderr and "pass --data" in r.stderr
    r = run_cli_here("eval", "--checkpoint", str(run), "--data", str(shapes_small))
    assert r.returncode == 0, r.stderr

"""Smoke tests: the benchmarks run end to end on tiny sizes (their numbers are not checked;
speed is measured in benchmarks/, never asserted in tests)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_throughput_benchmark_runs_and_reports_ratios():
    pytest.importorskip("transformers")
    import throughput

    payload = throughput.main(
        ["--quick", "--impls", "cvtlab,cvtlab-bf16,transformers", "--no-write"]
    )
    from cvtlab.train.precision import bf16_is_emulated

    case = payload["cases"]["cvt_13@64"]["impls"]
    assert case["transformers"]["train_vs_transformers"] == pytest.approx(1.0)
    assert "cannot express" in payload["cases"]["cvt_seed@64"]["impls"]["transformers"]["note"]
    assert payload["auto_precision"] in ("32", "bf16-mixed")
    rates = payload["matmul_gflops"]
    if bf16_is_emulated(rates["fp32"], rates["bf16"]):
        # A CPU without bf16 instructions (AMD Zen 3): a bf16 step would take minutes.
        assert "no bf16 instructions" in case["cvtlab-bf16"]["note"]
        assert "train_images_per_s" not in case["cvtlab-bf16"]
        assert payload["auto_precision"] == "32"
        measured = ["cvtlab"]
    else:
        measured = ["cvtlab", "cvtlab-bf16"]
        best = payload["cases"]["cvt_13@64"]["best"]["train"]
        assert case[best]["train_vs_transformers"] == max(
            case[i]["train_vs_transformers"] for i in measured
        )
    for impl in measured:
        assert case[impl]["train_images_per_s"] > 0 and case[impl]["infer_images_per_s"] > 0


def test_throughput_benchmark_times_the_compiled_model_in_inference_only():
    import throughput

    from cvtlab.train.precision import bf16_is_emulated

    impls = "cvtlab,cvtlab-compiled,cvtlab-bf16,cvtlab-bf16-compiled"
    payload = throughput.main(["--quick", "--cases", "cvt_seed@64", "--impls", impls, "--no-write"])
    case = payload["cases"]["cvt_seed@64"]["impls"]
    # fp32 compiles on every CPU: the best inference setting where there is no bf16.
    compiled = case["cvtlab-compiled"]
    assert compiled["infer_images_per_s"] > 0 and "train_images_per_s" not in compiled
    assert case["cvtlab"]["train_images_per_s"] > 0
    compiled = case["cvtlab-bf16-compiled"]
    rates = payload["matmul_gflops"]
    if bf16_is_emulated(rates["fp32"], rates["bf16"]):
        assert "no bf16 instructions" in compiled["note"]
        return
    assert compiled["infer_images_per_s"] > 0 and "train_images_per_s" not in compiled
    assert case["cvtlab-bf16"]["train_images_per_s"] > 0


def test_throughput_benchmark_compiles_fp32_by_default_only_without_bf16():
    import throughput

    with_bf16 = throughput.default_impls("cpu", bf16_emulated=False)
    without = throughput.default_impls("cpu", bf16_emulated=True)
    assert "cvtlab-bf16-compiled" in with_bf16 and "cvtlab-compiled" not in with_bf16
    assert without == ["cvtlab", "cvtlab-compiled"] + with_bf16[1:]
    assert "cvtlab-compiled" not in throughput.default_impls("cuda", bf16_emulated=True)


def test_throughput_benchmark_names_an_unknown_implementation(capsys):
    import throughput

    with pytest.raises(SystemExit):
        throughput.main(["--quick", "--impls", "cvtlab,cvtlab-fp16", "--no-write"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--impls" in err and "'cvtlab-fp16'" in err and "cvtlab-compiled" in err


def test_throughput_benchmark_compares_the_same_network():
    """cvtlab and transformers are timed on one network: same parameter count, and neither
    pays for stochastic depth that the other skips."""
    pytest.importorskip("transformers")
    import throughput
    from timm.layers import DropPath

    case = throughput.Case("cvt_13@64", "cvt_13", 64, 2, {})
    _, ours, _, _ = throughput.build("cvtlab", case, "cpu")
    _, theirs, _, _ = throughput.build("transformers", case, "cpu")
    assert not any(isinstance(m, DropPath) for m in ours.modules())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)


def test_data_benchmark_runs(shapes_small):
    import data as data_bench

    rates = data_bench.main(["--data", str(shapes_small), "--quick", "--no-write"])
    photos = rates.pop("d_photos")
    erasing = rates.pop("e_erasing_ms")
    kept = rates.pop("f_kept_small")
    # Kept at 64 px, Tiny ImageNet takes (64/224)^2 of the 224-px entry's bytes (plus headers).
    sizes = kept["bytes"]
    assert sizes["decoded_224px"] / sizes["kept_64px"] == pytest.approx((224 / 64) ** 2, rel=0.01)
    assert all(ms > 0 for ms in kept["ms_per_batch"].values())
    assert set(rates) == {"a_decode_zip_pil", "b_cache_crop_flip", "c_cache_full_recipe"}
    assert all(v > 0 for v in rates.values())
    assert photos["full_decode"] > 0 and photos["draft_decode"] > 0
    assert photos["mean_abs_diff_grey_levels"] < 1.0
    assert set(erasing) == {"8x32px"}
    assert all(ms > 0 for ms in erasing["8x32px"].values())


def test_tta_benchmark_runs(shapes_small, tmp_path, monkeypatch):
    import tta

    result = tta.main(
        [
            "--config",
            "demo",
            "--data",
            str(shapes_small),
            "--minutes",
            "0.2",
            "--deadline",
            "600",
            "--out",
            str(tmp_path),
            "--no-write",
            "--json",
            str(tmp_path / "result.json"),
        ]
    )
    # --json holds what the result file would, with the machine that ran it.
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["machine"]["cores"] >= 1
    assert written["metrics"]["test_top1"] == result["metrics"]["test_top1"]
    assert result["budget_minutes"] == 0.2  # a distant deadline leaves --minutes as it is
    assert 0.0 <= result["metrics"]["test_top1"] <= 1.0
    assert 0.0 <= result["metrics"]["test_top1_flip_shift2"] <= 1.0
    assert result["curve"] and result["curve"][0]["elapsed_s"] > 0
    # demo tests its best checkpoint; the last one is scored beside it, named.
    assert result["metrics"]["test_checkpoint"].endswith("best.ckpt")
    other = result["metrics"]["test_top1_other_checkpoint"]
    assert other["checkpoint"] == "last.ckpt" and 0.0 <= other["top1"] <= 1.0


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pins two runs to two cores (Linux)",
)
def test_tta_pair_trains_two_recipes_side_by_side_and_compares_them(shapes_small, tmp_path):
    import tta_pair

    from cvtlab.train.config import recipe_path

    other = tmp_path / "demo_decay.yaml"
    other.write_text(
        recipe_path("demo").read_text().replace("weight_decay: 0.05", "weight_decay: 0.1")
    )
    out = tmp_path / "pair"
    result = tta_pair.main(
        ["demo", str(other), "--minutes", "0.1", "--data", str(shapes_small), "--out", str(out)]
    )
    a, b = result["runs"]
    assert (a["run"], b["run"]) == ("demo/run", "demo_decay/run")  # named after the recipes
    assert a["finished"] and b["finished"] and a["steps"] > 0 and b["steps"] > 0
    assert all(0.0 <= run["test_top1_flip"] <= 1.0 for run in (a, b))
    assert result["differences"] == {"weight_decay": {"demo/run": 0.05, "demo_decay/run": 0.1}}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_tta_deadline_shrinks_the_budget_to_leave_time_for_the_tests(shapes_small, monkeypatch):
    import argparse

    import tta

    args = argparse.Namespace(
        config="demo", data=str(shapes_small), minutes=10.0, deadline=200.0, reserve=40.0
    )
    monkeypatch.setattr(tta, "STARTED", time.time() - 100)  # 100 s already spent
    minutes = tta.fit_to_deadline(args, tta.train_images)
    assert 0.5 < minutes < 1.0  # 200 - 100 - 40 s, less the decoding
    args.minutes = 0.5
    assert tta.fit_to_deadline(args, tta.train_images) == 0.5  # --minutes is the upper bound
    args.deadline = 150.0  # 150 - 100 - 40 = 10 s: too little to train
    with pytest.raises(SystemExit, match="--deadline 150: only"):
        tta.fit_to_deadline(args, tta.train_images)


def test_pipeline_benchmark_runs():
    import pipeline

    result = pipeline.main(
        ["--config", "demo", "--sizes", "32", "--workers", "0", "--steps", "2", "--no-write"]
    )
    (row,) = result["rows"]
    assert row["size"] == 32 and row["model_step"]["images_per_second"] > 0
    assert row["pipeline_workers_0"] > 0
    result = pipeline.main(
        ["--config", "demo", "--sizes", "32", "--workers", "", "--batch-sizes", "16",
         "--steps", "1", "--no-write"]
    )  # fmt: skip
    (row,) = result["rows"]
    assert row["model_step_batch_16"]["images_per_second"] > 0
    assert not any(k.startswith("pipeline_workers") for k in row)


def test_optimizer_benchmark_times_both_adamw_kernels_and_the_muon_steps():
    import optimizer

    payload = optimizer.main(
        ["--models", "cvt_seed", "--steps", "1", "--repeats", "1", "--no-write"]
    )
    r = payload["models"]["cvt_seed"]
    assert r["parameters"] > 0 and r["foreach_ms"] > 0 and r["fused_ms"] > 0
    muon = payload["muon"]
    # The recipe's 29 Muon weights repeat in 9 shapes: 9 batched orthogonalisations a step.
    assert (muon["recipe"], muon["weights"], muon["shapes"]) == ("cpu_30min", 29, 9)
    import torch

    from cvtlab.train.precision import bf16_is_emulated, product_rates

    rates = product_rates(256, rounds=3)
    measured = ["fp32"]
    if bf16_is_emulated(rates[torch.float32], rates[torch.bfloat16]):
        # A CPU without bf16 instructions (AMD Zen 3): left out with a note, not timed.
        assert "no bf16 instructions" in muon["bf16"]["note"]
        assert "batched_ms" not in muon["bf16"]
    else:
        measured.append("bf16")
    for dtype in measured:
        assert muon[dtype]["per_weight_ms"] > 0 and muon[dtype]["batched_ms"] > 0
    # The Gram and spectral forms' baselines are timed in fp32, the only dtype that takes them.
    fp32 = muon["fp32"]
    for form in ("gram", "spectral"):
        assert fp32[f"no_{form}_form_ms"] > 0 and fp32[f"{form}_form_speedup"] > 0
        assert all(f"no_{form}_form_ms" not in muon[d] for d in measured if d != "fp32")
    # Exact orthogonalisation (muon_exact) runs in fp32 whatever the run's dtype: timed once.
    assert fp32["exact_ms"] > 0 and fp32["exact_speedup"] > 0
    assert all("exact_ms" not in muon[d] for d in measured if d != "fp32")


def test_recipe_step_benchmark_times_each_phase_of_the_schedule():
    import recipe_step
    import torch

    from cvtlab.models import layers
    from cvtlab.train.config import make_config
    from cvtlab.train.precision import bf16_is_emulated, product_rates

    # The 30-minute recipe: 32 px in batches of 256, then 64 px in batches of 96 from epoch 12.
    assert recipe_step.phases(make_config("cpu_30min")) == [(0, 32, 256), (12, 64, 96)]
    args = ["--max-batch", "2", "--steps", "1", "--repeats", "1", "--warmup", "1", "--no-write"]
    payload = recipe_step.main([*args, "--precision", "32"])
    assert payload["precision"] == "32"
    assert [(r["size"], r["batch"]) for r in payload["phases"]] == [(32, 2), (64, 2)]
    for row in payload["phases"]:
        r = row["recipe"]
        assert r["forward_backward_ms"] > 0 and r["optimizer_ms"] > 0
        assert r["step_ms"] == pytest.approx(r["forward_backward_ms"] + r["optimizer_ms"])
        assert "depthwise_bf16" not in row  # fp32 training has no bf16 variant to compare
    rates = product_rates(256, rounds=3)
    if not bf16_is_emulated(rates[torch.float32], rates[torch.bfloat16]):
        payload = recipe_step.main([*args, "--precision", "bf16-mixed"])
        for row in payload["phases"]:
            assert row["depthwise_bf16"]["step_ms"] > 0 and row["depthwise_bf16_slowdown"] > 0
    assert layers.FP32_DEPTHWISE_ON_CPU  # the variant leaves training's setting as it was


def test_ema_horizons_scores_each_average_on_the_tested_step(shapes_small, tmp_path):
    import ema_horizons

    from cvtlab.train.config import recipe_path

    recipe = tmp_path / "demo_ema.yaml"
    recipe.write_text(recipe_path("demo").read_text() + "\nema_decay: 0.99\n")
    result = ema_horizons.main(
        [
            "--config",
            str(recipe),
            "--data",
            str(shapes_small),
            "--minutes",
            "0.15",
            "--average",
            f"0.99:{2 / 3}",  # kept as the recipe keeps its own: must end equal to it
            "--average",
            "0.9:1",
            "--average",
            "0.999:1:4",  # a quarter of the steps so far: the cap is never reached
            "--out",
            str(tmp_path / "out"),
            "--json",
            str(tmp_path / "horizons.json"),
        ]
    )
    rows = result["averages"]
    names = ["trained", "recipe_ema", f"average 0.99:{2 / 3:g}", "average 0.9:1"]
    assert list(rows) == [*names, "average 0.999:1:4"]
    same = rows[f"average 0.99:{2 / 3:g}"]
    assert same["max_abs_diff_from_recipe_ema"] < 1e-6
    assert same["top1"] == rows["recipe_ema"]["top1"]
    assert rows["recipe_ema"]["top1"] == result["metrics"]["test_top1"]
    steps = result["metrics"]["steps"]
    assert rows["average 0.9:1"]["final_decay"] == min(0.9, 1 - 1 / steps)
    assert rows["average 0.9:1"]["max_abs_diff_from_recipe_ema"] > 0
    assert rows["average 0.999:1:4"]["final_decay"] == pytest.approx(1 - 1 / (1 + (steps - 1) / 4))
    for row in rows.values():
        assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["top1_flip_shift2"] <= 1.0
    assert json.loads((tmp_path / "horizons.json").read_text())["averages"] == rows
    with pytest.raises(SystemExit):
        ema_horizons.main(["--config", "demo", "--minutes", "1", "--average", "0.999"])

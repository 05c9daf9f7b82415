"""``cvtlab demo``: the whole workflow on a generated dataset, on any machine, offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..data.synthetic import make_synthetic_tiny_imagenet
from .config import make_config, recipe_path


def run_demo(out: str | Path = "runs/demo", minutes: float | None = None) -> dict:
    out = Path(out)
    data = out / "data" / "shapes-10"
    if not (data / "wnids.txt").is_file():
        print(f"generating a 10-class dataset of shapes and textures in {data} …")
        make_synthetic_tiny_imagenet(data)
    run = out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    flags = {"data": str(data), "out": str(run), "accelerator": "cpu", "devices": 1}
    if minutes:
        flags["max_minutes"] = minutes  # an optional cap; by default the recipe's epochs decide
    cfg = make_config(recipe_path("demo"), **flags)
    print(f"training {cfg.model} for {cfg.epochs} epochs on {data} → {run}")
    from ..prediction import predict
    from .run import train

    metrics = train(cfg)
    samples = [data / "test" / "images" / f"test_{k}.JPEG" for k in range(4)]
    best = run / "checkpoints" / "best.ckpt"
    print("\npredictions on unlabelled test images:")
    for result in predict(str(best), [str(s) for s in samples], topk=2):
        top = ", ".join(f"{p['class']} {p['probability']:.2f}" for p in result["predictions"])
        print(f"  {Path(result['image']).name}: {top}")
    print(
        f"\ntest top-1 {metrics['test_top1']:.3f} (chance 0.100), top-5 {metrics['test_top5']:.3f}, "
        f"{metrics['train_images_per_second']:.0f} train images/s, {metrics['train_seconds']:.0f} s of training"
    )
    print(f"run folder:  {run}")
    print(f"  metrics:   {run / 'metrics.json'}  {run / 'metrics.csv'}")
    print(f"  report:    {run / 'report'} (curves.png, test_predictions.png, confused_pairs.png)")
    print(f"  weights:   {best}")
    print(f"next: cvtlab eval --checkpoint {best}   |   cvtlab predict --checkpoint {best} IMAGE…")
    (out / "latest.json").write_text(json.dumps({"run": str(run), **metrics}, indent=2))
    return metrics

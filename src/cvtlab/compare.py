"""``cvtlab compare``: several run folders side by side. Their test and validation figures,
steps, time and speed in one table, the settings in which their ``config.yaml`` files differ,
and (with a plot path) validation top-1 against training time and against steps.

Runs still in progress (no ``metrics.json`` yet) are compared on the epochs they have logged.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml

from .errors import CvtLabError

# Settings that differ between any two runs without saying anything about them.
_IGNORED_SETTINGS = {"out", "resume"}


def _number(text: str) -> float | int | None:
    if text in ("", None):
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def read_history(path: Path) -> list[dict]:
    """The rows of a run's ``metrics.csv`` (one per epoch), numbers as numbers."""
    try:
        with open(path, newline="") as f:
            return [{k: _number(v) for k, v in row.items() if k} for row in csv.DictReader(f)]
    except (ValueError, csv.Error) as e:
        raise CvtLabError(f"{path}: not a metrics.csv cvtlab wrote ({e})") from None


def _read_mapping(path: Path, parse) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = parse(path.read_text())
    except (ValueError, yaml.YAMLError) as e:
        raise CvtLabError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CvtLabError(f"{path}: expected a mapping, found {type(data).__name__}")
    return data


def load_run(folder: str | Path) -> dict:
    """A run folder's config, final metrics (None while it runs) and epoch history."""
    folder = Path(folder)
    config = _read_mapping(folder / "config.yaml", yaml.safe_load)
    metrics = _read_mapping(folder / "metrics.json", json.loads)
    history_path = folder / "metrics.csv"
    history = read_history(history_path) if history_path.is_file() else []
    if config is None and metrics is None and not history_path.is_file():
        what = "no such folder" if not folder.exists() else "no config.yaml or metrics file in it"
        raise CvtLabError(f"{folder}: not a cvtlab run folder ({what})")
    return {"path": str(folder), "config": config, "metrics": metrics, "history": history}


def _labels(paths: list[str]) -> list[str]:
    """The shortest trailing parts of each path that tell the runs apart."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same folder given twice


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def setting_differences(configs: dict[str, dict | None]) -> dict[str, dict]:
    """``{setting: {run: value}}`` for each setting (nested ones dotted: ``augment.crop``)
    whose value is not the same in every run that has a ``config.yaml``."""
    flat = {label: _flatten(cfg) for label, cfg in configs.items() if cfg is not None}
    keys = sorted({k for f in flat.values() for k in f} - _IGNORED_SETTINGS)
    differences = {}
    for key in keys:
        # A setting one config lacks (written by an older cvtlab) reads as null.
        values = {label: f.get(key) for label, f in flat.items()}
        if len({json.dumps(v, default=str, sort_keys=True) for v in values.values()}) > 1:
            differences[key] = values
    return differences


def history_figures(rows: list[dict]) -> dict:
    """What a run's epoch rows say: the best validation epoch and its figures, epochs, steps,
    the images trained, the training speed over the whole run and the seconds of training
    (``metrics.json`` holds these)."""
    scored = [r for r in rows if r.get("val_top1") is not None]
    best = max(scored, key=lambda r: r["val_top1"]) if scored else {}
    timed = [r for r in rows if r.get("train_images_per_second")]
    images = [r.get("train_images") for r in timed]
    if timed and all(isinstance(n, int) for n in images):
        # All the images over all the seconds spent training them: epochs at other sizes or
        # batches (progressive resizing) count for the time they took, as a median would not.
        seconds = sum(n / r["train_images_per_second"] for n, r in zip(images, timed))
        speed, total = sum(images) / seconds, sum(images)
    else:  # a run logged before its epochs recorded their images
        speeds = [r["train_images_per_second"] for r in timed]
        speed, total = (float(statistics.median(speeds)) if speeds else None), None
    return {
        "val_top1": best.get("val_top1"),
        "val_top5": best.get("val_top5"),
        "best_epoch": best.get("epoch"),
        "epochs": len(rows),
        "steps": rows[-1]["step"] if rows else 0,
        "train_images": total,
        "train_images_per_second": speed,
        "train_seconds": rows[-1]["elapsed_s"] if rows else 0.0,
    }


def _summary(label: str, run: dict) -> dict:
    """The figures of one run: from ``metrics.json`` when it finished, else from its history."""
    m = run["metrics"] or {}
    figures = history_figures(run["history"])
    figures.update({key: m[key] for key in figures if key in m})
    return {
        "run": label,
        "path": run["path"],
        "finished": run["metrics"] is not None,
        "test_top1": m.get("test_top1"),
        # With five classes or fewer every label is among the five best guesses.
        "test_top5": None if m.get("num_classes", 6) <= 5 else m.get("test_top5"),
        **figures,
        "precision": m.get("precision"),
        "machine": m.get("machine"),
        "history": run["history"],
    }


def compare_runs(folders: list[str | Path]) -> dict:
    """Compare run folders: ``{"runs": [figures per run], "differences": {setting: {run:
    value}}, "configs_compared": how many runs had a config.yaml}``."""
    if not folders:
        raise CvtLabError("compare needs at least one run folder")
    runs = [load_run(f) for f in folders]
    labels = _labels([r["path"] for r in runs])
    return {
        "runs": [_summary(label, run) for label, run in zip(labels, runs)],
        "differences": setting_differences(
            {label: run["config"] for label, run in zip(labels, runs)}
        ),
        "configs_compared": sum(run["config"] is not None for run in runs),
    }


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _machine(machine: dict | None) -> str:
    if not machine:
        return "—"
    text = machine.get("cpu") or "?"
    if "cpu_family" in machine and "cpu_model" in machine:
        # One CPU name can cover generations of different speed (AMD Zen 3 and 4: "AMD EPYC").
        text += f" (family {machine['cpu_family']} model {machine['cpu_model']})"
    text += f", {machine.get('cores') or '?'} cores"
    if machine.get("gpu"):
        count = machine.get("gpus") or 1
        text += f" + {machine['gpu']}" + (f" x{count}" if count > 1 else "")
    return text


def format_comparison(result: dict) -> str:
    """The comparison as a text table, then the differing settings."""
    header = ("run", "test top-1", "test top-5", "best val top-1", "epochs", "steps", "minutes",
              "img/s", "precision", "machine")  # fmt: skip
    table = [header]
    for r in result["runs"]:
        best = _percent(r["val_top1"])
        if r["best_epoch"] is not None:
            best += f" (epoch {r['best_epoch']})"
        ips = r["train_images_per_second"]
        table.append(
            (
                r["run"] + ("" if r["finished"] else " (running or stopped)"),
                _percent(r["test_top1"]),
                _percent(r["test_top5"]),
                best,
                str(r["epochs"]),
                str(r["steps"]),
                f"{r['train_seconds'] / 60:.1f}",
                "—" if ips is None else f"{ips:.0f}",
                r["precision"] or "—",
                _machine(r["machine"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i in (0, 3, 8, 9) else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in table
    ]  # fmt: skip
    differences = result["differences"]
    if len(result["runs"]) < 2:
        return "\n".join(lines)
    if result["configs_compared"] < 2:
        lines.append("settings: not compared (fewer than two runs have a config.yaml)")
    elif not differences:
        lines.append("settings: the same in every run")
    else:
        lines.append("settings that differ:")
        for key, values in differences.items():
            shown = " | ".join(f"{label}: {_setting(v)}" for label, v in values.items())
            lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


def _setting(value) -> str:
    if value is None:
        return "—"
    return json.dumps(value) if isinstance(value, list) else str(value)


__all__ = ["compare_runs", "format_comparison", "load_run", "setting_differences"]

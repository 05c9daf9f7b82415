"""Weight averages compared along one training run: the trained weights and EMAs of several
horizons kept side by side on the same trajectory, each scored on the test split at the end.

Two runs of one recipe differ by about 0.15 points of test top-1 (the 30-minute recipe on one
machine), as much as a change of the averaging is worth; averages kept along the same run differ
only by the averaging, so one run compares them.

    python benchmarks/ema_horizons.py --config cpu_30min --minutes 30 \\
        --average 0.999:1 --average 0.9995:1 --json /tmp/horizons.json

Each ``--average DECAY:POWER[:GAMMA]`` keeps timm's ``ModelEmaV3`` with that decay and warm-up:
at step s the decay is min(DECAY, 1 - (1 + s/GAMMA)^-POWER) (GAMMA 1 unless given). POWER 1 is
the plain mean of the steps so far until the cap is reached, after 1/(1 - DECAY) steps; with 2/3
(timm's default, and ``ema_warmup_power``'s) 0.999 is reached only after 31,623 steps. With
POWER 1 and a GAMMA over 1 the average spans about 1/GAMMA of the steps so far, until the cap: a
horizon that shortens with the run, as on a slower machine. The recipe's own EMA, when it keeps
one, and the trained weights are scored beside them, all at the last step (the recipe's
``test_checkpoint`` is set to ``last``). Each average is tested as the recipe's
checkpoint with its weights in place of the recipe's EMA: plain, flip-averaged and with the
2-pixel views (as ``tta.py``). The averages cost a little of the step's time, so the run makes
somewhat fewer steps than the recipe alone; they are compared with each other, not with other
runs. A killed run is not resumed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from timm.utils import ModelEmaV3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TINY_ZIP, machine  # noqa: E402

from cvtlab.errors import CvtLabError  # noqa: E402
from cvtlab.evaluation import evaluate  # noqa: E402
from cvtlab.train.config import make_config  # noqa: E402
from cvtlab.train.run import train  # noqa: E402


def parse_average(text: str) -> tuple[float, float, float]:
    """``DECAY:POWER[:GAMMA]`` (``0.999:1``) → (0.999, 1.0, 1.0); a one-line error names the
    value."""
    try:
        parts = [float(part) for part in text.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--average {text}: expected DECAY:POWER[:GAMMA], e.g. 0.999:1"
        ) from None
    decay, power, gamma = (*parts, 1.0)[:3]
    if not 0 < decay < 1 or power <= 0 or gamma <= 0:
        raise argparse.ArgumentTypeError(
            f"--average {text}: need 0 < DECAY < 1, POWER > 0 and GAMMA > 0"
        )
    return decay, power, gamma


def final_decay(decay: float, power: float, steps: int, gamma: float = 1.0) -> float:
    """The decay an average applies at its last step (the warm-up may not have reached DECAY)."""
    return min(decay, 1 - (1 + max(steps - 1, 0) / gamma) ** -power)


class KeepAverages(Callback):
    """Updates one ``ModelEmaV3`` per (decay, power, gamma) after every optimiser step, as the
    module updates its own EMA."""

    def __init__(self, specs: list[tuple[float, float, float]]):
        self.specs = specs
        self.averages: dict[str, ModelEmaV3] = {}
        self.update_seconds = 0.0

    def on_fit_start(self, trainer, module) -> None:
        for decay, power, gamma in self.specs:
            ema = ModelEmaV3(
                module.model,
                decay=decay,
                use_warmup=True,
                warmup_power=power,
                warmup_gamma=gamma,
            )
            name = f"{decay:g}:{power:g}" + (f":{gamma:g}" if gamma != 1 else "")
            self.averages[name] = ema.requires_grad_(False)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        start = time.perf_counter()
        for ema in self.averages.values():
            ema.update(module.model, step=trainer.global_step)
        self.update_seconds += time.perf_counter() - start


def weights_under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a checkpoint's state dict under ``prefix``, named without it."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def with_average(checkpoint: dict, weights: dict[str, torch.Tensor], decay: float) -> dict:
    """The checkpoint with ``weights`` as its EMA (``eval_model`` serves the EMA)."""
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ema.")}
    state.update({f"ema.module.{k}": v for k, v in weights.items()})
    hparams = {**checkpoint["hyper_parameters"], "ema_decay": decay}
    return {**checkpoint, "state_dict": state, "hyper_parameters": hparams}


def score(checkpoint: str, data: str) -> dict:
    plain = evaluate(checkpoint, data, "test")
    flip = evaluate(checkpoint, data, "test", flip=True)
    views = evaluate(checkpoint, data, "test", flip=True, shift=2)
    return {"top1": plain["top1"], "top1_flip": flip["top1"], "top1_flip_shift2": views["top1"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data", default=str(TINY_ZIP))
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument(
        "--average",
        type=parse_average,
        action="append",
        required=True,
        help="DECAY:POWER[:GAMMA] of an EMA kept beside the recipe's (repeat for several)",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--json", help="write the result to this file")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="ema-horizons-"))
    # The averages end on the last step, so the recipe's EMA and weights are scored there too.
    cfg = make_config(
        args.config,
        data=args.data,
        out=str(out / "run"),
        max_minutes=args.minutes,
        test_checkpoint="last",
    )
    keep = KeepAverages(args.average)
    start = time.time()
    metrics = train(cfg, extra_callbacks=[keep])
    steps = int(metrics["steps"])
    tested = metrics["test_checkpoint"]
    checkpoint = torch.load(tested, map_location="cpu", weights_only=True)
    trained = weights_under(checkpoint["state_dict"], "model.")
    if cfg.ema_decay > 0:
        # The recipe's checkpoint serves its EMA; the trained weights get one of their own.
        path = out / "trained.ckpt"
        torch.save(with_average(checkpoint, trained, cfg.ema_decay), path)
        rows = {"trained": {"checkpoint": str(path), **score(str(path), args.data)}}
        recipe = {
            "decay": cfg.ema_decay,
            "power": cfg.ema_warmup_power,
            "gamma": cfg.ema_warmup_gamma,
            "final_decay": final_decay(
                cfg.ema_decay, cfg.ema_warmup_power, steps, cfg.ema_warmup_gamma
            ),
        }
        rows["recipe_ema"] = {**recipe, "checkpoint": tested, **score(tested, args.data)}
    else:
        rows = {"trained": {"checkpoint": tested, **score(tested, args.data)}}
    recipe_ema = weights_under(checkpoint["state_dict"], "ema.module.")
    for (decay, power, gamma), (name, ema) in zip(args.average, keep.averages.items()):
        weights = ema.module.state_dict()
        path = out / f"average-{name.replace(':', '-')}.ckpt"
        torch.save(with_average(checkpoint, weights, decay), path)
        row = {"decay": decay, "power": power, "gamma": gamma}
        row["final_decay"] = final_decay(decay, power, steps, gamma)
        if recipe_ema:
            # The record that the averages ended on the tested checkpoint's step: an average
            # kept as the recipe keeps its own matches it to rounding.
            row["max_abs_diff_from_recipe_ema"] = max(
                (weights[k].float() - recipe_ema[k].float()).abs().max().item() for k in weights
            )
        rows[f"average {name}"] = {**row, "checkpoint": str(path), **score(str(path), args.data)}
    result = {
        "machine": machine(),
        "recipe": args.config,
        "budget_minutes": args.minutes,
        "config": cfg.to_dict(),
        "metrics": json.loads(json.dumps(metrics)),
        "averages": rows,
        "average_update_seconds": keep.update_seconds,
        "wall_seconds": time.time() - start,
    }
    print(f"{args.config}: {steps} steps; test top-1 plain / flip-averaged / with 2-px views")
    for name, row in rows.items():
        print(
            f"  {name:20s} {row['top1']:.4f}  {row['top1_flip']:.4f}  {row['top1_flip_shift2']:.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    try:
        main()
    except CvtLabError as e:
        print(f"ema_horizons: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)

"""Two recipes trained side by side under the same time budget, each pinned to one core, then
compared: a paired time-to-accuracy comparison that the machine's speed cannot tilt.

On the shared 2-core machines the same recipe's 30-minute figure moves by a point or more from
one hour to the next with the machine's speed, as much as most recipe changes are worth. Run at
the same time, the two recipes see the same hour. Each gets one core, so each makes the steps
of a slower machine (alone, one core ran the 30-minute recipe's step at 0.55-0.6x two cores'
speed; side by side at 64 px, slower again): the pair is compared, not each run with two-core
figures. `benchmarks/RESULTS.md`, attempts Z73-Z76.

    python benchmarks/tta_pair.py A.yaml B.yaml --minutes 30 --out /tmp/pair

Writes one folder per recipe under ``<out>``, named after the recipe's file (``a-``/``b-`` in
front where both names are the same), each with its run folder under ``run/``, log and result
JSON, and ``<out>/compare.png``; prints ``cvtlab compare``'s table with each run's flip-averaged
top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TINY_ZIP  # noqa: E402

from cvtlab.compare import compare_runs, format_comparison  # noqa: E402
from cvtlab.report import compare_curves  # noqa: E402

TTA = Path(__file__).resolve().parent / "tta.py"


def _pinned_to(core: int):
    return lambda: os.sched_setaffinity(0, {core})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs=2, metavar="RECIPE", help="two recipes (YAML or shipped name)")
    p.add_argument("--minutes", type=float, required=True, help="each run's training budget")
    p.add_argument("--data", default=str(TINY_ZIP))
    p.add_argument("--out", required=True)
    p.add_argument("--cores", default="0,1", help="the two cores, e.g. 0,1")
    args = p.parse_args(argv)
    if not hasattr(os, "sched_setaffinity"):
        p.error("pinning a run to a core needs Linux (os.sched_setaffinity)")
    available = os.sched_getaffinity(0)
    cores = [int(c) for c in args.cores.split(",") if c.strip().isdigit()]
    if len(cores) != 2 or cores[0] == cores[1] or not set(cores) <= available:
        p.error(f"--cores {args.cores}: name two different cores of {sorted(available)}")
    out = Path(args.out)
    stems = [Path(recipe).stem for recipe in args.recipes]
    sides = stems if stems[0] != stems[1] else [f"{ab}-{stem}" for ab, stem in zip("ab", stems)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for side, recipe, core in zip(sides, args.recipes, cores):
        (out / side).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(TTA), "--config", recipe, "--data", args.data]
        cmd += ["--minutes", str(args.minutes), "--out", str(out / side), "--no-write"]
        cmd += ["--json", str(out / side / "result.json")]
        with open(out / side / "log.txt", "w") as log:
            procs.append(
                subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_pinned_to(core)
                )
            )
    codes = [proc.wait() for proc in procs]
    for side, code in zip(sides, codes):
        if code:
            sys.exit(f"tta_pair: run {side} failed (exit {code}); see {out / side / 'log.txt'}")
    result = compare_runs([out / side / "run" for side in sides])
    compare_curves(result["runs"], out / "compare.png")
    print(format_comparison(result))
    for side, recipe, run in zip(sides, args.recipes, result["runs"]):
        flip = json.loads((out / side / "result.json").read_text())["metrics"]["test_top1_flip"]
        run["recipe"], run["test_top1_flip"] = recipe, flip
        print(f"{run['run']} ({recipe}): flip-averaged test top-1 {100 * flip:.2f}%")
    print(f"curves: {out / 'compare.png'}")
    return result


if __name__ == "__main__":
    main()

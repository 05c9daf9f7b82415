#!/usr/bin/env bash
# The GPU session in one script: throughput first, then time-to-accuracy. Each step ends well
# inside 10 minutes and writes its results to $OUT (default benchmarks/results/gpu).
#
# The dataset: ../shared/data/tiny-imagenet-200.zip when it is there; otherwise the zip staged
# in parts as .stage/tiny-imagenet-200.zip.part* (ignored by git; `split -n 4` of the zip, sent
# one part per call, each call copying it to /tmp/stage); otherwise time-to-accuracy is
# skipped and only throughput is measured.
# Time-to-accuracy trains for TTA_MINUTES (default 10, the goal's budget), less where the run,
# tests included, would not end inside TTA_TIMEOUT seconds (default 540). FIT_EPOCHS=1 fits the
# recipe's epochs to the budget with a probe first (for recipes without budget_schedule).
# TTA_CONFIG names the recipe (default tiny_imagenet_scratch; a shipped name or a YAML in the
# tree), e.g. benchmarks/configs/tiny_imagenet_scratch_muon.yaml, the GPU recipe with Muon.
# Optional wheels (vit-pytorch) travel in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 CVTLAB_CACHE=${CVTLAB_CACHE:-/tmp/cvtlab-cache}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SHA=722886dd4352b40d7d1500d9f24f26a0ad63592ab7c5d731ebed384f9f13cf60
DATA=""
if [ -f ../shared/data/tiny-imagenet-200.zip ]; then
  DATA=../shared/data/tiny-imagenet-200.zip
elif ls .stage/tiny-imagenet-200.zip.part* /tmp/stage/tiny-imagenet-200.zip.part* >/dev/null 2>&1; then
  # Parts may arrive in the repo's .stage/ or, copied there by earlier calls, in /tmp/stage/.
  mkdir -p /tmp/stage && cp -n .stage/tiny-imagenet-200.zip.part* /tmp/stage/ 2>/dev/null
  cat /tmp/stage/tiny-imagenet-200.zip.part* > /tmp/tiny-imagenet-200.zip
  if echo "$SHA  /tmp/tiny-imagenet-200.zip" | sha256sum -c --quiet; then DATA=/tmp/tiny-imagenet-200.zip
  else echo "staged parts are incomplete: time-to-accuracy skipped"; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_THROUGHPUT:-0}" != 1 ]; then
  timeout "${THROUGHPUT_TIMEOUT:-240}" python3 benchmarks/throughput.py --device cuda --batch-scale 4 --repeats 3 --memory 2>&1 \
    | grep -v Warning | tee "$OUT/throughput.log"
  find benchmarks/results -name 'throughput-gpu-*.json' -newer "$OUT/gpu.txt" -exec cp {} "$OUT/" \;
fi
if [ -n "$DATA" ] && [ "${SKIP_TTA:-0}" != 1 ]; then
  # --deadline: decoding the zip on a bare machine takes a varying while, and a run cut by the
  # timeout before its test leaves no figure, so the training budget shrinks to fit.
  TTA_TIMEOUT=${TTA_TIMEOUT:-540}
  timeout "$TTA_TIMEOUT" python3 benchmarks/tta.py --config "${TTA_CONFIG:-tiny_imagenet_scratch}" --data "$DATA" \
    --minutes "${TTA_MINUTES:-10}" --deadline $((TTA_TIMEOUT - 10)) \
    $([ "${FIT_EPOCHS:-0}" = 1 ] && echo --fit-epochs) --out /tmp/tta 2>&1 | tr "\r" "\n" | grep -vE "Warning|it/s|^\s*$" | tail -40 | tee "$OUT/tta.log"
  # Only this run's result (older ones in the tree would use up the files a call returns), and
  # the run's own metrics.json, which holds the test figure even if the flip-averaged one is cut.
  find benchmarks/results -name 'tta-*-gpu-*.json' -newer "$OUT/gpu.txt" -exec cp {} "$OUT/" \;
  cp /tmp/tta/run/metrics.csv "$OUT/tta-metrics.csv" 2>/dev/null
  cp /tmp/tta/run/metrics.json "$OUT/tta-run-metrics.json" 2>/dev/null
fi
ls -la "$OUT"

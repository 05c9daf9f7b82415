"""`precision: auto`: the training precision follows what this machine runs fastest."""

import pytest
import torch

from cvtlab.train import precision
from cvtlab.train.precision import choose_cpu_precision, product_rates, resolve_precision


@pytest.mark.parametrize(
    "bf16_over_fp32, chosen",
    [
        (6.4, "bf16-mixed"),  # a Xeon with AMX (benchmarks/RESULTS.md)
        (2.2, "bf16-mixed"),  # an AMD Zen 4: AVX-512 bf16 dot products
        (0.55, "32"),  # a Xeon whose AMX the hypervisor hides
        (0.01, "32"),  # an AMD Zen 3: no bf16 instructions
        (0.12, "32"),  # another AMD Zen 3 host, whose emulation runs faster
        (1.0, "32"),  # no faster products: autocast's casts would only cost
    ],
)
def test_cpu_choice_follows_the_product_rates(bf16_over_fp32, chosen):
    assert choose_cpu_precision(200.0, 200.0 * bf16_over_fp32) == chosen


def test_auto_measures_this_cpu_and_explicit_values_pass_through(monkeypatch):
    monkeypatch.delenv("CVTLAB_AUTO_PRECISION", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    rates = product_rates(n=256, rounds=3)
    assert all(r > 0 for r in rates.values())
    chosen, why = resolve_precision("auto", "cpu")
    assert chosen in ("32", "bf16-mixed")
    assert "x the fp32 rate on this CPU" in why
    assert resolve_precision("16-mixed", "cpu") == ("16-mixed", "as configured")
    assert resolve_precision("auto", "mps")[0] == "32"


def test_ddp_processes_take_the_first_process_choice(monkeypatch):
    # Lightning re-runs the command for the other processes on a machine (LOCAL_RANK > 0); a
    # second measurement could differ, so they take the first process's choice instead.
    monkeypatch.delenv("CVTLAB_AUTO_PRECISION", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    first, _ = resolve_precision("auto", "cpu")
    other = "bf16-mixed" if first == "32" else "32"
    monkeypatch.setenv("CVTLAB_AUTO_PRECISION", other)  # as if the first process had chosen it
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_precision("auto", "cpu") == (other, "auto, chosen by the run's first process")
    monkeypatch.setenv("LOCAL_RANK", "0")  # a first process measures; it never inherits
    assert "x the fp32 rate on this CPU" in resolve_precision("auto", "cpu")[1]


@pytest.mark.parametrize(
    "bf16_over_fp32, sizes", [(0.01, [256]), (0.12, [256]), (0.55, [256, 1024])]
)
def test_emulated_bf16_is_settled_by_the_small_probe(monkeypatch, bf16_over_fp32, sizes):
    # Without bf16 instructions a 1,024-square bf16 product takes seconds (Zen 3: 0.8 GFLOP/s),
    # so the full measurement would add half a minute to every run's start; the probe decides.
    timed = []

    def fake_rates(n, rounds):
        timed.append(n)
        return {torch.float32: 100.0, torch.bfloat16: 100.0 * bf16_over_fp32}

    monkeypatch.setattr(precision, "_timed_rates", fake_rates)
    rates = product_rates(n=1024)
    assert timed == sizes
    assert choose_cpu_precision(rates[torch.float32], rates[torch.bfloat16]) == "32"

"""What a result was measured on: the CPU's identity in every run's metrics and result file."""

import os
import sys
from pathlib import Path

from cvtlab.compare import _machine
from cvtlab.machine import cpu_info, describe_machine

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni sha_ni

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: another CPU
flags\t\t: fpu avx2 amx_tile amx_bf16
"""


def test_cpuinfo_tells_cpus_of_one_name_apart(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4)
    assert cpu_info(path) == {
        "cpu": "AMD EPYC 9B14",
        "cpu_vendor": "AuthenticAMD",
        "cpu_family": 25,
        "cpu_model": 17,  # from "model", not from "model name"
        "cpu_extensions": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"],
    }
    assert cpu_info(tmp_path / "missing") == {}  # macOS, Windows: the basic description only


def test_benchmark_result_files_are_named_per_cpu_type():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from common import machine_tag

    info = describe_machine()
    tag = machine_tag()
    if "gpu" in info:
        assert tag.startswith("gpu-")
        return
    assert tag.startswith(f"cpu-{os.cpu_count()}core")
    if "cpu_family" in info:  # Linux on x86: the family and model number are in the name
        assert tag.endswith(f"-f{info['cpu_family']}m{info['cpu_model']}")


def test_compare_tells_runs_on_cpus_of_one_name_apart():
    zen3 = {"cpu": "AMD EPYC", "cores": 2, "cpu_family": 25, "cpu_model": 1}
    zen4 = {**zen3, "cpu_model": 17}
    assert _machine(zen3) == "AMD EPYC (family 25 model 1), 2 cores"
    assert _machine(zen3) != _machine(zen4)
    # Runs recorded before the family and model were: the name and cores alone.
    assert _machine({"cpu": "AMD EPYC", "cores": 2}) == "AMD EPYC, 2 cores"

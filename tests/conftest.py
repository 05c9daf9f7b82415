import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_ZIP = REPO.parent / "shared" / "data" / "tiny-imagenet-200.zip"

# Tests run on two cores; more threads only add contention with the pytest process itself.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def process_settings_restored():
    """A test that changes process-wide settings does not change them for the tests after it:
    torch's (a benchmark's ``main`` pins one thread), as in-process runs are compared with runs in
    fresh processes bit for bit, and the environment (the choice a run with ``precision: auto``
    leaves there for DDP's later processes, which every process started later would inherit)."""
    threads, matmul = torch.get_num_threads(), torch.get_float32_matmul_precision()
    with mock.patch.dict(os.environ):
        yield
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(matmul)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test (and every process it starts) uses a fresh cache folder, never ~/.cache."""
    path = tmp_path_factory.mktemp("cvtlab-cache")
    old = os.environ.get("CVTLAB_CACHE")
    os.environ["CVTLAB_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CVTLAB_CACHE", None)
    else:
        os.environ["CVTLAB_CACHE"] = old


@pytest.fixture(scope="session")
def shapes_small(tmp_path_factory) -> Path:
    """A small generated dataset in the Tiny ImageNet layout (10 classes, 60 train images each)."""
    from cvtlab.data.synthetic import make_synthetic_tiny_imagenet

    return make_synthetic_tiny_imagenet(
        tmp_path_factory.mktemp("shapes") / "shapes",
        train_per_class=60,
        val_per_class=10,
        test_images=8,
    )


@pytest.fixture
def tiny_zip() -> Path:
    if not TINY_ZIP.is_file():
        pytest.skip(f"real Tiny ImageNet zip not found at {TINY_ZIP}")
    return TINY_ZIP


def run_cli_here(*args: str) -> subprocess.CompletedProcess:
    """Run ``cvtlab`` in this process, capturing stdout, stderr and the exit status.

    For the many one-line-error cases: the same ``main`` as the entry point, without paying
    a fresh interpreter and torch import (about 5 s) per case. ``run_cli`` covers the entry
    point itself.
    """
    import contextlib
    import io

    from cvtlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own exits (bad flags, --help)
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["cvtlab", *args], code, out.getvalue(), err.getvalue())


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd=None):
    """Run the installed ``cvtlab`` entry point in a fresh process."""
    cmd = [sys.executable, "-m", "cvtlab.cli", *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd
    )

import json
import re
import subprocess
import sys

import pytest
import torch

import cvtlab
from cvtlab.summary import format_summary, summarize

from .conftest import run_cli_here


def test_seed_summary_shows_the_notebooks_shape_chain():
    s = summarize(cvtlab.create_model("cvt_seed"))
    shapes = [tuple(layer["output_shape"]) for layer in s["layers"]]
    chain = [(3, 64, 64), (64, 16, 16), (256, 64), (256, 64), (256, 256), (256, 64), (200,)]
    it = iter(shapes)
    assert all(any(shape == want for shape in it) for want in chain), shapes
    types = [layer["type"] for layer in s["layers"]]
    assert "MultiheadAttention" in types


def test_cvt13_macs_match_the_paper():
    with torch.device("meta"):
        model = cvtlab.create_model("cvt_13")
    assert summarize(model, 224)["total_macs"] == pytest.approx(4.5e9, rel=0.10)


def test_attention_products_are_counted():
    s = summarize(cvtlab.create_model("cvt_13_64"))
    attn = [r for r in s["layers"] if r["type"] == "ConvAttention"]
    first = attn[0]
    # Stage 1 at 64 px with a stride-2 stem: 32×32 queries, 16×16 keys, width 64.
    assert first["macs"] == 2 * 1024 * 256 * 64
    assert s["total_macs"] == sum(r["macs"] for r in s["layers"])


def test_summary_params_add_up_to_the_model():
    model = cvtlab.create_model("cvt_seed")
    s = summarize(model)
    assert s["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(r["params"] for r in s["layers"]) == s["total_params"]


def test_markdown_and_table_formats():
    s = summarize(cvtlab.create_model("cvt_seed"))
    md = format_summary(s, "markdown")
    assert md.splitlines()[0].startswith("| layer | type | output shape")
    table = format_summary(s, "table")
    assert "(256, 64)" in table and "total" in table.splitlines()[-1]


def test_cli_summary_json_schema():
    r = run_cli_here(
        "summary", "cvt_seed", "--img-size", "64", "--num-classes", "200", "--format", "json"
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"model", "img_size", "layers", "total_params", "total_macs"}
    assert data["model"] == "cvt_seed" and data["img_size"] == 64
    assert set(data["layers"][0]) == {"name", "type", "output_shape", "params", "macs"}
    assert data["layers"][-1]["output_shape"] == [200]


def test_cli_summary_of_a_recipe_shows_the_model_it_trains(tmp_path):
    from cvtlab.train.config import make_config

    cfg = make_config("cpu_30min")
    r = run_cli_here("summary", "cpu_30min", "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    with torch.device("meta"):
        trained = cvtlab.create_model(cfg.model, **cfg.model_overrides)
    assert data["model"] == cfg.model
    assert data["total_params"] == sum(p.numel() for p in trained.parameters())
    # The last stage's keys follow the recipe's stride on its 4×4 grid (3×3 conv, padding 1),
    # through their own projection or one they share (`shared_projection`).
    stride = trained.cfg.stride_kv[-1]
    keys = [
        row for row in data["layers"] if re.search(r"attn\.conv_proj_q?kv?\.conv$", row["name"])
    ]
    side = (4 - 1) // stride + 1
    assert keys[-1]["output_shape"] == [trained.cfg.dims[-1], side, side]
    recipe = tmp_path / "wide.yaml"
    recipe.write_text("model: cvt_xs_64\nmodel_overrides:\n  dims: [64, 128, 320]\n")
    r = run_cli_here("summary", str(recipe), "--img-size", "32", "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["img_size"] == 32 and data["layers"][-2]["output_shape"][-1] == 320


def test_cli_models_lists_every_model():
    r = run_cli_here("models", "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert list(rows) == cvtlab.list_models()
    assert rows["cvt_13"]["gmacs"] == pytest.approx(4.5, rel=0.1)
    assert rows["cvt_13"]["params_m"] == pytest.approx(19.98, rel=0.005)


@pytest.mark.parametrize(
    "args, words",
    [
        (["summary", "cvt_31"], ["unknown model", "cvt_21"]),
        (["summary", "cpu_30mins"], ["unknown model", "cpu_30mins"]),
        (["summary", "cvt_13", "--img-size", "100"], ["100", "16"]),
    ],
)
def test_cli_user_mistakes_are_one_line_without_traceback(args, words):
    r = run_cli_here(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert all(w in lines[0] for w in words)


def _in_fresh_python(script: str) -> subprocess.CompletedProcess:
    """``script`` run by a new interpreter, which has imported nothing of cvtlab or torch."""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_help_and_usage_mistakes_answer_without_importing_torch():
    """`cvtlab --help`, a command's help and a mistyped flag answer in a fraction of a second:
    torch, torchvision and timm (seconds of import) load only for a command that runs."""
    r = _in_fresh_python(
        "import sys\n"
        "from cvtlab.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['data', 'download', '--help'],"
        " ['train', '--epochz', '3'], ['eval', 'run', '--batch-size', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n"
        "heavy = [m for m in ('torch', 'torchvision', 'timm', 'lightning', 'numpy')"
        " if m in sys.modules]\n"
        "print('heavy', heavy)\n"
    )
    assert r.stdout.count("exit 0") == 3 and r.stdout.count("exit 2") == 2, r.stdout
    assert "--train-sizes" in r.stdout and "cpu_30min" in r.stdout  # the recipes it lists
    assert "--epochz" in r.stderr and "--batch-size" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == "heavy []"


def test_the_public_names_load_on_first_use():
    r = _in_fresh_python(
        "import sys, cvtlab\n"
        "assert 'torch' not in sys.modules\n"
        "for name in cvtlab.__all__:\n"
        "    assert getattr(cvtlab, name).__name__ == name, name\n"
        "assert cvtlab.models.layers.__name__ == 'cvtlab.models.layers'\n"
        "assert set(cvtlab.__all__) <= set(dir(cvtlab))\n"
        "try:\n"
        "    cvtlab.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    assert r.stdout.strip() == "module 'cvtlab' has no attribute 'no_such_name'"


def test_output_cut_off_by_its_reader_ends_quietly():
    """`cvtlab summary cvt_w24 --format json | head`: no traceback when the reader stops."""
    # 82 kB of JSON: more than a pipe holds, so the writer meets the closed end.
    p = subprocess.Popen(
        [sys.executable, "-m", "cvtlab.cli", "summary", "cvt_w24", "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout.read(10) == b'{\n  "model'
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


def test_summary_without_a_head_and_a_negative_class_count():
    r = run_cli_here("summary", "cvt_seed", "--num-classes", "0", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["layers"][-1]["output_shape"] == [64]
    r = run_cli_here("summary", "cvt_seed", "--num-classes", "-1")
    assert r.returncode == 2 and "argument --num-classes: must be a whole number" in r.stderr

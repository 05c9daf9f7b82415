"""The linear layers' fp32 products through oneDNN (models/token_linear.py): the same numbers
and gradients as ``F.linear``, taken only where they are meant to be, on any machine."""

import io

import onnx
import pytest
import torch
import torch.nn.functional as F

import cvtlab
from cvtlab.models import token_linear
from cvtlab.models.token_linear import TokenLinear, onednn_runs_fp32_products_faster


def _ran_a_convolution(out: torch.Tensor) -> bool:
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "Convolution" in type(fn).__name__:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


@pytest.fixture
def onednn(monkeypatch):
    monkeypatch.setattr(token_linear, "ONEDNN_FP32_PRODUCTS", True)


@pytest.mark.parametrize("shape", [(4, 50, 64), (3, 7, 64)])
def test_onednn_products_match_linear_forward_and_backward(onednn, shape):
    torch.manual_seed(0)
    layer = TokenLinear(64, 96)
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    assert _ran_a_convolution(out) and out.shape == (*shape[:2], 96)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.weight, layer.bias))
    ref = F.linear(x, layer.weight, layer.bias)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.weight, layer.bias))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_onednn_products_only_where_they_are_meant(onednn, monkeypatch):
    layer = TokenLinear(64, 96)
    tokens = torch.randn(4, 50, 64, requires_grad=True)
    assert _ran_a_convolution(layer(tokens))
    assert not _ran_a_convolution(layer(tokens[:, :1]))  # one token per image
    assert not _ran_a_convolution(layer(torch.randn(4, 64, requires_grad=True)))
    assert not _ran_a_convolution(layer.bfloat16()(tokens.bfloat16()))
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(tokens)
    assert out.dtype == torch.bfloat16 and not _ran_a_convolution(out)
    monkeypatch.setattr(token_linear, "ONEDNN_FP32_PRODUCTS", False)
    assert not _ran_a_convolution(layer(tokens))


def test_a_model_computes_the_same_either_way_and_keeps_its_state_dict(monkeypatch):
    torch.manual_seed(0)
    model = cvtlab.create_model("cvt_xs_64", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    results = {}
    for flag in (False, True):
        monkeypatch.setattr(token_linear, "ONEDNN_FP32_PRODUCTS", flag)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[flag] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-4)
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], rtol=1e-3, atol=1e-4)
    assert all(type(m).__name__ != "Linear" for m in model.stage0.modules())  # blocks use it
    assert "stage2.blocks.0.mlp.fc1.weight" in model.state_dict()


def test_onnx_export_writes_products_not_convolutions(onednn):
    model = cvtlab.create_model("cvt_xs_64", num_classes=10).eval()
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), buf, dynamo=False)
    ops = [n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node]
    convs = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert ops.count("Conv") <= convs  # the model's own convolutions, none from the products


def test_the_machine_rule_takes_onednn_on_amd_from_zen_5_only():
    zen5 = {"cpu_vendor": "AuthenticAMD", "cpu_family": 26, "cpu_extensions": ["avx512f"]}
    assert onednn_runs_fp32_products_faster(zen5) == torch.backends.mkldnn.is_available()
    assert not onednn_runs_fp32_products_faster({**zen5, "cpu_family": 25})  # Zen 3 and Zen 4
    assert not onednn_runs_fp32_products_faster({**zen5, "cpu_extensions": ["avx2"]})
    assert not onednn_runs_fp32_products_faster({**zen5, "cpu_vendor": "GenuineIntel"})
    assert not onednn_runs_fp32_products_faster({})  # no /proc/cpuinfo: macOS, Windows

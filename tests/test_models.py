import re
import socket
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import cvtlab
from cvtlab import CvtLabError
from cvtlab.models import layers
from cvtlab.models.layers import ConvAttention, QuickGELU
from cvtlab.summary import summarize


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, paper", [("cvt_13", 19.98e6), ("cvt_21", 31.54e6), ("cvt_w24", 276.7e6)]
)
def test_parameter_counts_match_the_paper(name, paper):
    with torch.device("meta"):
        model = cvtlab.create_model(name, num_classes=1000)
    assert abs(n_params(model) - paper) / paper < 0.005


@pytest.mark.parametrize("size", [64, 96, 224, 384])
def test_any_size_the_strides_divide_works(size):
    model = cvtlab.create_model("cvt_13", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


@pytest.mark.parametrize("name", cvtlab.list_models())
def test_every_model_runs_at_its_default_size_with_batch_one_and_two(name):
    if name == "cvt_w24":
        pytest.skip("277M parameters at 384 px: covered by the meta-device tests")
    model = cvtlab.create_model(name).eval()
    size = model.img_size
    with torch.no_grad():
        out1 = model(torch.randn(1, 3, size, size))
        x = torch.randn(2, 3, size, size)
        out2 = model(x)
        # Batch 1 gives the same logits as the same image inside a batch (eval mode).
        torch.testing.assert_close(model(x[:1]), out2[:1], atol=1e-5, rtol=1e-4)
    assert out1.shape == (1, model.num_classes) and out2.shape == (2, model.num_classes)


def test_size_the_strides_do_not_divide_names_size_and_stride():
    with pytest.raises(CvtLabError, match=r"100.*16"):
        cvtlab.create_model("cvt_13", img_size=100)
    model = cvtlab.create_model("cvt_13_64")
    with pytest.raises(CvtLabError, match=r"60x60.*8"):
        model(torch.randn(1, 3, 60, 60))


def test_unknown_model_lists_close_names():
    with pytest.raises(CvtLabError, match="did you mean cvt_13"):
        cvtlab.create_model("cvt13")


def test_unknown_override_is_an_error():
    with pytest.raises(CvtLabError, match="no option"):
        cvtlab.create_model("cvt_13", depth_multiplier=2)


def test_timm_registry_knows_every_model():
    import subprocess
    import sys

    # In a fresh process: `import cvtlab.models` is what registers them, as the README says.
    script = "import cvtlab.models, timm; print(timm.create_model('cvt_13_64').head.out_features)"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "200", r.stderr
    model = timm.create_model("cvt_13", num_classes=200)
    assert model.head.out_features == 200
    assert set(cvtlab.list_models()) <= set(timm.list_models("cvt_*"))


def test_act_layer_choice_and_default():
    # Official architectures keep QuickGELU (their weights need it); the from-scratch CPU
    # variant uses exact GELU.
    assert isinstance(cvtlab.create_model("cvt_13_64").stage0.blocks[0].mlp.act, QuickGELU)
    assert isinstance(cvtlab.create_model("cvt_xs_64").stage0.blocks[0].mlp.act, torch.nn.GELU)
    gelu = cvtlab.create_model("cvt_13_64", act_layer="gelu")
    assert isinstance(gelu.stage0.blocks[0].mlp.act, torch.nn.GELU)
    with pytest.raises(CvtLabError, match="act_layer"):
        cvtlab.create_model("cvt_xs_64", act_layer="relu6")


def test_stochastic_depth_ramps_linearly_within_the_last_stage():
    model = cvtlab.create_model("cvt_13", drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.stage2.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates) and len(set(rates)) == len(rates)
    assert all(not hasattr(b.drop_path, "drop_prob") for b in model.stage1.blocks)


def test_class_token_only_in_last_stage_and_excluded_from_weight_decay():
    model = cvtlab.create_model("cvt_13")
    assert model.stage0.cls_token is None and model.stage1.cls_token is None
    assert model.stage2.cls_token.shape == (1, 1, 384)
    assert model.no_weight_decay() == {"stage2.cls_token"}


def test_official_state_dict_names():
    keys = cvtlab.create_model("cvt_13").state_dict().keys()
    for key in [
        "stage0.patch_embed.proj.weight",
        "stage2.blocks.3.attn.conv_proj_k.conv.weight",
        "stage2.blocks.3.attn.conv_proj_k.bn.running_var",
        "stage2.blocks.3.attn.proj_q.weight",
        "stage1.blocks.1.mlp.fc1.weight",
        "stage2.cls_token",
        "norm.weight",
        "head.weight",
    ]:
        assert key in keys


def test_attention_uses_full_width_scale():
    attn = cvtlab.create_model("cvt_13").stage1.blocks[0].attn
    assert attn.scale == pytest.approx(192**-0.5)


@pytest.mark.parametrize("with_cls_token", [False, True])
def test_cpu_explicit_attention_matches_sdpa(monkeypatch, with_cls_token):
    """Small attention on CPU runs as explicit products and a softmax; it must compute what
    SDPA computes, forward and backward."""
    torch.manual_seed(0)
    attn = ConvAttention(64, 4, with_cls_token=with_cls_token).train()
    x = torch.randn(3, 64 + with_cls_token, 64, requires_grad=True)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(1) or sdpa(*a, **k),
    )

    def run():
        out = attn(x, 8, 8)
        grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
        return out, grads

    explicit, explicit_grads = run()
    assert not calls
    monkeypatch.setattr(layers, "EXPLICIT_ATTENTION_MAX_SCORES", 0)
    reference, reference_grads = run()
    assert calls
    torch.testing.assert_close(explicit, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(explicit_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_projections_train_in_fp32_under_cpu_autocast(monkeypatch):
    """Training under CPU bf16 autocast computes the depthwise projections in fp32 (their bf16
    backward is the slow one); inference, and training with the switch off, keep them in bf16."""
    attn = ConvAttention(64, 4).train()
    seen = []
    attn.conv_proj_q.conv.register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    x = torch.randn(2, 64, 64)

    def projection_dtype(grad: bool) -> torch.dtype:
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            attn(x, 8, 8)
        return seen[0]

    assert projection_dtype(grad=True) == torch.float32
    assert projection_dtype(grad=False) == torch.bfloat16
    monkeypatch.setattr(layers, "FP32_DEPTHWISE_ON_CPU", False)
    assert projection_dtype(grad=True) == torch.bfloat16


@pytest.mark.parametrize(
    "kernel, stride, size", [(3, 1, 2), (3, 2, 2), (3, 1, 1), (5, 1, 4), (3, 1, 3)]
)
def test_depthwise_projection_on_a_map_smaller_than_its_kernel_computes_the_plain_convolution(
    kernel, stride, size
):
    """On a token map smaller than its kernel (the last stage at 32 px) the projection pads the
    map itself while a gradient is taken, for speed: outputs and gradients must be those of the
    zero-padded convolution and BatchNorm, in training and in eval (folded BatchNorm)."""
    torch.manual_seed(0)
    proj = layers.ConvProjection(16, kernel, stride)
    with torch.no_grad():
        proj.bn.weight.uniform_(0.5, 1.5)
        proj.bn.bias.uniform_(-0.5, 0.5)
        proj.bn.running_mean.uniform_(-0.2, 0.2)
        proj.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(6, 16, size, size).contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        proj.train(training)
        ours = x.clone().requires_grad_()
        plain = x.clone().requires_grad_()
        out = proj(ours)
        bn_state = {k: v.clone() for k, v in proj.bn.state_dict().items()}
        conv = proj.conv
        reference = F.batch_norm(
            F.conv2d(plain, conv.weight, None, conv.stride, conv.padding, groups=conv.groups),
            bn_state["running_mean"],
            bn_state["running_var"],
            proj.bn.weight,
            proj.bn.bias,
            training=training,
        )
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        ours_grads = torch.autograd.grad(out, (ours, conv.weight, proj.bn.weight), grad)
        plain_grads = torch.autograd.grad(reference, (plain, conv.weight, proj.bn.weight), grad)
        for a, b in zip(ours_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # inference: the unpadded forward, the same values
        torch.testing.assert_close(proj(x), reference.detach(), rtol=1e-5, atol=1e-5)


def _unshare(state: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """A shared-projection attention's weights as the three separate projections that compute
    the same: each shared conv copied to q, k and v, each fused linear split by rows."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(conv_proj|proj)_(q|kv|qkv)\.(.+)", key)
        if match is None:
            out[key] = value
            continue
        kind, group, param = match.groups()
        for i, which in enumerate(group):
            part = value if kind == "conv_proj" else value[i * dim : (i + 1) * dim]
            out[f"{kind}_{which}.{param}"] = part
    return out


@pytest.mark.parametrize("with_cls_token", [False, True])
@pytest.mark.parametrize("stride_kv", [1, 2])
def test_shared_projection_computes_the_separate_projections_with_tied_weights(
    with_cls_token, stride_kv
):
    """keys and values (and queries where the strides match) through one conv projection and
    one fused linear layer compute what three projections with those weights compute, in
    training (BatchNorm on batch statistics) and in eval (folded BatchNorm), with gradients."""
    torch.manual_seed(0)
    dim = 32
    shared = ConvAttention(
        dim, 2, stride_kv=stride_kv, with_cls_token=with_cls_token, shared_projection=True
    )
    separate = ConvAttention(dim, 2, stride_kv=stride_kv, with_cls_token=with_cls_token)
    expected = ("qkv",) if stride_kv == 1 else ("q", "kv")
    assert shared.projections == expected and separate.projections == ("q", "k", "v")
    assert shared.projection_conv("k") is shared.projection_conv("v")
    with torch.no_grad():
        for bn in (m for m in shared.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    separate.load_state_dict(_unshare(shared.state_dict(), dim))
    x = torch.randn(3, 64 + with_cls_token, dim)
    for mode in ("train", "eval"):
        shared.train(mode == "train")
        separate.train(mode == "train")
        xs = x.clone().requires_grad_()
        xd = x.clone().requires_grad_()
        a, b = shared(xs, 8, 8), separate(xd, 8, 8)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        a.square().sum().backward()
        b.square().sum().backward()
        torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in shared.parameters()) < sum(
        p.numel() for p in separate.parameters()
    )


def test_shared_projection_model_option_runs_and_summarises():
    model = cvtlab.create_model(
        "cvt_xs_64", stride_kv=[2, 2, 1], cls_token=False, shared_projection=True
    )
    attn = model.stage2.blocks[0].attn
    assert attn.projections == ("qkv",) and model.stage0.blocks[0].attn.projections == ("q", "kv")
    plain = cvtlab.create_model("cvt_xs_64", stride_kv=[2, 2, 1], cls_token=False)
    summary_shared = summarize(model)
    summary_plain = summarize(plain)
    # The attention products are the same; only the projections' conv passes are fewer.
    attn_macs = [
        [r["macs"] for r in s["layers"] if r["type"] == "ConvAttention"]
        for s in (summary_shared, summary_plain)
    ]
    assert attn_macs[0] == attn_macs[1]
    assert summary_shared["total_macs"] < summary_plain["total_macs"]
    assert summary_shared["total_params"] < summary_plain["total_params"]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("cvt_13", {}),
        ("cvt_xs_64", {"stride_kv": [2, 2, 1], "shared_projection": True}),  # q, k, v shared
        ("cvt_xs_64", {"shared_projection": True}),  # q alone, k and v shared
    ],
)
def test_last_block_skips_the_tokens_the_head_never_reads(name, overrides):
    """With a class-token head the last block computes the class token alone: the same logits
    and the same gradients for every weight as computing every token, in training (batch
    statistics, stochastic depth drawn alike) and in eval."""
    torch.manual_seed(0)
    model = cvtlab.create_model(name, num_classes=10, img_size=64, **overrides)
    assert model.skip_unread_tokens
    x = torch.randn(4, 3, 64, 64)
    last = model.stage2.blocks[-1]
    calls = []
    last.mlp.register_forward_hook(lambda m, a, out: calls.append(out.shape[1]))
    for mode in (True, False):
        model.train(mode)
        results = {}
        for skip in (True, False):
            model.skip_unread_tokens = skip
            model.zero_grad()
            torch.manual_seed(1)
            logits = model(x)
            logits.square().sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[skip] = logits, grads
        torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
        skipped, full = results[True][1], results[False][1]
        # Every weight gets a gradient (DDP needs one each step): the unread query projection
        # a zero one, as in the full computation.
        assert skipped.keys() == full.keys() == {n for n, _ in model.named_parameters()}
        for n, g in full.items():
            torch.testing.assert_close(skipped[n], g, atol=1e-5, rtol=1e-4)
    assert calls == [1, 17, 1, 17]  # the class token alone, then all 16 map tokens and it
    # The layer tables still show the architecture's every token.
    model.skip_unread_tokens = True
    fc2 = f"stage2.blocks.{len(model.stage2.blocks) - 1}.mlp.fc2"
    (row,) = [r for r in summarize(model)["layers"] if r["name"] == fc2]
    assert row["output_shape"][0] == 17 and model.skip_unread_tokens


@pytest.mark.parametrize("training", [False, True])
def test_class_token_joins_the_projections_before_them_without_a_gradient(training):
    """Without a gradient the class token goes through each query, key and value product with
    the map tokens (one product); with one, through its own product first. Same outputs."""
    torch.manual_seed(0)
    model = cvtlab.create_model("cvt_13", num_classes=10, img_size=64).train(training)
    x = torch.randn(4, 3, 64, 64)
    rows = []
    model.stage2.blocks[0].attn.proj_k.register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[1])
    )
    outputs = []
    for grad in (True, False):
        torch.manual_seed(1)
        with torch.set_grad_enabled(grad):
            outputs.append(model(x))
    torch.testing.assert_close(outputs[1], outputs[0].detach(), rtol=1e-5, atol=1e-5)
    assert rows == [1, 4, 5]  # the class token, the 2x2 keys; then all five at once


def test_mean_pooled_head_computes_every_token():
    model = cvtlab.create_model("cvt_xs_64", cls_token=False).eval()
    calls = []
    model.stage2.blocks[-1].mlp.register_forward_hook(lambda m, a, out: calls.append(out.shape[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert calls == [16]


DDP_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
import cvtlab

rank = int(sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=rank, world_size=2)
torch.manual_seed(0)
model = cvtlab.create_model(
    "cvt_xs_64", num_classes=5, dims=[16, 32, 64], heads=[1, 2, 2], depths=[1, 1, 2]
)
assert model.skip_unread_tokens
ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
torch.manual_seed(rank)  # each process its own batch
for _ in range(3):
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
    opt.zero_grad()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
copies = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(copies, flat)
assert torch.equal(copies[0], copies[1])
# Both processes done, and DDP's pending communication released, before the group goes: a
# process that tore it down while the other still talked once aborted at exit under load.
dist.barrier()
del opt, ddp
dist.destroy_process_group()
"""


def test_class_token_model_trains_under_ddp_defaults(tmp_path):
    """DDP (as Lightning's `--strategy ddp` builds it) wants a gradient for every parameter
    each step; the last block's skipped tokens must not leave one without."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "ddp_cls.py"
    script.write_text(DDP_SCRIPT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]

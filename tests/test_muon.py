"""``--optimizer muon``: orthogonalised steps for the channel-mixing weights, AdamW for the rest."""

import copy

import pytest
import torch
from torch import nn

from cvtlab import create_model
from cvtlab.train import muon
from cvtlab.train.module import param_groups
from cvtlab.train.muon import (
    NEWTON_SCHULZ,
    MuonAdamW,
    _iterate,
    _iterate_on_gram,
    _iterate_on_spectrum,
    orthogonalize,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 200), (200, 64), (96, 96)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_the_singular_values(shape, dtype):
    torch.manual_seed(0)
    # A badly conditioned matrix: singular values spread over three orders of magnitude.
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    s = torch.logspace(0, -3, min(shape))
    g = u @ torch.diag(s) @ v.T
    o = orthogonalize(g, dtype=dtype)
    assert o.shape == g.shape and o.dtype == g.dtype
    sv = torch.linalg.svdvals(o)
    # The quintic iteration lands every singular value near one, not exactly on it.
    assert sv.max() < 1.5 and sv[: min(shape) // 2].min() > 0.5, sv
    # Same singular vectors: o is nearly u·diag(·)·vᵀ with positive entries.
    within = torch.diagonal(u.T @ o @ v)
    rtol = 1e-3 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 bits of each product
    assert (within > 0).all() and torch.allclose(within.norm(), o.norm(), rtol=rtol)


def test_the_gram_form_gives_the_iterations_result():
    """Long fp32 matrices are iterated on their Gram matrix, for fewer products; the result must
    be the Newton-Schulz iteration's, not an approximation of it."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(2, 48, 48, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(2, 160, 48, dtype=torch.float64))
    s = torch.logspace(0, -4, 48, dtype=torch.float64)
    x = u @ torch.diag(s) @ v.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for steps in (0, 1, 5):
        for polynomials in NEWTON_SCHULZ.values():
            torch.testing.assert_close(
                _iterate_on_gram(x, steps, polynomials), _iterate(x, steps, polynomials)
            )
    # In fp32, through orthogonalize, tall or wide: within rounding of the fp64 iteration.
    reference = _iterate(x, 5)
    for update, expected in ((x, reference), (x.mT, reference.mT)):
        o = orthogonalize(update.float()).double()
        assert ((o - expected).norm() / expected.norm()) < 1e-3


def test_the_spectral_form_gives_the_iterations_result(monkeypatch):
    """Large fp32 matrices on one CPU thread take the iterations' map on their singular values,
    through an eigendecomposition; again the result must be the iteration's."""
    torch.manual_seed(0)
    rows, cols = muon.SPECTRAL_FORM_MIN_ROWS, muon.SPECTRAL_FORM_MIN_COLS
    u, _ = torch.linalg.qr(torch.randn(2, rows, rows, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(2, cols, rows, dtype=torch.float64))
    s = torch.logspace(0, -4, rows, dtype=torch.float64)
    x = u @ torch.diag(s) @ v.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for steps in (0, 1, 5):
        for polynomials in NEWTON_SCHULZ.values():
            torch.testing.assert_close(
                _iterate_on_spectrum(x, steps, polynomials), _iterate(x, steps, polynomials)
            )
    taken, spectral = [], muon._iterate_on_spectrum

    def watched(x, steps, polynomials):
        taken.append(x.shape)
        return spectral(x, steps, polynomials)

    monkeypatch.setattr(muon, "_iterate_on_spectrum", watched)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # In fp32, through orthogonalize, tall or wide: within rounding of the fp64 iteration.
        reference = _iterate(x, 5)
        for update, expected in ((x, reference), (x.mT, reference.mT)):
            o = orthogonalize(update.float()).double()
            assert ((o - expected).norm() / expected.norm()) < 1e-3
        assert taken == [(2, rows, cols)] * 2
        # A non-finite update stays in its own matrix, as it does in the iterations.
        stack = torch.randn(2, rows, cols)
        stack[0, 1, 2] = float("nan")
        assert orthogonalize(stack)[1].isfinite().all() and len(taken) == 3
        orthogonalize(torch.randn(rows - 1, cols))  # smaller: the products cost less there
        orthogonalize(x, dtype=torch.bfloat16)  # bf16 products: the iterations
        torch.set_num_threads(2)  # the products gain more from a second thread
        orthogonalize(x.float())
        assert len(taken) == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 200), (200, 64)])
def test_exact_orthogonalisation_sets_the_singular_values_to_one(shape, dtype):
    """``muon_exact``: every direction the update has comes out at one, not in 0.7-1.2 as after
    the iterations; directions far below the floor (rounding, a low-rank update) stay small."""
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    s = torch.cat([torch.logspace(0, -2, k - 8), torch.full((8,), 1e-7)])
    g = u @ torch.diag(s) @ v.T
    o = orthogonalize(g.to(dtype), exact=True)
    assert o.shape == g.shape and o.dtype == dtype
    within = torch.diagonal(u.T @ o.float() @ v)  # same singular vectors: o ≈ u·diag·vᵀ
    sv = torch.linalg.svdvals(o.float())
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert sv.max() < 1 + tol and (within[: k - 8] > 0).all(), within
    # Singular values a hundred times the floor (relative to the Frobenius norm) reach 0.99.
    relative = s / s.norm()
    assert (within[: k - 8][relative[: k - 8] > 100 * muon.EXACT_FLOOR] > 0.99 - tol).all()
    # The iterations leave these at 1e-7·484 too; a bf16 input's rounding (2^-9 relative) is
    # itself above the floor, and comes out as noise of that order.
    assert within[k - 8 :].abs().max() < (1e-2 if dtype == torch.float32 else 5e-2)
    # A bf16 run's Muon (ns_dtype bf16) does not round an fp32 update through bf16 first.
    torch.testing.assert_close(
        orthogonalize(g, dtype=torch.bfloat16, exact=True), orthogonalize(g, exact=True)
    )
    ns = torch.linalg.svdvals(orthogonalize(g))
    assert ns.max() > 1.1  # the iterations overshoot where the exact map does not
    # A non-finite matrix of a stack leaves the others finite, as in the iterations.
    stack = torch.randn(2, *shape)
    stack[0, 1, 2] = float("nan")
    assert orthogonalize(stack, exact=True)[1].isfinite().all()


def test_muon_exact_reaches_the_optimiser_from_the_configuration():
    import lightning as L

    from cvtlab.train.module import CvTClassifier

    for exact in (False, True):
        module = CvTClassifier(
            "cvt_seed", {"num_classes": 3}, ["a", "b", "c"], optimizer="muon", muon_exact=exact
        )
        module.trainer = L.Trainer(accelerator="cpu", logger=False)
        assert module.configure_optimizers()["optimizer"].exact is exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 200), (200, 64)])
def test_polar_express_lands_the_singular_values_closer_to_one(shape, dtype):
    """``muon_polynomials: polar_express``: the same five steps, one polynomial per step, leave
    every singular value above 2e-3 of the update's norm within 0.85-1.15 of one, where the
    quintic leaves them in 0.68-1.2; the singular vectors stay the update's."""
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    s = torch.logspace(0, -3, k)
    g = (u @ torch.diag(s) @ v.T).to(dtype)
    resolved = s / s.norm() >= 2e-3
    within = {}
    for name, polynomials in NEWTON_SCHULZ.items():
        o = orthogonalize(g, polynomials=polynomials)
        assert o.shape == g.shape and o.dtype == dtype
        within[name] = torch.diagonal(u.T @ o.float() @ v)
        assert (within[name] > 0).all()
    polar, quintic = within["polar_express"][resolved], within["quintic"][resolved]
    assert polar.min() > 0.85 and polar.max() < 1.15, polar
    assert quintic.min() < 0.7 and quintic.max() > 1.19, quintic
    assert (polar - 1).abs().mean() < 0.6 * (quintic - 1).abs().mean()
    # Directions far below the rest are lifted more, not less, than by the quintic.
    assert (within["polar_express"][~resolved] > within["quintic"][~resolved]).all()


def test_muon_polynomials_reach_the_optimiser_from_the_configuration():
    import lightning as L

    from cvtlab.train.module import CvTClassifier

    steps = {}
    for name in ("quintic", "polar_express"):
        module = CvTClassifier(
            "cvt_seed",
            {"num_classes": 3},
            ["a", "b", "c"],
            optimizer="muon",
            muon_polynomials=name,
        )
        module.trainer = L.Trainer(accelerator="cpu", logger=False)
        optimizer = module.configure_optimizers()["optimizer"]
        assert optimizer.polynomials == name
        # One step from the same weights and gradient: the polynomials are the ones applied.
        torch.manual_seed(0)
        layer = nn.Linear(48, 32, bias=False)
        layer.weight.grad = torch.randn(32, 48)
        before = layer.weight.detach().clone()
        MuonAdamW(
            [{"params": [layer.weight], "muon": True}], lr=0.1, weight_decay=0, polynomials=name
        ).step()
        steps[name] = before - layer.weight.detach()
        expected = orthogonalize(layer.weight.grad, polynomials=NEWTON_SCHULZ[name])
        # Nesterov momentum from a zero buffer: the first step's direction is the gradient's.
        torch.testing.assert_close(
            steps[name] / steps[name].norm(), expected / expected.norm(), rtol=0, atol=1e-5
        )
    assert not torch.allclose(steps["quintic"], steps["polar_express"], atol=1e-4)
    with pytest.raises(ValueError, match="not 'newton'"):
        MuonAdamW([{"params": [layer.weight], "muon": True}], polynomials="newton")


def test_a_stack_of_matrices_is_orthogonalised_matrix_by_matrix():
    torch.manual_seed(0)
    for shape in ((3, 48, 80), (2, 80, 48)):
        stack = torch.randn(shape)
        together = orthogonalize(stack)
        alone = torch.stack([orthogonalize(m) for m in stack])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_weights_of_one_shape_step_as_they_would_alone():
    """The optimiser orthogonalises same-shaped weights together; each must move as if it were
    the only weight in its group (momentum, decay and scale included)."""
    torch.manual_seed(0)
    shapes = [(32, 64), (32, 64), (64, 32), (16, 8, 3, 3), (32, 64)]
    together = [nn.Parameter(torch.randn(s)) for s in shapes]
    alone = [nn.Parameter(w.detach().clone()) for w in together]
    opt = MuonAdamW([{"params": together, "muon": True, "weight_decay": 0.1}], lr=1e-2)
    singles = [
        MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.1}], lr=1e-2) for w in alone
    ]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for w, v, g in zip(together, alone, grads):
            w.grad, v.grad = g, g.clone()
        opt.step()
        for single in singles:
            single.step()
    for w, v in zip(together, alone):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("precision", "expected"),
    [("32", None), ("bf16-mixed", torch.bfloat16)],
)
def test_a_bf16_run_orthogonalises_in_bf16_and_an_fp32_run_in_fp32(precision, expected):
    """A run trains in bf16 only where bf16 products are the faster ones, and Muon's products
    follow it; fp32 runs keep fp32 (the default on CPUs)."""
    import lightning as L

    from cvtlab.train.module import CvTClassifier

    module = CvTClassifier("cvt_seed", {"num_classes": 3}, ["a", "b", "c"], optimizer="muon")
    module.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, MuonAdamW) and opt.ns_dtype is expected
    assert "ns_dtype" not in opt.state_dict()["param_groups"][0]  # not saved: a machine setting


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


@pytest.mark.parametrize("fused", [True, False])
def test_groups_without_muon_step_exactly_as_torch_adamw(fused):
    a, b = _mlp(), _mlp()
    ours = MuonAdamW(param_groups(a, 0.1), lr=1e-2, betas=(0.9, 0.99), fused=fused)
    ref = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.99), fused=fused)
    for _ in range(4):
        x = torch.randn(5, 8)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(64, 64), (768, 256), (128, 512)])
def test_a_muon_step_has_the_size_of_an_adamw_step(shape):
    """0.2·√max(rows, cols) makes an update's RMS 0.2·lr whatever the shape, about an AdamW
    step's, so the rate tuned for AdamW carries over."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    before = w.detach().clone()
    opt = MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.0}], lr=1e-3)
    w.grad = torch.randn(shape)
    opt.step()
    rms = (w.detach() - before).square().mean().sqrt().item()
    assert 0.7 * 0.2e-3 < rms < 1.3 * 0.2e-3, rms


def test_muon_groups_cover_the_channel_mixing_weights_and_nothing_else():
    """The blocks' linear layers and the patch embeddings after the stem; the stem (it reads
    pixels), the classifier, the depthwise filters, norms and biases stay with AdamW."""
    model = create_model("cvt_xs_64", num_classes=10, img_size=64)
    groups = param_groups(model, 0.05, muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in groups if g.get("muon") for p in g["params"]]
    linear = [
        f"{m}.weight"
        for m, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not m.startswith("head")
    ]
    embeddings = ["stage1.patch_embed.proj.weight", "stage2.patch_embed.proj.weight"]
    assert sorted(muon) == sorted(linear + embeddings)
    every = [p for g in groups for p in g["params"]]
    assert len(every) == len(set(map(id, every))) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="not vectors"):
        MuonAdamW([{"params": [model.norm.weight], "muon": True}])


def test_a_muon_step_on_a_convolution_orthogonalises_its_filters_as_one_matrix():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 16, 3, 3))
    before = w.detach().clone()
    opt = MuonAdamW([{"params": [w], "muon": True, "weight_decay": 0.0}], lr=1e-3)
    w.grad = torch.randn(32, 16, 3, 3)
    opt.step()
    step = (w.detach() - before).flatten(1)
    assert 0.7 * 0.2e-3 < step.square().mean().sqrt().item() < 1.3 * 0.2e-3
    # Rows of the 32 x 144 update are near orthogonal: its singular values are all alike.
    sv = torch.linalg.svdvals(step)
    assert sv.max() < 3 * sv.min(), sv


def test_muon_trains_a_small_cvt_faster_than_chance_and_its_state_round_trips():
    torch.manual_seed(0)
    model = create_model("cvt_seed", num_classes=4, img_size=32)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,))
    opt = MuonAdamW(param_groups(model, 0.05, muon=True), lr=2e-3)

    def step(m, o):
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss.item()

    first = step(model, opt)
    for _ in range(15):
        last = step(model, opt)
    assert last < 0.5 * first  # it fits a fixed batch

    # A restored optimiser continues exactly where the saved one stood (a resumed run).
    twin = copy.deepcopy(model)
    restored = MuonAdamW(param_groups(twin, 0.05, muon=True), lr=2e-3)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert any("momentum_buffer" in s for s in restored.state.values())
    for m, o in ((model, opt), (twin, restored)):
        torch.manual_seed(1)  # the same stochastic depth in both
        step(m, o)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

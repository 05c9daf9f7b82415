"""Muon for the weights that mix channels, AdamW for every other tensor, as one optimiser.

Muon (Jordan et al., 2024) steps a weight matrix along its momentum made orthogonal: the
momentum's singular values are pushed towards one by a few Newton-Schulz iterations, so that every
direction of the update moves as far as the largest one. A convolution's filters are stepped as the
matrix they multiply patches by (out x in·kh·kw), as the method's own CIFAR-10 recipes do. Vectors
(norms, biases), the stem, depthwise filters and the classifier stay with AdamW; which weights go
where is ``cvtlab.train.module.param_groups``' choice.

torch ships ``torch.optim.Muon``, but it always orthogonalises in bf16, and some CPUs multiply bf16
matrices at about half their fp32 rate (RESULTS, throughput attempt 21): there the iterations took
96 against 61 ms a step for the 30-minute recipe's model. Here they run in the dtype whose products
are faster: bf16 on GPUs and on CPUs that train in bf16 (on AMD Zen 4 40 against 64 ms), fp32 on the
others. In fp32 a matrix much longer than it is wide runs its iterations on its Gram matrix,
which needs fewer products, and on one CPU thread a large one applies them to its singular
values alone, through the Gram matrix's eigendecomposition: the same result, for less work. One
optimiser rather than two, because Lightning's automatic optimisation steps one, and one
learning-rate schedule then scales every group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.adamw import adamw


@dataclass(frozen=True)
class Polynomials:
    """The odd polynomials of the Newton-Schulz steps, x <- ax + b(xx^T)x + c(xx^T)^2 x: one
    (a, b, c) per step, the last repeating for any further step. Before the first step the update
    is divided by its Frobenius norm times ``margin``."""

    coefficients: tuple[tuple[float, float, float], ...]
    margin: float = 1.0

    def at(self, step: int) -> tuple[float, float, float]:
        return self.coefficients[min(step, len(self.coefficients) - 1)]


NEWTON_SCHULZ = {
    # The Muon write-up's quintic, the same every step: a steep slope at zero, so that five steps
    # lift even small singular values, at the price of landing them anywhere in about 0.7-1.2,
    # which the method's authors found trains as well as exact orthogonalisation.
    "quintic": Polynomials(((3.4445, -4.7750, 2.0315),)),
    # Polar Express (Amsel et al., 2025): a polynomial per step, each the best one for the
    # interval the singular values can still lie in, with the 2% margin the published five-step
    # schedule assumes. For the same products it lands singular values from 1e-3 of the update's
    # Frobenius norm up in about 0.85-1.14 (the quintic: 0.47-1.20).
    "polar_express": Polynomials(
        (
            (8.156554524902461, -22.48329292557795, 15.878769915207462),
            (4.042929935166739, -2.808917465908714, 0.5000178451051316),
            (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
            (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
            (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
        ),
        margin=1.02,
    ),
}
QUINTIC = NEWTON_SCHULZ["quintic"]

# Where the iterations run in fp32 or fp64, a matrix at least this many times as long as it is
# wide is iterated on its Gram matrix (``_iterate_on_gram``); a benchmark may set it to infinity.
GRAM_FORM_MIN_ASPECT = 2.0

# On a CPU running on one thread, in fp32 or fp64, a wide matrix with at least this many rows
# and columns takes the iterations' map on its singular values instead (``_iterate_on_spectrum``).
# In smaller ones LAPACK's eigendecomposition costs more than the products it saves, and it gains
# little from more threads where the products gain almost twice: with two the step came out level
# (RESULTS, thirty-fourth session). A benchmark may set them to infinity.
SPECTRAL_FORM_MIN_ROWS = 256
SPECTRAL_FORM_MIN_COLS = 384


# ``exact`` orthogonalisation maps each singular value s of the update (scaled to Frobenius norm
# one) to s / sqrt(s^2 + EXACT_FLOOR^2): one for every direction the update has, and a slope of
# 1/EXACT_FLOOR at zero, which is about the five quintic steps' (3.4445^5 = 484), so that rounding
# noise and directions the update lacks stay as small as the iterations leave them.
EXACT_FLOOR = 2e-3


def orthogonalize(
    update: Tensor,
    steps: int = 5,
    dtype: torch.dtype | None = None,
    exact: bool = False,
    polynomials: Polynomials = QUINTIC,
) -> Tensor:
    """The matrix with ``update``'s singular vectors and singular values near one, computed in
    ``dtype`` (by default bf16 on GPUs, fp32 on CPUs). A stack of matrices (``batch x rows x
    cols``) is orthogonalised matrix by matrix, in one batched product per step. ``exact`` sets
    the singular values to one (``EXACT_FLOOR``) through an eigendecomposition, in fp32 at least,
    instead of ``steps`` Newton-Schulz iterations with ``polynomials`` (one of
    ``NEWTON_SCHULZ``)."""
    dtype = dtype or (torch.bfloat16 if update.is_cuda else torch.float32)
    if exact and dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # no eigendecomposition in half precision
    x = update.to(dtype)
    stacked = x.ndim == 3
    if not stacked:
        x = x.unsqueeze(0)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # the Gram matrix of the shorter side is the cheaper one
        x = x.mT
    # The spectral norm is at most the Frobenius norm.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * polynomials.margin).clamp(min=1e-7)
    rows, cols = x.shape[-2:]
    full_precision = x.dtype in (torch.float32, torch.float64)
    large = rows >= SPECTRAL_FORM_MIN_ROWS and cols >= SPECTRAL_FORM_MIN_COLS
    if exact:
        # A non-finite update, which the eigendecomposition refuses, keeps to its own matrix.
        x = _map_spectrum(x, _exact_scale, fallback=lambda: _iterate(x, steps, polynomials))
    elif full_precision and large and x.device.type == "cpu" and torch.get_num_threads() == 1:
        x = _iterate_on_spectrum(x, steps, polynomials)
    elif full_precision and cols >= GRAM_FORM_MIN_ASPECT * rows:
        x = _iterate_on_gram(x, steps, polynomials)
    else:
        x = _iterate(x, steps, polynomials)
    if not wide:
        x = x.mT
    return (x if stacked else x.squeeze(0)).to(update.dtype)


def _iterate(x: Tensor, steps: int, polynomials: Polynomials = QUINTIC) -> Tensor:
    """Newton-Schulz on a stack of wide matrices: x <- (aI + bG + cG^2)x, G = xx^T."""
    for step in range(steps):
        a, b, c = polynomials.at(step)
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _iterate_on_gram(x: Tensor, steps: int, polynomials: Polynomials = QUINTIC) -> Tensor:
    """The same iterations, run on the m x m Gram matrix of a wide m x n stack, then applied
    with one product: each step's polynomial P = aI + bG + cG^2 is a polynomial of the first
    Gram matrix, so they all commute and the next Gram matrix is P G P = P(PG). Five steps
    cost 4m^2·n + 34m^3 floating-point operations against 20m^2·n + 10m^3: a quarter to a half
    less for the 256 x 768 and 256 x 1,152 weights of the 30-minute recipe (RESULTS, thirty-third
    session). Only in fp32 or fp64: in bf16 the Gram matrices' rounding compounds and badly
    conditioned updates come out with singular values far above one."""
    gram = x @ x.mT
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    product = None
    for step in range(steps):
        a, b, c = polynomials.at(step)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c).add_(eye, alpha=a)
        product = poly if product is None else poly @ product
        if step < steps - 1:
            gram = poly @ (poly @ gram)
    return x if product is None else product @ x


def _iterate_on_spectrum(x: Tensor, steps: int, polynomials: Polynomials = QUINTIC) -> Tensor:
    """The same iterations, applied to the singular values of a wide m x n stack: each step maps
    every singular value on its own (s <- as + bs^3 + cs^5) and keeps the singular vectors, so
    with the Gram matrix's eigendecomposition xx^T = U diag(s^2) U^T the result is
    U diag(f(s)/s) U^T x, f being the steps' composed map. 4m^2·n + 2m^3 operations and one
    eigendecomposition, against _iterate_on_gram's 4m^2·n + 34m^3: on one thread of an AMD
    Zen 3, 1.1-1.3x faster for 256-row weights and 1.4-1.7x for 384 and 512 (RESULTS). Not on
    GPUs, whose batched eigendecompositions of this size are slow."""

    def iterations_scale(s: Tensor) -> Tensor:
        scale = torch.ones_like(s)
        for step in range(steps):
            a, b, c = polynomials.at(step)
            # Each step's factor f(s)/s = a + bs^2 + cs^4 stays finite at s = 0.
            factor = a + s.square() * (b + c * s.square())
            scale = scale * factor
            s = s * factor
        return scale

    return _map_spectrum(
        x, iterations_scale, fallback=lambda: _iterate_on_gram(x, steps, polynomials)
    )


def _exact_scale(s: Tensor) -> Tensor:
    return (s.square() + EXACT_FLOOR**2).rsqrt()


def _map_spectrum(
    x: Tensor, scale_of: Callable[[Tensor], Tensor], fallback: Callable[[], Tensor]
) -> Tensor:
    """U diag(scale_of(s)) U^T x for a wide stack x with singular values s and left singular
    vectors U, from the eigendecomposition of its Gram matrix."""
    gram = x @ x.mT
    try:
        eigenvalues, vectors = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:  # a non-finite update: the products carry it
        return fallback()
    s = eigenvalues.clamp(min=0).sqrt()  # rounding can leave an eigenvalue just below zero
    return ((vectors * scale_of(s).unsqueeze(-2)) @ vectors.mT) @ x


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked ``muon: True`` (weight matrices, and convolution filters taken
    as out × (in·kh·kw) matrices), AdamW for the others.

    Both take the group's ``lr`` and decoupled ``weight_decay``. A Muon step is scaled by
    0.2·√max(rows, cols), which gives it the root-mean-square size of an AdamW step (Liu et al.,
    2025, "Muon is scalable"), so the learning rate and schedule tuned for AdamW carry over.
    ``ns_dtype`` is the dtype of the orthogonalising products (default: bf16 on GPUs, fp32 on
    CPUs); a speed setting of the machine, so it is not part of the saved state. ``exact``
    orthogonalises exactly (``orthogonalize``) instead of by Newton-Schulz iterations, and
    ``polynomials`` names the iterations' coefficients (``NEWTON_SCHULZ``: ``"quintic"`` or
    ``"polar_express"``); a run's configuration sets both again on resume, so they are not saved
    either.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        ns_steps: int = 5,
        fused: bool | None = None,
        ns_dtype: torch.dtype | None = None,
        exact: bool = False,
        polynomials: str = "quintic",
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            betas=tuple(betas),
            eps=eps,
            momentum=momentum,
            ns_steps=ns_steps,
            muon=False,
            fused=fused,  # for the AdamW groups, as torch.optim.AdamW keeps it
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        self.exact = exact
        if polynomials not in NEWTON_SCHULZ:
            raise ValueError(
                f"Muon's polynomials must be one of {', '.join(NEWTON_SCHULZ)}, not {polynomials!r}"
            )
        self.polynomials = polynomials
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take weight matrices and filters, not vectors")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[Tensor]) -> None:
        lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        nesterov = torch._foreach_lerp(grads, buffers, momentum)
        # Weights of one shape are orthogonalised together, a tall matrix as its transpose (the
        # same singular vectors, swapped): a block's layers repeat from block to block, and one
        # batched product per shape costs less than one product per weight (29 weights in 9
        # shapes in the 30-minute recipe's model; the same result, to rounding). A convolution's
        # filters count as the matrix it multiplies patches by: out x in·kh·kw.
        matrices = [n.flatten(1) for n in nesterov]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(matrices):
            by_shape.setdefault((min(m.shape), max(m.shape)), []).append(i)
        torch._foreach_mul_(params, 1 - lr * decay)
        for shape, members in by_shape.items():
            tall = [matrices[i].size(0) > matrices[i].size(1) for i in members]
            stack = torch.stack(
                [matrices[i].T if t else matrices[i] for i, t in zip(members, tall)]
            )
            updates = orthogonalize(
                stack,
                group["ns_steps"],
                self.ns_dtype,
                self.exact,
                NEWTON_SCHULZ[self.polynomials],
            )
            updates = updates.unbind(0)
            torch._foreach_add_(
                [params[i] for i in members],
                [
                    (u.T if t else u).reshape_as(params[i])
                    for i, u, t in zip(members, updates, tall)
                ],
                alpha=-lr * 0.2 * math.sqrt(shape[1]),
            )

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                # The layout of torch.optim.AdamW's state (a float32 step count on the device
                # is what its fused kernel takes).
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            fused=group["fused"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

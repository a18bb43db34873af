"""affine_scan: chunked PyTorch and Triton (interpreter) against the token loop, forward and backward."""

from __future__ import annotations

import pytest
import torch

from seqzoo.ops.affine_scan import adjoint_coeff, affine_scan
from seqzoo.ops.affine_scan.chunked import combine_parts, to_parts
from seqzoo.ops.core import OpInputError
from tests.helpers import assert_rel_close

LENGTHS = (1, 37, 64, 130)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def make_inputs(structure, batch, seq, dim, dtype, *, zeros=False, seed=0):
    """Signed coefficients with |a| < 1 on average; ``zeros`` plants exact and tiny zeros in ``a``."""
    gen = torch.Generator().manual_seed(seed)
    if structure == "diag":
        a = 1.8 * torch.rand(batch, seq, dim, generator=gen, dtype=torch.float64) - 0.9
        b = torch.randn(batch, seq, dim, generator=gen, dtype=torch.float64)
        h0 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    else:
        a = 0.6 * torch.randn(batch, seq, dim, 2, 2, generator=gen, dtype=torch.float64)
        b = torch.randn(batch, seq, dim, 2, generator=gen, dtype=torch.float64)
        h0 = torch.randn(batch, dim, 2, generator=gen, dtype=torch.float64)
    if zeros:
        pick = torch.rand(a.shape, generator=gen, dtype=torch.float64)
        a = torch.where(pick < 0.15, torch.zeros_like(a), a)
        a = torch.where((pick > 0.15) & (pick < 0.3), 1e-30 * torch.sign(a), a)
    return a.to(dtype), b.to(dtype), h0.to(dtype)


def run_with_grads(backend, a, b, h0, reverse, chunk_size=16):
    """Output and gradients of a random projection of it, w.r.t. a, b and the initial state."""
    a, b, h0 = (t.detach().clone().requires_grad_(True) for t in (a, b, h0))
    h, _ = affine_scan(a, b, initial=h0, reverse=reverse, chunk_size=chunk_size, backend=backend)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(h.dtype)
    (h * w).sum().backward()
    return h.detach(), a.grad, b.grad, h0.grad


def check_against_reference(backend, structure, seq, dtype, reverse, dim=5, zeros=False, chunk_size=16):
    a, b, h0 = make_inputs(structure, 2, seq, dim, dtype, zeros=zeros)
    expected = run_with_grads("reference", a.double(), b.double(), h0.double(), reverse)
    got = run_with_grads(backend, a, b, h0, reverse, chunk_size)
    for name, out, ref in zip(("h", "da", "db", "dinitial"), got, expected):
        assert out.dtype == dtype, name
        assert_rel_close(out, ref, TOL[dtype], name)


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("seq", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_matches_loop(structure, reverse, seq, dtype):
    check_against_reference("torch", structure, seq, dtype, reverse)


@pytest.mark.triton
@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("seq", LENGTHS)
def test_triton_matches_loop(structure, reverse, seq):
    check_against_reference("triton", structure, seq, torch.float32, reverse, dim=3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
def test_signed_and_vanishing_coefficients(backend, structure, reverse):
    # Exact zeros and 1e-30 in a: any division by a cumulative product would give inf/NaN here.
    check_against_reference(backend, structure, 45, torch.float64, reverse, dim=3, zeros=True)


def test_default_chunk_and_extra_channel_dims():
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 300, 3, 4, generator=gen, dtype=torch.float64) * 2 - 1
    b = torch.randn(2, 300, 3, 4, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    h, final = affine_scan(a, b, initial=h0, output_final_state=True)
    ref, _ = affine_scan(a, b, initial=h0, backend="reference")
    assert_rel_close(h, ref, 1e-12)
    assert torch.equal(final, h[:, -1])
    hr, final_r = affine_scan(a, b, reverse=True, output_final_state=True)
    assert torch.equal(final_r, hr[:, 0])


def test_reverse_is_the_adjoint():
    """A reverse scan with shifted, transposed coefficients gives the gradient of the forward scan w.r.t. b."""
    a, b, _ = make_inputs("block2", 2, 37, 3, torch.float64)
    b = b.requires_grad_(True)
    h, _ = affine_scan(a, b, backend="reference")
    dh = torch.randn_like(h)
    (grad_b,) = torch.autograd.grad(h, b, dh)
    g, _ = affine_scan(adjoint_coeff(a, "block2", reverse=False), dh, reverse=True)
    assert_rel_close(g, grad_b, 1e-12)


def _left_fold(combine, elems):
    acc = elems[0]
    for e in elems[1:]:
        acc = combine(acc, e)
    return acc


def _tree_fold(combine, elems):
    while len(elems) > 1:
        pairs = [combine(elems[i], elems[i + 1]) for i in range(0, len(elems) - 1, 2)]
        elems = pairs + ([elems[-1]] if len(elems) % 2 else [])
    return elems[0]


def _triton_combine(structure):
    from seqzoo.ops.affine_scan import triton_scan

    fn = (triton_scan._diag_combine if structure == "diag" else triton_scan._block2_combine).fn
    if structure == "diag":
        return lambda x, y: fn(*x, *y)

    def flat(m):
        a, b = m
        return (a[..., 0, 0], a[..., 0, 1], a[..., 1, 0], a[..., 1, 1], b[..., 0], b[..., 1])

    def unflat(t):
        a = torch.stack([torch.stack(t[0:2], -1), torch.stack(t[2:4], -1)], -2)
        return a, torch.stack(t[4:6], -1)

    return lambda x, y: unflat(fn(*flat(x), *flat(y)))


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("which", ["torch", "triton"])
def test_combine_is_associative(structure, which):
    """The interpreter folds left to right, so a non-associative combine would pass kernel tests there."""
    a, b, _ = make_inputs(structure, 1, 13, 4, torch.float64, seed=5)
    elems = [(a[:, t], b[:, t]) for t in range(a.shape[1])]
    if which == "torch":
        combine = combine_parts
        elems = [to_parts(structure, x, y) for x, y in elems]
    else:
        combine = _triton_combine(structure)
    left, tree = _left_fold(combine, elems), _tree_fold(combine, elems)
    for x, y in zip(left, tree):
        for u, v in zip(x, y) if which == "torch" else [(x, y)]:
            assert_rel_close(v, u, 1e-12, "tree fold")
    # The composed map's offset is the scan's last state.
    ref, _ = affine_scan(a, b, backend="reference")
    if which == "torch":
        offset = left[1][0] if structure == "diag" else torch.stack(left[1], -1)
    else:
        offset = left[1]
    assert_rel_close(offset, ref[:, -1], 1e-12, "fold vs scan")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(backend, structure, reverse):
    a, b, h0 = make_inputs(structure, 1, 7, 2, torch.float64, seed=7)
    inputs = tuple(t.requires_grad_(True) for t in (a, b, h0))

    def fn(a, b, h0):
        return affine_scan(a, b, initial=h0, reverse=reverse, chunk_size=4, backend=backend)[0]

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_half_precision_computes_in_fp32():
    a, b, h0 = make_inputs("diag", 2, 70, 4, torch.float64, seed=9)
    h, _ = affine_scan(a.bfloat16(), b.bfloat16(), initial=h0.bfloat16())
    ref, _ = affine_scan(a.bfloat16().double(), b.bfloat16().double(), initial=h0.bfloat16().double(), backend="reference")
    assert h.dtype == torch.bfloat16
    assert_rel_close(h, ref, 1e-2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 4), None), "a has shape"),
        (lambda: (torch.ones(2, 5, 3, dtype=torch.int64), torch.rand(2, 5, 3), None), "floating-point"),
        (lambda: (torch.rand(2, 5, 3), torch.rand(2, 5, 3), torch.rand(2, 4)), "initial has shape"),
        (lambda: (torch.rand(2, 5, 3, 2, 2), torch.rand(2, 5, 3, 3), None), "2×2 blocks"),
        (lambda: (torch.rand(2, 5, 3, 2, 2), torch.rand(2, 5, 3, 2), torch.rand(2, 3)), "initial has shape"),
        (lambda: (torch.rand(2, 5, 3, 3, 3), torch.rand(2, 5, 3), None), "must match"),
        (lambda: (torch.rand(5, 3), torch.rand(5, 3), None), "batch, seq"),
        (lambda: (torch.rand(2, 0, 3), torch.rand(2, 0, 3), None), "seq must be"),
    ],
)
def test_input_errors(make, message):
    a, b, h0 = make()
    with pytest.raises(OpInputError, match=message) as info:
        affine_scan(a, b, initial=h0)
    assert "\n" not in str(info.value)


def test_bad_backend_and_chunk():
    a = torch.rand(1, 4, 2)
    with pytest.raises(OpInputError, match="unknown backend"):
        affine_scan(a, a, backend="cuda")
    with pytest.raises(OpInputError, match="chunk_size"):
        affine_scan(a, a, chunk_size=0)

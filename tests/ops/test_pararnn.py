"""ParaRNN Newton solver: its invariants (K = T iterations are exact, the first k + 1 states exact after k, the
adjoint backward equals autograd through the loop, …) on ParaGRU, ParaLSTM and a dense Elman cell."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from seqzoo.ops.core import OpInputError
from seqzoo.ops.pararnn import (
    NewtonConfig,
    ParaGRU,
    ParaLSTM,
    RecurrentCell,
    autograd_jacobian,
    expand_jacobian,
    fused_apply,
    linear_solve,
    newton_solve,
    pararnn,
)
from tests.helpers import assert_rel_close, rel_err

CELLS = [ParaGRU, ParaLSTM]


def make(cell_cls, input_size=6, hidden=4, batch=2, seq=24, dtype=torch.float64, bound=0.5, scale=1.0, seed=0):
    torch.manual_seed(seed)
    cell = cell_cls(input_size, hidden, num_heads=2, recurrent_bound=bound).to(dtype)
    if scale != 1.0:
        with torch.no_grad():
            for p in cell.recurrent_parameters():
                p.mul_(scale)
    x = torch.randn(batch, seq, input_size, dtype=dtype)
    h0 = 0.5 * torch.randn(batch, cell.state_size, dtype=dtype)
    return cell, x, h0


class ElmanCell(RecurrentCell):
    """``h' = tanh(W h + u)``: a dense Jacobian, only ``step`` written (autograd supplies the rest)."""

    structure = "dense"

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.state_size = hidden
        self.w = nn.Parameter(0.3 * torch.randn(hidden, hidden) / hidden**0.5)
        self.inp = nn.Linear(input_size, hidden)

    def prepare(self, x):
        return self.inp(x)

    def recurrent_parameters(self):
        return [self.w]

    def step(self, h_prev, u):
        return torch.tanh(h_prev @ self.w.T + u)


class DenseView(RecurrentCell):
    """Another cell's step with its structured Jacobian expanded to a dense matrix (§1.11 vii)."""

    structure = "dense"

    def __init__(self, inner: RecurrentCell) -> None:
        super().__init__()
        self.inner = inner
        self.state_size = inner.state_size

    def prepare(self, x):
        return self.inner.prepare(x)

    def step(self, h_prev, u):
        return self.inner.step(h_prev, u)

    def jacobian(self, h_prev, u):
        return expand_jacobian(self.inner.structure, self.inner.jacobian(h_prev, u))

    def output(self, h):
        return self.inner.output(h)

    def recurrent_parameters(self):
        return self.inner.recurrent_parameters()


@pytest.mark.parametrize("cell_cls", CELLS)
def test_newton_with_seq_iterations_is_sequential(cell_cls):
    # Unbounded and scaled up so that 3 iterations are far from converged: only causality makes this exact.
    cell, x, h0 = make(cell_cls, seq=20, bound=None, scale=30.0)
    ref, _ = pararnn(cell, x, initial=h0, backend="reference")
    out, _, info = pararnn(cell, x, backend="torch", initial=h0, max_iters=20, return_info=True)
    assert info.iterations == 20
    assert_rel_close(out, ref, 1e-12)
    out3, _ = pararnn(cell, x, backend="torch", initial=h0, max_iters=3)
    assert rel_err(out3, ref) > 1e-6, "the test needs a case Newton does not solve in 3 steps"


@pytest.mark.parametrize("cell_cls", CELLS)
@pytest.mark.parametrize("guess", ["f0", "zeros"])
def test_first_k_plus_one_states_exact_after_k_iterations(cell_cls, guess):
    cell, x, h0 = make(cell_cls, seq=12, bound=None, scale=30.0)
    # The full state (ParaLSTM's c too), step by step.
    state_ref = torch.stack(
        [pararnn(cell, x[:, : t + 1], initial=h0, backend="reference", output_final_state=True)[1] for t in range(12)], 1
    )
    for k in range(0 if guess == "f0" else 1, 6):
        exact = k + 1 if guess == "f0" else k
        h = newton_solve(cell, cell.prepare(x), h0, NewtonConfig(max_iters=k, init_guess=guess))
        err = (h - state_ref).abs().amax(dim=(0, 2))
        assert err[:exact].max() < 1e-13, (k, err)
        assert err[exact:].max() > 1e-8, (k, err)  # the rest is genuinely not converged yet


@pytest.mark.parametrize("cell_cls", CELLS)
def test_three_iterations_fp32_long_sequence(cell_cls):
    cell, x, h0 = make(cell_cls, input_size=4, hidden=4, batch=1, seq=4096, dtype=torch.float32)
    out, _, info = pararnn(cell, x, backend="torch", initial=h0, return_info=True)
    with torch.no_grad():
        ref, _ = pararnn(copy.deepcopy(cell).double(), x.double(), initial=h0.double(), backend="reference")
    assert info.iterations == 3 and len(info.residuals) == 3
    assert info.residuals[-1] < info.residuals[0]
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, 1e-5)


@pytest.mark.parametrize("structure", ["diagonal", "block2", "dense"])
def test_linear_solve_is_a_loop_and_ignores_first_jacobian(structure):
    gen = torch.Generator().manual_seed(2)
    b, t, s = 2, 19, 4
    shape = {"diagonal": (b, t, s), "block2": (b, t, s // 2, 2, 2), "dense": (b, t, s, s)}[structure]
    jac = 0.6 * torch.randn(shape, generator=gen, dtype=torch.float64)
    rhs = torch.randn(b, t, s, generator=gen, dtype=torch.float64)
    dense = expand_jacobian(structure, jac)
    delta, expected = torch.zeros(b, s, dtype=torch.float64), []
    for i in range(t):
        delta = (dense[:, i] @ delta.unsqueeze(-1)).squeeze(-1) + rhs[:, i]
        expected.append(delta)
    out = linear_solve(structure, jac, rhs, backend="torch")
    assert_rel_close(out, torch.stack(expected, 1), 1e-12)
    jac2 = jac.clone()
    jac2[:, 0] = 1e6 * torch.randn_like(jac2[:, 0])
    assert torch.equal(linear_solve(structure, jac2, rhs, backend="torch"), out)


@pytest.mark.parametrize("cell_cls", CELLS)
def test_gradients_equal_backprop_through_loop(cell_cls):
    cell, x, h0 = make(cell_cls, seq=30)
    cell_seq = copy.deepcopy(cell)
    w = torch.randn(2, 30, cell.hidden_size, dtype=torch.float64)

    def grads(c, backend):
        xx, hh = x.clone().requires_grad_(True), h0.clone().requires_grad_(True)
        y, final = pararnn(c, xx, initial=hh, backend=backend, max_iters=8, output_final_state=True)
        ((y * w).sum() + final.sum()).backward()
        return [xx.grad, hh.grad] + [p.grad for p in c.parameters()]

    for got, ref in zip(grads(cell, "torch"), grads(cell_seq, "reference")):
        assert_rel_close(got, ref, 1e-10, "gradient")


class _Runner(nn.Module):
    def __init__(self, cell: RecurrentCell) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x, h0):
        return pararnn(self.cell, x, backend="torch", initial=h0, max_iters=5)[0]


@pytest.mark.parametrize("cell_cls", CELLS)
def test_gradcheck_float64(cell_cls):
    """gradcheck of the custom backward in x, the initial state and every recurrent parameter (seq 5, 5 iterations: exact)."""
    cell, x, h0 = make(cell_cls, input_size=2, hidden=2, batch=1, seq=5, bound=0.9, scale=5.0)
    runner = _Runner(cell)
    names = [n for n, p in runner.named_parameters() if any(p is q for q in cell.recurrent_parameters())]
    params = [dict(runner.named_parameters())[n].detach().clone().requires_grad_(True) for n in names]

    def fn(x, h0, *params):
        return torch.func.functional_call(runner, dict(zip(names, params)), (x, h0))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), h0.requires_grad_(True), *params))


class AffineCell(RecurrentCell):
    """``h' = W h + u`` (dense) or ``w ⊙ h + u`` (diagonal): Newton on it is exact after one step."""

    def __init__(self, hidden: int, structure: str) -> None:
        super().__init__()
        self.structure = structure
        self.state_size = hidden
        w = 0.9 * torch.randn(hidden, hidden) if structure == "dense" else 1.5 * torch.randn(hidden)
        self.w = nn.Parameter(w.double())

    def step(self, h_prev, u):
        return h_prev @ self.w.T + u if self.structure == "dense" else self.w * h_prev + u


@pytest.mark.parametrize("structure", ["diagonal", "dense"])
def test_affine_cell_exact_in_one_iteration(structure):
    torch.manual_seed(4)
    cell = AffineCell(3, structure)
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    ref, _ = pararnn(cell, x, backend="reference")
    out, _, info = pararnn(cell, x, backend="torch", max_iters=1, init_guess="zeros", return_info=True)
    assert info.iterations == 1
    assert_rel_close(out, ref, 1e-10)


@pytest.mark.parametrize("cell_cls", CELLS)
def test_analytic_jacobian_matches_autograd(cell_cls):
    cell, x, _ = make(cell_cls, bound=None, scale=10.0)
    u = cell.prepare(x).detach()
    prev = torch.randn(*x.shape[:2], cell.state_size, dtype=torch.float64)
    with torch.no_grad():
        analytic = cell.jacobian(prev, u)
        f, jac = cell.step_and_jacobian(prev, u)
        assert_rel_close(jac, analytic, 1e-14)
        assert_rel_close(f, cell.step(prev, u), 1e-14)
        auto = autograd_jacobian(cell.step, cell.structure, prev, u)
        dense = autograd_jacobian(cell.step, "dense", prev, u)
    assert_rel_close(analytic, auto, 1e-12, "structured autograd")
    assert_rel_close(expand_jacobian(cell.structure, analytic), dense, 1e-12, "dense autograd")


def test_block2_path_equals_dense_path():
    cell, x, h0 = make(ParaLSTM, seq=25, scale=5.0)
    dense = DenseView(copy.deepcopy(cell))
    w = torch.randn(2, 25, cell.hidden_size, dtype=torch.float64)
    results = []
    for c in (cell, dense):
        xx = x.clone().requires_grad_(True)
        y, _, info = pararnn(c, xx, backend="torch", initial=h0, max_iters=3, return_info=True)
        (y * w).sum().backward()
        results.append((y.detach(), xx.grad, c.recurrent_parameters()[0].grad, info.residuals))
    (y1, gx1, gp1, r1), (y2, gx2, gp2, r2) = results
    assert_rel_close(y2, y1, 1e-13)
    assert_rel_close(gx2, gx1, 1e-12)
    assert_rel_close(gp2, gp1, 1e-12)
    assert r1 == pytest.approx(r2, rel=1e-9)


def test_dense_elman_cell_trains_through_solver():
    torch.manual_seed(5)
    cell = ElmanCell(3, 6).double()
    head = nn.Linear(6, 1).double()
    x = torch.randn(6, 24, 3, dtype=torch.float64)
    target = torch.cumsum(x[..., :1], dim=1) / 4  # running sum: needs memory
    opt = torch.optim.Adam(list(cell.parameters()) + list(head.parameters()), lr=3e-2)
    losses = []
    for _ in range(12):
        y, _ = pararnn(cell, x, backend="torch", max_iters=4)
        loss = ((head(y) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert cell.w.grad is not None and cell.inp.weight.grad is not None
    # And the parallel gradient is the sequential one (the Elman cell converges in a few steps).
    xx = x[:2, :10].clone().requires_grad_(True)
    g1 = torch.autograd.grad(pararnn(cell, xx, backend="torch", max_iters=10)[0].sum(), [xx, cell.w])
    g2 = torch.autograd.grad(pararnn(cell, xx, backend="reference")[0].sum(), [xx, cell.w])
    for a, b in zip(g1, g2):
        assert_rel_close(a, b, 1e-10)


def test_damping_early_stop_and_info():
    cell, x, h0 = make(ParaGRU, seq=40)
    ref, _ = pararnn(cell, x, initial=h0, backend="reference")
    _, _, info = pararnn(cell, x, backend="torch", initial=h0, max_iters=50, tol=1e-12, return_info=True)
    assert info.iterations < 10 and info.residuals[-1] <= 1e-12
    damped, _, dinfo = pararnn(cell, x, backend="torch", initial=h0, max_iters=40, omega=0.7, return_info=True)
    assert dinfo.iterations == 40
    assert_rel_close(damped, ref, 1e-9)
    _, _, cinfo = pararnn(cell, x, backend="torch", initial=h0, max_iters=3, check_residual=True, return_info=True)
    assert len(cinfo.residuals) == 4 and cinfo.residuals[3] < cinfo.residuals[2] < cinfo.residuals[0]
    y_seq, final_seq, none_info = pararnn(cell, x, initial=h0, backend="reference", output_final_state=True, return_info=True)
    assert none_info is None and torch.equal(final_seq[:, -cell.hidden_size :], y_seq[:, -1])


@pytest.mark.triton
@pytest.mark.parametrize("cell_cls", CELLS)
def test_triton_scan_backend(cell_cls):
    cell, x, h0 = make(cell_cls, input_size=2, hidden=2, batch=1, seq=20, dtype=torch.float32)
    xx = x.clone().requires_grad_(True)
    y, _ = pararnn(cell, xx, initial=h0, max_iters=20, backend="triton")
    y.sum().backward()
    xs = x.clone().requires_grad_(True)
    ref, _ = pararnn(copy.deepcopy(cell), xs, initial=h0, backend="reference")
    ref.sum().backward()
    assert_rel_close(y, ref, 1e-5)
    assert_rel_close(xx.grad, xs.grad, 1e-4)


# Fused Triton kernels (backend="fused"): under the interpreter with small tiles, so 37
# steps span three time tiles.
FUSED_CHUNK = 16
TRITON = dict(backend="fused")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.triton
@pytest.mark.parametrize("cell_cls", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seq", [1, 37])
def test_fused_equals_parallel(cell_cls, dtype, seq):
    cell, x, h0 = make(cell_cls, input_size=8, hidden=8, seq=seq, dtype=dtype)
    out, final, info = pararnn(
        cell, x, initial=h0, **TRITON, max_iters=3, chunk_size=FUSED_CHUNK, output_final_state=True, return_info=True
    )
    ref, ref_final = pararnn(cell, x, initial=h0, backend="torch", max_iters=3, output_final_state=True)
    assert out.dtype == dtype and info.iterations == 3
    assert_rel_close(out, ref, TOL[dtype])
    assert_rel_close(final, ref_final, TOL[dtype], "final state")


@pytest.mark.triton
@pytest.mark.parametrize("cell_cls", CELLS)
def test_fused_zero_guess_damping_no_initial_and_residual(cell_cls):
    cell, x, _ = make(cell_cls, input_size=8, hidden=8, seq=37, scale=5.0)
    kw = dict(max_iters=4, omega=0.7, init_guess="zeros", check_residual=True, return_info=True)
    out, _, info = pararnn(cell, x, **TRITON, chunk_size=8, **kw)
    ref, _, ref_info = pararnn(cell, x, backend="torch", **kw)
    assert_rel_close(out, ref, 1e-12)
    assert info.residuals == pytest.approx(ref_info.residuals[-1:], rel=1e-9)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's σ(−large) = 1/(1+inf) = 0
@pytest.mark.parametrize("cell_cls", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_seq_iterations_is_sequential(cell_cls, dtype):
    # fp64: unbounded and scaled up, so only causality (k iterations fix h_0..h_k) makes it exact; 12 steps, 3 tiles.
    big = dict(bound=None, scale=30.0) if dtype == torch.float64 else {}
    cell, x, h0 = make(cell_cls, input_size=8, hidden=8, batch=1, seq=12, dtype=dtype, **big)
    ref, _ = pararnn(cell, x, initial=h0, backend="reference")
    out, _ = pararnn(cell, x, initial=h0, **TRITON, max_iters=12, chunk_size=4)
    if big:
        three, _ = pararnn(cell, x, initial=h0, **TRITON, max_iters=3, chunk_size=4)
        assert rel_err(three, ref) > 1e-6, "the test needs a case Newton does not solve in 3 steps"
    assert_rel_close(out, ref, TOL[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("cell_cls", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_gradients_equal_backprop_through_loop(cell_cls, dtype):
    cell, x, h0 = make(cell_cls, input_size=8, hidden=8, seq=37, dtype=dtype)
    cell_seq = copy.deepcopy(cell)
    w = torch.randn(2, 37, cell.hidden_size, dtype=dtype)

    def grads(c, backend, **kw):
        xx, hh = x.clone().requires_grad_(True), h0.clone().requires_grad_(True)
        y, final = pararnn(c, xx, initial=hh, backend=backend, output_final_state=True, **kw)
        ((y * w).sum() + final.sum()).backward()
        return [xx.grad, hh.grad] + [p.grad for p in c.parameters()]

    got = grads(cell, "fused", max_iters=6, chunk_size=FUSED_CHUNK)
    ref = grads(cell_seq, "reference")
    assert len(got) == 2 + len(list(cell.parameters()))
    for g, r in zip(got, ref):
        assert_rel_close(g, r, 1e-4 if dtype == torch.float32 else 1e-10, "gradient")


@pytest.mark.triton
def test_fused_low_precision_input_computes_in_fp32():
    cell, x, h0 = make(ParaGRU, input_size=8, hidden=8, seq=9, dtype=torch.float32)
    xb = x.bfloat16().requires_grad_(True)
    y, _ = pararnn(cell.bfloat16(), xb, initial=h0.bfloat16(), **TRITON, max_iters=9, chunk_size=4)
    y.float().sum().backward()
    ref, _ = pararnn(cell, xb.detach(), initial=h0.bfloat16(), backend="reference")
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    assert_rel_close(y, ref, 2e-2)


@pytest.mark.triton  # on CPU tensors the fused Triton kernel gets past its device check only under the interpreter
def test_fused_errors_are_one_line(monkeypatch):

    class StepGRU(ParaGRU):
        def step(self, h_prev, u):
            return super().step(h_prev, u) * 0.5

    cell, x, _ = make(ParaGRU)
    elman = ElmanCell(6, 4).double()
    cases = [
        (elman, {}, "ParaGRU and ParaLSTM only, not ElmanCell"),
        (StepGRU(6, 4).double(), {}, "not StepGRU"),
        (cell, dict(tol=1e-6), "tol is not supported"),
        (cell, dict(chunk_size=0), "chunk_size"),
    ]
    for c, kwargs, message in cases:
        with pytest.raises(OpInputError, match=message) as err:
            pararnn(c, x, **TRITON, **kwargs)
        assert "\n" not in str(err.value)
    monkeypatch.setattr(importlib.import_module("seqzoo.ops.core.dispatch"), "TRITON_INTERPRET", False)
    with pytest.raises(OpInputError, match="needs CUDA tensors") as err:
        pararnn(cell, x, **TRITON)
    assert "\n" not in str(err.value)


# The compiled CPU kernel (backend="cpp"). Hidden 22 is
# one full 16-channel work item and a 6-channel tail per sequence, so both compiled widths run.
CPU_HIDDEN = 22


@pytest.mark.parametrize("cell_cls", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seq", [1, 37])
def test_cpu_fused_equals_parallel(cell_cls, dtype, seq):
    # Same three Newton iterates as the PyTorch solve, from an initial state, with the final state.
    cell, x, h0 = make(cell_cls, input_size=8, hidden=CPU_HIDDEN, batch=3, seq=seq, dtype=dtype)
    out, final, info = pararnn(cell, x, initial=h0, backend="cpp", output_final_state=True, return_info=True)
    ref, ref_final = pararnn(cell, x, initial=h0, backend="torch", output_final_state=True)
    assert out.dtype == dtype and info.iterations == 3
    assert_rel_close(out, ref, TOL[dtype])
    assert_rel_close(final, ref_final, TOL[dtype], "final state")


@pytest.mark.parametrize("cell_cls", CELLS)
def test_cpu_fused_zero_guess_damping_no_initial_and_residual(cell_cls):
    cell, x, _ = make(cell_cls, input_size=8, hidden=CPU_HIDDEN, seq=37, scale=5.0)
    kw = dict(max_iters=4, omega=0.7, init_guess="zeros", check_residual=True, return_info=True)
    out, _, info = pararnn(cell, x, backend="cpp", **kw)
    ref, _, ref_info = pararnn(cell, x, backend="torch", **kw)
    assert_rel_close(out, ref, 1e-12)
    assert info.residuals == pytest.approx(ref_info.residuals[-1:], rel=1e-9)


@pytest.mark.parametrize("cell_cls", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_fused_seq_iterations_is_sequential(cell_cls, dtype):
    # fp64: unbounded and scaled up, so only causality (k iterations fix h_0..h_k) makes it exact.
    big = dict(bound=None, scale=30.0) if dtype == torch.float64 else {}
    cell, x, h0 = make(cell_cls, input_size=8, hidden=CPU_HIDDEN, batch=2, seq=12, dtype=dtype, **big)
    ref, _ = pararnn(cell, x, initial=h0, backend="reference")
    out, _ = pararnn(cell, x, initial=h0, backend="cpp", max_iters=12)
    if big:
        three, _ = pararnn(cell, x, initial=h0, backend="cpp", max_iters=3)
        assert rel_err(three, ref) > 1e-6, "the test needs a case Newton does not solve in 3 steps"
    assert_rel_close(out, ref, TOL[dtype])


@pytest.mark.parametrize("cell_cls", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_fused_gradients_equal_backprop_through_loop(cell_cls, dtype):
    # The kernel's own backward (adjoint and VJP, no autograd) against autograd through the token loop.
    cell, x, h0 = make(cell_cls, input_size=8, hidden=CPU_HIDDEN, batch=3, seq=37, dtype=dtype)
    cell_seq = copy.deepcopy(cell)
    w = torch.randn(3, 37, cell.hidden_size, dtype=dtype)

    def grads(c, backend, **kw):
        xx, hh = x.clone().requires_grad_(True), h0.clone().requires_grad_(True)
        y, final = pararnn(c, xx, initial=hh, backend=backend, output_final_state=True, **kw)
        ((y * w).sum() + final.sum()).backward()
        return [xx.grad, hh.grad] + [p.grad for p in c.parameters()]

    got = grads(cell, "cpp", max_iters=6)
    ref = grads(cell_seq, "reference")
    assert len(got) == 2 + len(list(cell.parameters()))
    for g, r in zip(got, ref):
        assert_rel_close(g, r, 1e-4 if dtype == torch.float32 else 1e-10, "gradient")


@pytest.mark.parametrize("cell_cls", CELLS)
def test_cpu_fused_does_not_depend_on_the_thread_count(cell_cls):
    # Work items split across threads; parameter gradients are per-sequence sums added in a fixed order. (The
    # solve alone: the input projection's BLAS calls may round differently with another thread count.)
    cell, x, h0 = make(cell_cls, input_size=8, hidden=70, batch=3, seq=29, dtype=torch.float32)
    u = cell.prepare(x).detach()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            cell.zero_grad()
            uu, hh = u.clone().requires_grad_(True), h0.clone().requires_grad_(True)
            y = fused_apply(cell, uu, hh, NewtonConfig())
            y.square().sum().backward()
            results.append([y.detach(), uu.grad, hh.grad] + [p.grad.clone() for p in cell.recurrent_parameters()])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("cell_cls", CELLS)
def test_cpu_fused_saturated_gates_stay_finite_and_match(cell_cls):
    # Inputs of magnitude ~100 push every gate into saturation: the kernel's inlined exp clamps its argument,
    # so σ and tanh reach their limits without inf or NaN, as torch's do.
    cell, x, h0 = make(cell_cls, input_size=8, hidden=CPU_HIDDEN, seq=37, dtype=torch.float32)
    x = 100.0 * x
    out, _ = pararnn(cell, x, initial=h0, backend="cpp")
    ref, _ = pararnn(cell, x, initial=h0, backend="torch")
    assert_rel_close(out, ref, 1e-5)


def test_cpu_fused_low_precision_input_computes_in_fp32():
    cell, x, h0 = make(ParaLSTM, input_size=8, hidden=CPU_HIDDEN, seq=9, dtype=torch.float32)
    xb = x.bfloat16().requires_grad_(True)
    y, _ = pararnn(cell.bfloat16(), xb, initial=h0.bfloat16(), backend="cpp", max_iters=9)
    y.float().sum().backward()
    ref, _ = pararnn(cell, xb.detach(), initial=h0.bfloat16(), backend="reference")
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.bfloat16 for p in cell.parameters())
    assert_rel_close(y, ref, 2e-2)


def test_auto_backend_takes_the_fused_kernel_where_it_runs(monkeypatch):
    solver = importlib.import_module("seqzoo.ops.pararnn.solver")
    pr = importlib.import_module("seqzoo.ops.pararnn")
    calls = []
    for name in ("fused_apply", "parallel_apply"):
        real = getattr(solver, name)
        monkeypatch.setattr(pr, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    gru, x, _ = make(ParaGRU)
    elman = ElmanCell(6, 4).double()
    pararnn(gru, x, backend="auto")
    pararnn(gru, x, backend="auto", tol=1e-9)  # tol needs the Newton iterations over scans
    pararnn(elman, x, backend="auto")  # no fused kernel for this cell
    assert calls == ["fused_apply", "parallel_apply", "parallel_apply"]


def test_cpu_kernel_that_cannot_build_is_one_line_error_and_auto_falls_back(monkeypatch):
    cpu_fused = importlib.import_module("seqzoo.ops.pararnn.cpu_fused")
    monkeypatch.setattr(cpu_fused, "_BUILD", {"error": "cannot build the CPU ParaRNN kernel (no compiler)"})
    cell, x, _ = make(ParaGRU)
    with pytest.raises(OpInputError, match="no compiler.*use backend='torch'") as err:
        pararnn(cell, x, backend="cpp")
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="runs backend='torch'"):
        y, _ = pararnn(cell, x, backend="auto")
    assert_rel_close(y, pararnn(cell, x, backend="torch")[0], 1e-15)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_multi_head_projection_equals_einsum_and_gradchecks(heads):
    # The cells' input projection (a custom Function writing straight into [B, T, gates, N]) against the
    # plain block-diagonal einsum, and its backward against finite differences.
    from seqzoo.ops.pararnn.cells import multihead_projection

    torch.manual_seed(0)
    batch, seq, d_in, n = 2, 5, 4 * heads, 3 * heads
    x = torch.randn(batch, seq, d_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(heads, d_in // heads, 3, n // heads, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    ref = torch.einsum("bthd,hdgn->btghn", x.reshape(batch, seq, heads, -1), weight).reshape(batch, seq, 3, n) + bias
    assert torch.allclose(multihead_projection(x, weight, bias), ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(multihead_projection, (x, weight, bias))


def test_input_errors():
    cell, x, h0 = make(ParaGRU)
    cases = [
        (dict(x=x.long()), "floating-point"),
        (dict(initial=h0[:, :3]), "initial has shape"),
        (dict(backend="fast"), "unknown backend"),
        (dict(init_guess="ones"), "init_guess"),
        (dict(max_iters=-1), "max_iters"),
        (dict(omega=0.0), "omega"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(x=x[:, :0]), "seq >= 1"),
    ]
    for kwargs, message in cases:
        args = dict(x=x)
        args.update(kwargs)
        with pytest.raises(OpInputError, match=message):
            pararnn(cell, args.pop("x"), **args)
    with pytest.raises(ValueError, match="num_heads"):
        ParaGRU(5, 4, num_heads=2)

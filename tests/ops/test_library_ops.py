"""The Triton kernels as ``torch.library`` ops (namespace ``seqzoo``), checked on the CPU under the interpreter.

What runs here:

* ``torch.library.opcheck`` with the checks that need no compiled kernel: ``test_schema`` (the op runs, mutates
  and aliases nothing it does not declare), ``test_faketensor`` (the fake implementation gives the real
  outputs' shapes, dtypes and strides) and, for the differentiable ops, ``test_autograd_registration``.
  ``test_aot_dispatch_dynamic`` cannot run here: it traces the op's body with fake tensors, and an interpreted
  kernel reads its arguments' memory (the GPU suite, ``tests/gpu/test_compile.py``, compiles the ops instead).
* ``torch.compile(fullgraph=True, backend=...)`` of every public Triton entry point on a dense batch, with a
  backend that records the graph and runs it eagerly: no graph break, each launch one ``seqzoo`` node, the
  same numbers as eager. Inductor (which would compile the kernels) is the GPU suite's.

Numerical agreement with the references is each family's own test file; the numbers here are small shapes.
"""

from __future__ import annotations

import pytest
import torch

from seqzoo.ops.affine_scan import affine_scan
from seqzoo.ops.core import ChunkLayout
from seqzoo.ops.gated_delta_rule import gated_delta_rule
from seqzoo.ops.gla import gla
from seqzoo.ops.neural_memory import neural_memory
from seqzoo.ops.pararnn import ParaGRU, ParaLSTM
from seqzoo.ops.simple_gla import simple_gla

pytestmark = pytest.mark.triton

OPCHECK = ("test_schema", "test_faketensor")
OPCHECK_GRAD = (*OPCHECK, "test_autograd_registration")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_inputs(batch=1, seq=20, heads=1, key=16, value=16, per_key=False, seed=0, dtype=torch.float32):
    gen = _gen(seed)
    q, k = (torch.randn(batch, seq, heads, key, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, seq, heads, value, generator=gen, dtype=dtype)
    g_shape = (batch, seq, heads, key) if per_key else (batch, seq, heads)
    g = -torch.rand(g_shape, generator=gen, dtype=dtype) * 0.3
    beta = torch.rand(batch, seq, heads, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, heads, key, value, generator=gen, dtype=dtype)
    return q, k, v, g, beta, h0


def _packing(seq: int, offsets: list[int]):
    from seqzoo.ops.core.triton_host import packed_indices

    return tuple(packed_indices(ChunkLayout.build(1, seq, 64, torch.tensor(offsets), torch.device("cpu"))))


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


# ------------------------------------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("g_mode", [0, 1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_opcheck_gla_family(g_mode, packed):
    from seqzoo.ops.simple_gla import triton as ops

    seq = 70 if packed else 20
    q, k, v, g, _, h0 = _linear_inputs(seq=seq, per_key=g_mode == 2)
    g = None if g_mode == 0 else g
    packing = _packing(seq, [0, 5, 70]) if packed else (None, None, None)
    h0 = torch.cat([h0, h0]) if packed else h0
    fwd_args = (*_leaves(q, k, v, g, h0), *packing, 0.25, g_mode, True, "ieee")
    torch.library.opcheck(ops._gla_triton_fwd, fwd_args, test_utils=OPCHECK_GRAD)
    with torch.no_grad():
        o, ht, gc, A = ops._gla_triton_fwd(q, k, v, g, h0, *packing, 0.25, g_mode, True, "ieee")
    gc, A = (None if t.numel() == 0 else t for t in (gc, A))
    bwd_args = (q, k, v, gc, h0, A, ht, torch.randn_like(o), torch.randn_like(ht), *packing, 0.25, g_mode, "ieee")
    torch.library.opcheck(ops._gla_triton_bwd, bwd_args, test_utils=OPCHECK)
    fused_args = (q, k, v, g, h0, packing[0], 0.25, g_mode, True)
    torch.library.opcheck(ops._gla_fused, fused_args, test_utils=OPCHECK)
    # Without a final state the op returns a 0-element placeholder, in the fake implementation too.
    torch.library.opcheck(ops._gla_triton_fwd, (q, k, v, g, None, *packing, 0.25, g_mode, False, "ieee"), test_utils=OPCHECK)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "delta"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_opcheck_gated_delta_rule(gated, packed):
    from seqzoo.ops.gated_delta_rule import triton as ops

    seq = 70 if packed else 20
    q, k, v, g, beta, h0 = _linear_inputs(seq=seq)
    k = torch.nn.functional.normalize(k, dim=-1)
    g = g if gated else None
    packing = _packing(seq, [0, 5, 70]) if packed else (None, None, None)
    h0 = torch.cat([h0, h0]) if packed else h0
    fwd_args = (*_leaves(q, k, v, beta, g, h0), *packing, 0.25, True, "ieee")
    torch.library.opcheck(ops._gated_delta_rule_triton_fwd, fwd_args, test_utils=OPCHECK_GRAD)
    with torch.no_grad():
        o, ht, gc, Ai = ops._gated_delta_rule_triton_fwd(q, k, v, beta, g, h0, *packing, 0.25, True, "ieee")
    gc = gc if gated else None
    bwd_args = (q, k, v, beta, gc, Ai, h0, torch.randn_like(o), torch.randn_like(ht), *packing, 0.25, "ieee")
    torch.library.opcheck(ops._gated_delta_rule_triton_bwd, bwd_args, test_utils=OPCHECK)
    torch.library.opcheck(ops._gated_delta_rule_fused, (q, k, v, beta, g, h0, packing[0], 0.25, True), test_utils=OPCHECK)


def _memory_inputs(memory: str, seq=20, heads=1, dim=16, chunk=8):
    from seqzoo.ops.neural_memory.chunk import gate_coefficients

    gen = _gen(3)
    q, k, v = (torch.randn(1, seq, heads, dim, generator=gen) for _ in range(3))
    lr, momentum, decay = (torch.rand(1, seq, heads, generator=gen) * 0.1 for _ in range(3))
    coef = gate_coefficients(momentum, decay, torch.float32, chunk, "token")
    names = ("beta", "f", "C", "beta_last", "f_last", "h_last", "c_last", "e_last")
    coefs = [getattr(coef, n).contiguous() for n in names]
    if memory == "linear":
        state = [torch.randn(1, heads, dim, dim, generator=gen) * 0.1 for _ in range(2)]
    else:
        state = [torch.randn(1, heads, dim, 32, generator=gen) * 0.1, torch.randn(1, heads, 32, dim, generator=gen) * 0.1]
        state = [*state, *(torch.zeros_like(t) for t in state)]
    return [q, k, v, lr, *coefs], state


def test_opcheck_neural_memory():
    from seqzoo.ops.neural_memory import triton_kernel as ops

    tensors, state = _memory_inputs("linear")
    fwd_args = (*_leaves(*tensors, *state), 8, True, "ieee")
    torch.library.opcheck(ops._linear_fwd, fwd_args, test_utils=OPCHECK_GRAD)
    with torch.no_grad():
        y, w, s, w_start, s_start = ops._linear_fwd(*tensors, *state, 8, True, "ieee")
    bwd_args = (*tensors, w_start, s_start, torch.randn_like(y), torch.randn_like(w), torch.randn_like(s), 8, "ieee")
    torch.library.opcheck(ops._linear_bwd, bwd_args, test_utils=OPCHECK)
    tensors, state = _memory_inputs("mlp")
    mlp_args = (*tensors, *state, None, None, 8, "gelu", False, 1e-5, "ieee")
    torch.library.opcheck(ops._mlp_fwd, mlp_args, test_utils=OPCHECK)


@pytest.mark.parametrize("structure", ["diag", "block2"])
def test_opcheck_affine_scan(structure):
    from seqzoo.ops.affine_scan import triton_scan as ops

    gen = _gen(4)
    tail = () if structure == "diag" else (2,)
    a = torch.rand(2, 30, 5, *tail, *tail, generator=gen)
    b = torch.randn(2, 30, 5, *tail, generator=gen)
    h0 = torch.randn(2, 5, *tail, generator=gen)
    torch.library.opcheck(ops._affine_scan_triton, (a, b, h0, structure, True, 16), test_utils=OPCHECK)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_opcheck_pararnn(kind):
    from seqzoo.ops.pararnn import triton_fused as ops

    gen = _gen(5)
    hidden = 8
    size = hidden if kind == "gru" else 2 * hidden
    u = torch.randn(2, 20, 3, hidden, generator=gen)
    rec = torch.rand(3, hidden, generator=gen) * 0.5
    peep = torch.rand(2, hidden, generator=gen) * 0.5 if kind == "lstm" else None
    h0 = torch.randn(2, size, generator=gen)
    fwd_args = (u, rec, peep, h0, kind, 3, 1.0, False, 16, None)
    torch.library.opcheck(ops._pararnn_fused_fwd, fwd_args, test_utils=OPCHECK)
    h = ops._pararnn_fused_fwd(*fwd_args)
    torch.library.opcheck(ops._pararnn_fused_adjoint, (u, rec, peep, h, torch.randn_like(h), kind, 16, None), test_utils=OPCHECK)


# ------------------------------------------------------------------------------------------ torch.compile


class _Recorder:
    """A ``torch.compile`` backend that keeps the captured graphs and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def seqzoo_ops(self) -> list[str]:
        return [str(n.target) for gm in self.graphs for n in gm.graph.nodes if "seqzoo" in str(n.target)]


def _compiled_equals_eager(fn, *args, ops: tuple[str, ...]):
    torch._dynamo.reset()
    recorder = _Recorder()
    compiled = torch.compile(fn, backend=recorder, fullgraph=True)
    got, want = compiled(*args), fn(*args)
    assert len(recorder.graphs) == 1
    found = recorder.seqzoo_ops()
    for op in ops:
        assert f"seqzoo.{op}.default" in found, f"{op} not in the graph: {found}"
    leaves = [[t for t in torch.utils._pytree.tree_leaves(x) if t is not None] for x in (got, want)]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves):
        assert torch.equal(a, b)


def test_compile_linear_attention_entry_points():
    q, k, v, g, beta, h0 = _linear_inputs(batch=2, seq=20, heads=2, per_key=False)
    g_key = -torch.rand(2, 20, 2, 16, generator=_gen(6)) * 0.3
    kw = dict(initial_state=h0, output_final_state=True)
    for backend, op in (("triton", "gla_triton_fwd"), ("fused", "gla_fused")):
        _compiled_equals_eager(lambda *x, b=backend: simple_gla(*x, backend=b, **kw), q, k, v, g, ops=(op,))
        _compiled_equals_eager(lambda *x, b=backend: gla(*x, backend=b, **kw), q, k, v, g_key, ops=(op,))
    kn = torch.nn.functional.normalize(k, dim=-1)
    for backend, op in (("triton", "gated_delta_rule_triton_fwd"), ("fused", "gated_delta_rule_fused")):
        _compiled_equals_eager(lambda *x, b=backend: gated_delta_rule(*x, backend=b, **kw), q, kn, v, beta, g, ops=(op,))


def test_compile_with_autograd_matches_eager():
    """Training through a compiled call: the forward op in the graph, its registered backward when differentiating."""
    q, k, v, g, _, h0 = _linear_inputs(batch=1, seq=20, heads=1)

    def loss(q, k, v, g, h0):
        o, ht = simple_gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
        return (o * o).sum() + ht.sum()

    eager = _leaves(q, k, v, g, h0)
    loss(*eager).backward()
    torch._dynamo.reset()
    recorder = _Recorder()
    leaves = _leaves(q, k, v, g, h0)
    torch.compile(loss, backend=recorder, fullgraph=True)(*leaves).backward()
    assert "seqzoo.gla_triton_fwd.default" in recorder.seqzoo_ops()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


def test_compile_memory_and_scans():
    from seqzoo.ops.neural_memory import MLPMemoryState

    gen = _gen(7)
    q, k, v = (torch.randn(1, 20, 1, 16, generator=gen) for _ in range(3))
    lr, momentum, decay = (torch.rand(1, 20, 1, generator=gen) * 0.1 for _ in range(3))
    w1, w2 = torch.randn(1, 1, 16, 32, generator=gen) * 0.1, torch.randn(1, 1, 32, 16, generator=gen) * 0.1
    mlp_state = MLPMemoryState(w1, w2, torch.zeros_like(w1), torch.zeros_like(w2))
    for memory, state, op in (("linear", None, "neural_memory_linear_triton_fwd"), ("mlp", mlp_state, "neural_memory_mlp_triton_fwd")):

        def run(*x, memory=memory, state=state):
            return neural_memory(*x, chunk_size=8, memory=memory, initial_state=state, output_final_state=True, backend="triton")

        _compiled_equals_eager(run, q, k, v, lr, momentum, decay, ops=(op,))
    a, b = torch.rand(2, 30, 5, generator=gen), torch.randn(2, 30, 5, generator=gen)
    _compiled_equals_eager(lambda a, b: affine_scan(a, b, reverse=True, backend="triton"), a, b, ops=("affine_scan_triton",))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_compile_pararnn_fused_ops(kind):
    """The fused Newton solve and its adjoint compile as one op each. (Their autograd, ``FusedNewtonFunction``,
    takes the cell module and differentiates its ``step`` in Python; Dynamo of torch 2.13 mis-binds that
    Function's arguments, so ``pararnn(..., backend="fused")`` itself is not compiled here.)"""
    from seqzoo.ops.pararnn.solver import _fused_vectors
    from seqzoo.ops.pararnn.triton_fused import pararnn_fused, pararnn_fused_adjoint

    torch.manual_seed(0)
    cell = (ParaGRU if kind == "gru" else ParaLSTM)(8, 8, num_heads=2)
    u = cell.prepare(torch.randn(2, 20, 8)).detach()
    rec, peep = _fused_vectors(cell, kind, torch.float32)
    h0 = torch.randn(2, cell.state_size)
    _compiled_equals_eager(lambda u, h0: pararnn_fused(kind, u, rec, peep, h0, 3, 1.0, False, 16), u, h0, ops=("pararnn_fused_fwd",))
    h = pararnn_fused(kind, u, rec, peep, h0, 3, 1.0, False, 16)
    grad = torch.randn_like(h)
    _compiled_equals_eager(
        lambda u, h, grad: pararnn_fused_adjoint(kind, u, rec, peep, h, grad, 16), u, h, grad, ops=("pararnn_fused_adjoint",)
    )

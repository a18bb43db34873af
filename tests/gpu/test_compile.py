"""``torch.compile(fullgraph=True)`` of every Triton op on CUDA: Inductor compiles the ``seqzoo`` ops, and the
compiled call equals the eager one (outputs, and gradients where the op is differentiable).

The CPU suite cannot do this: Inductor traces a ``torch.library.triton_op``'s body with fake tensors, which an
interpreted kernel cannot take. What it does check (``tests/ops/test_library_ops.py``) is each op's schema and
fake implementation, and that Dynamo captures every public entry point as one graph holding the ``seqzoo`` ops.
Without CUDA every test here is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from seqzoo.ops.gla import gla
from seqzoo.ops.pararnn import ParaGRU, ParaLSTM
from tests.gpu.test_cuda import _delta, _gated_delta, _gla, _memory, _scan, _simple_gla, run_case
from tests.helpers import rel_err
from tests.ops.test_affine_scan import make_inputs as scan_inputs
from tests.ops.test_delta_rule import make_inputs as delta_inputs
from tests.ops.test_gla import make_inputs as gla_inputs
from tests.ops.test_neural_memory import make_inputs as memory_inputs
from tests.ops.test_simple_gla import make_inputs as simple_gla_inputs

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor compiles the Triton ops)"),
    pytest.mark.gpu,
]

CUDA = torch.device("cuda")


@dataclass
class CompileCase:
    """One public call ``(inputs, backend) -> outputs`` on float64 CPU inputs, compiled with ``backend``."""

    name: str
    inputs: Any
    call: Any
    backend: str
    grads: bool = True


# Dense batches (a packed call reads its offsets on the host: a graph break by design), 100 tokens (a partial chunk).
CASES = [
    CompileCase("simple_gla", lambda: simple_gla_inputs(2, 100, 2, 64, 64), _simple_gla, "triton"),
    CompileCase("simple_gla_fused", lambda: simple_gla_inputs(2, 40, 2, 64, 64), _simple_gla, "fused", grads=False),
    CompileCase("gla", lambda: gla_inputs(2, 100, 2, 64, 64), _gla, "triton"),
    CompileCase("gla_fused", lambda: gla_inputs(2, 40, 2, 64, 64), _gla, "fused", grads=False),
    CompileCase("gated_delta_rule", lambda: delta_inputs(2, 100, 2, 64, 64), _gated_delta, "triton"),
    CompileCase("gated_delta_rule_fused", lambda: delta_inputs(2, 40, 2, 64, 64), _gated_delta, "fused", grads=False),
    CompileCase("delta_rule", lambda: delta_inputs(2, 100, 2, 64, 64), _delta, "triton"),
    CompileCase("memory_linear", lambda: memory_inputs(2, 100, 2, 64, 64), _memory("linear", "token"), "triton"),
    CompileCase(
        "memory_mlp", lambda: memory_inputs(2, 100, 2, 32, 32, hidden=64, memory="mlp"), _memory("mlp", "token"), "triton", grads=False
    ),
    CompileCase("scan_diag_reverse", lambda: scan_inputs("diag", 2, 300, 64, torch.float64), _scan(True), "triton"),
    CompileCase("scan_2x2", lambda: scan_inputs("block2", 2, 300, 32, torch.float64), _scan(False), "triton"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_op_equals_eager(case):
    torch._dynamo.reset()
    eager = run_case(case.call, case.inputs(), CUDA, torch.float32, case.backend, case.grads)
    compiled = run_case(torch.compile(case.call, fullgraph=True), case.inputs(), CUDA, torch.float32, case.backend, case.grads)
    assert len(compiled) == len(eager)
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert rel_err(a, b) < 1e-5, f"{case.name}: tensor {i} of {len(eager)}: compiled vs eager {rel_err(a, b):.2e}"


def test_compiled_packed_call_equals_eager():
    """With ``cu_seqlens`` the host reads the offsets (one graph break); the ops on either side still compile."""
    q, k, v, g, _ = (t.to(CUDA, torch.float32) for t in gla_inputs(1, 150, 2, 64, 64))
    cu = torch.tensor([0, 7, 90, 150], device=CUDA)
    h0 = torch.randn(3, 2, 64, 64, device=CUDA)

    def call(q, k, v, g, h0):
        return gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="triton")

    torch._dynamo.reset()
    for a, b in zip(torch.compile(call)(q, k, v, g, h0), call(q, k, v, g, h0)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_compiled_pararnn_fused_ops_equal_eager(kind):
    """The fused Newton solve and its adjoint, each one op. Their autograd (``FusedNewtonFunction``, which
    differentiates the cell's ``step`` in Python) is not compiled: Dynamo of torch 2.13 mis-binds that
    Function's module argument (seen on the CPU)."""
    from seqzoo.ops.pararnn.solver import _fused_vectors
    from seqzoo.ops.pararnn.triton_fused import pararnn_fused, pararnn_fused_adjoint

    torch.manual_seed(0)
    cell = (ParaGRU if kind == "gru" else ParaLSTM)(128, 128, num_heads=4, recurrent_bound=0.9).to(CUDA)
    with torch.no_grad():
        u = cell.prepare(torch.randn(2, 300, 128, device=CUDA))
        rec, peep = _fused_vectors(cell, kind, torch.float32)
        h0 = torch.randn(2, cell.state_size, device=CUDA)
        torch._dynamo.reset()
        h = torch.compile(lambda u, h0: pararnn_fused(kind, u, rec, peep, h0, 3), fullgraph=True)(u, h0)
        assert rel_err(h, pararnn_fused(kind, u, rec, peep, h0, 3)) < 1e-5
        grad = torch.randn_like(h)
        lam = torch.compile(lambda u, h, grad: pararnn_fused_adjoint(kind, u, rec, peep, h, grad), fullgraph=True)(u, h, grad)
        assert rel_err(lam, pararnn_fused_adjoint(kind, u, rec, peep, h, grad)) < 1e-5

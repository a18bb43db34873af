"""Triton kernels and mixers on a real GPU, against the float64 references on the CPU.

The rest of the suite runs the kernels under ``TRITON_INTERPRET=1`` on small shapes; this file runs
them compiled, on CUDA tensors, at widths the interpreter cannot afford (head dims 64 and 128, several
hundred tokens, lengths that are not a multiple of any chunk). Without CUDA every test here is skipped:
they are the GPU session's checks, not part of the CPU suite's coverage.

Each op case gives float64 inputs on the CPU and a call ``(inputs, backend) -> outputs``. The oracle is
``backend="reference"`` (the token loop) in float64 on the CPU; the candidates are the Triton and the
chunked PyTorch backends on the GPU. Outputs and the gradients of random cotangents are compared by
relative error. fp32 tolerances follow the kernels' precision: every kernel now takes its fp32 products in
IEEE fp32 (``seqzoo.ops.core.precision.dot_precision``); the GLA cases keep the 5e-3 they were given when
their kernels ran in tf32 (≈1e-3 per product), until a GPU run has measured the IEEE figure.
bf16 is judged against the chunked PyTorch path in bf16 on the same inputs: Triton may not be more
than 2× (plus a small floor) further from the float64 oracle than it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from seqzoo.models import LanguageModel, mixer_names
from seqzoo.ops.affine_scan import affine_scan
from seqzoo.ops.checkpoint_attention import checkpoint_attention, checkpoint_offsets
from seqzoo.ops.delta_rule import delta_rule
from seqzoo.ops.gated_delta_rule import gated_delta_rule
from seqzoo.ops.gla import gla
from seqzoo.ops.neural_memory import neural_memory
from seqzoo.ops.pararnn import ParaGRU, ParaLSTM, pararnn
from seqzoo.ops.simple_gla import simple_gla
from tests.helpers import rel_err
from tests.ops.test_affine_scan import make_inputs as scan_inputs
from tests.ops.test_checkpoint_attention import make_inputs as ckpt_inputs
from tests.ops.test_delta_rule import make_inputs as delta_inputs
from tests.ops.test_gla import make_inputs as gla_inputs
from tests.ops.test_neural_memory import make_inputs as memory_inputs
from tests.ops.test_simple_gla import make_inputs as simple_gla_inputs

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU suite runs the kernels in the interpreter)"),
    pytest.mark.gpu,
]

CUDA = torch.device("cuda")
F64 = torch.float64


def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nest of dicts, lists, tuples and NamedTuples (``None`` kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def _flatten(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map(obj, lambda t: out.append(t) or t)
    return out


def run_case(
    call: Callable[[Any, str], Any], inputs: Any, device: torch.device, dtype: torch.dtype, backend: str, grads: bool = True
) -> list[torch.Tensor]:
    """Outputs, then (with ``grads``) the gradients of every input, for random cotangents drawn in float64
    on the CPU (the same cotangents for every device, dtype and backend). Results come back as float64 on
    the CPU."""
    leaves = _map(inputs, lambda t: t.detach().to(device=device, dtype=dtype).requires_grad_(grads))
    with torch.set_grad_enabled(grads):
        outputs = _flatten(call(leaves, backend))
    if not grads:
        return [t.detach().to("cpu", F64) for t in outputs]
    gen = torch.Generator().manual_seed(1234)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=F64).to(device=device, dtype=o.dtype) for o in outputs]
    params = _flatten(leaves)
    input_grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outputs, cotangents)), params, allow_unused=True)
    return [t.detach().to("cpu", F64) for t in outputs] + [
        torch.zeros(p.shape, dtype=F64) if g is None else g.detach().to("cpu", F64) for p, g in zip(params, input_grads)
    ]


@dataclass
class OpCase:
    """One op call: float64 CPU inputs, the call ``(inputs, backend) -> outputs`` and its fp32 tolerance."""

    name: str
    inputs: Callable[[], Any]
    call: Callable[[Any, str], Any]
    fp32_tol: float
    triton_grads: bool = True  # False: the Triton path is inference-only (MLP memory); outputs are compared
    bf16: bool = True  # False: no bf16 run (each dtype is another round of compiles)


def _gla(x, backend):
    q, k, v, g, s0 = x
    return gla(q, k, v, g, initial_state=s0, output_final_state=True, backend=backend)


def _simple_gla(x, backend):
    q, k, v, g, s0 = x
    return simple_gla(q, k, v, g, initial_state=s0, output_final_state=True, backend=backend)


def _gated_delta(x, backend):
    return gated_delta_rule(
        x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=x["initial_state"], output_final_state=True, backend=backend
    )


def _delta(x, backend):
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], initial_state=x["initial_state"], output_final_state=True, backend=backend)


def _memory(memory: str, retrieval: str, chunk_size: int = 16):
    def call(x, backend):
        inputs, state = x
        return neural_memory(
            inputs["q"],
            inputs["k"],
            inputs["v"],
            inputs["lr"],
            inputs["momentum"],
            inputs["decay"],
            chunk_size=chunk_size,
            memory=memory,
            initial_state=state,
            output_final_state=True,
            backend=backend,
            retrieval=retrieval,
        )

    return call


def _scan(reverse: bool):
    def call(x, backend):
        a, b, h0 = x
        return affine_scan(a, b, initial=h0, reverse=reverse, output_final_state=True, chunk_size=64, backend=backend)

    return call


def _ckpt(segment_len: int, offsets: list[int] | None = None):
    def call(x, backend):
        cu = None if offsets is None else torch.tensor(offsets, device=x[0].device)
        return checkpoint_attention(*x, segment_len=segment_len, cu_seqlens=cu, backend=backend)[0]

    return call


_CKPT_DOCS = [0, 37, 38, 250, 300]  # a 1-token document and documents shorter and longer than a query block

# Batch 2, 3 heads, 300 tokens: 300 is no multiple of 16, 32 or 64, so every kernel ends on a partial chunk.
OP_CASES = [
    OpCase("gla_d64", lambda: gla_inputs(2, 300, 3, 64, 64), _gla, 5e-3),
    OpCase("gla_d128", lambda: gla_inputs(1, 300, 2, 128, 128), _gla, 5e-3),
    OpCase("simple_gla_d64", lambda: simple_gla_inputs(2, 300, 3, 64, 64), _simple_gla, 5e-3),
    OpCase("simple_gla_d128_v64", lambda: simple_gla_inputs(1, 300, 2, 128, 64), _simple_gla, 5e-3),
    OpCase("gated_delta_d64", lambda: delta_inputs(2, 300, 3, 64, 64), _gated_delta, 1e-4),
    OpCase("gated_delta_d128", lambda: delta_inputs(1, 300, 2, 128, 128), _gated_delta, 1e-4),
    # key_dim 256: four key tiles, the unpipelined state kernels (minutes of compiles, so fp32 only).
    OpCase("gated_delta_d256", lambda: delta_inputs(1, 200, 1, 256, 64), _gated_delta, 1e-4, bf16=False),
    OpCase("delta_d64_v128", lambda: delta_inputs(2, 300, 3, 64, 128), _delta, 1e-4),
    OpCase("memory_linear_token", lambda: memory_inputs(2, 300, 3, 64, 64), _memory("linear", "token"), 1e-4),
    OpCase("memory_linear_chunk", lambda: memory_inputs(2, 300, 3, 64, 64), _memory("linear", "chunk"), 1e-4),
    OpCase("memory_linear_c64", lambda: memory_inputs(1, 300, 2, 64, 64), _memory("linear", "token", 64), 1e-4),
    OpCase(
        "memory_mlp_token",
        lambda: memory_inputs(2, 300, 3, 32, 32, hidden=64, memory="mlp"),
        _memory("mlp", "token"),
        1e-4,
        triton_grads=False,
    ),
    # Checkpoint attention: grouped KV heads, L = 10 (several checkpoint blocks) and 64, head dims 64 and 128, packed.
    OpCase("ckpt_d64_gqa_L10", lambda: ckpt_inputs(2, 1000, 4, 2, 64, 64, 10), _ckpt(10), 1e-4),
    OpCase("ckpt_d128_L64", lambda: ckpt_inputs(1, 300, 2, 2, 128, 128, 64), _ckpt(64), 1e-4),
    OpCase(
        "ckpt_d64_packed_L10",
        lambda: ckpt_inputs(1, 300, 4, 1, 64, 64, 10, num_ckpt=checkpoint_offsets(_CKPT_DOCS, 10)[-1]),
        _ckpt(10, _CKPT_DOCS),
        1e-4,
    ),
    OpCase("scan_diag", lambda: scan_inputs("diag", 2, 1000, 256, F64), _scan(False), 1e-5),
    OpCase("scan_diag_reverse", lambda: scan_inputs("diag", 2, 1000, 256, F64), _scan(True), 1e-5),
    OpCase("scan_2x2", lambda: scan_inputs("block2", 2, 1000, 128, F64), _scan(False), 1e-5),
    OpCase("scan_2x2_reverse", lambda: scan_inputs("block2", 2, 1000, 128, F64), _scan(True), 1e-5),
]


def _errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    """Relative errors, tensor by tensor; ``got`` may hold only the outputs (a prefix of ``ref``)."""
    assert 0 < len(got) <= len(ref)
    for g in got:
        assert torch.isfinite(g).all(), "non-finite values"
    return [rel_err(g, r) for g, r in zip(got, ref)]


@pytest.fixture(scope="module")
def references() -> dict[str, list[torch.Tensor]]:
    return {}


def _reference(case: OpCase, cache: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    if case.name not in cache:
        cache[case.name] = run_case(case.call, case.inputs(), torch.device("cpu"), F64, "reference")
    return cache[case.name]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.name)
def test_op_fp32_matches_float64_reference(case, backend, references):
    ref = _reference(case, references)
    grads = case.triton_grads or backend != "triton"
    errors = _errors(run_case(case.call, case.inputs(), CUDA, torch.float32, backend, grads), ref)
    worst = max(range(len(errors)), key=errors.__getitem__)
    assert errors[worst] < case.fp32_tol, f"{case.name}/{backend}: tensor {worst} of {len(errors)} has relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("case", [c for c in OP_CASES if c.bf16 and not c.name.startswith("scan")], ids=lambda c: c.name)
def test_op_bf16_no_worse_than_chunked_torch(case, references):
    ref = _reference(case, references)
    triton_err = _errors(run_case(case.call, case.inputs(), CUDA, torch.bfloat16, "triton", case.triton_grads), ref)
    torch_err = _errors(run_case(case.call, case.inputs(), CUDA, torch.bfloat16, "torch", case.triton_grads), ref)
    for i, (a, b) in enumerate(zip(triton_err, torch_err)):
        assert a < 2 * b + 1e-2, f"{case.name}: tensor {i}: triton bf16 error {a:.2e} vs chunked torch bf16 {b:.2e}"


# ParaRNN: the fused Newton kernel and the parallel solve with Triton scans, against the float64 solve on
# the CPU with the same iterations (the parallel solve itself is tested against the sequential loop).
def _pararnn_case(cell_cls, seq: int, hidden: int = 256, batch: int = 4):
    torch.manual_seed(0)
    cell = cell_cls(hidden, hidden, num_heads=4, recurrent_bound=0.9).double()
    x = torch.randn(batch, seq, hidden, dtype=F64)
    h0 = 0.5 * torch.randn(batch, cell.state_size, dtype=F64)
    return cell, x, h0


def _pararnn_run(cell, x, h0, device, dtype, **kw) -> list[torch.Tensor]:
    cell = copy.deepcopy(cell).to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    h0 = h0.to(device=device, dtype=dtype).requires_grad_(True)
    y, final = pararnn(cell, x, initial=h0, max_iters=3, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=gen, dtype=F64).to(device=device, dtype=y.dtype)
    df = torch.randn(final.shape, generator=gen, dtype=F64).to(device=device, dtype=final.dtype)
    params = [x, h0, *cell.parameters()]
    grads = torch.autograd.grad((y * dy).sum() + (final * df).sum(), params, allow_unused=True)
    return [t.detach().to("cpu", F64) for t in (y, final)] + [
        torch.zeros(p.shape, dtype=F64) if g is None else g.detach().to("cpu", F64) for p, g in zip(params, grads)
    ]


@pytest.mark.parametrize("seq", [1, 777, 4096])
@pytest.mark.parametrize("backend", ["fused", "triton"])
@pytest.mark.parametrize("cell_cls", [ParaGRU, ParaLSTM], ids=["gru", "lstm"])
def test_pararnn_cuda_matches_float64_solve(cell_cls, backend, seq):
    cell, x, h0 = _pararnn_case(cell_cls, seq)
    ref = _pararnn_run(cell, x, h0, torch.device("cpu"), F64, backend="torch")
    got = _pararnn_run(cell, x, h0, CUDA, torch.float32, backend=backend)
    errors = _errors(got, ref)
    worst = max(range(len(errors)), key=errors.__getitem__)
    assert errors[worst] < 1e-4, f"tensor {worst} of {len(errors)} has relative error {errors[worst]:.2e}"


# Mixers: the auto backend (Triton on CUDA) against the same weights on the CPU (the chunked PyTorch path),
# and step-by-step decoding with the cache on the GPU against the GPU's parallel forward.
def _lm(name: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel({"vocab_size": 64, "hidden_size": 64, "num_layers": 2, "pattern": [name], "mlp": "swiglu"})


@pytest.mark.parametrize("name", mixer_names())
def test_mixer_cuda_matches_cpu_and_decode_matches_parallel(name):
    model = _lm(name)
    ids = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(0))
    cpu_logits = model(ids)
    cpu_logits.float().logsumexp(-1).sum().backward()
    cpu_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()

    gpu = model.to(CUDA)
    gpu_logits = gpu(ids.to(CUDA))
    gpu_logits.float().logsumexp(-1).sum().backward()
    gpu_grads = torch.cat([p.grad.flatten() for p in gpu.parameters() if p.grad is not None])
    assert rel_err(gpu_logits.cpu(), cpu_logits) < 2e-3, f"{name}: logits {rel_err(gpu_logits.cpu(), cpu_logits):.2e}"
    assert rel_err(gpu_grads.cpu(), cpu_grads) < 5e-3, f"{name}: gradients {rel_err(gpu_grads.cpu(), cpu_grads):.2e}"

    gpu.eval()
    with torch.no_grad():
        full = gpu(ids.to(CUDA))
        cache = gpu.init_cache(2)
        pieces = [gpu(ids[:, :77].to(CUDA), cache=cache)]
        pieces += [gpu(ids[:, t : t + 1].to(CUDA), cache=cache) for t in range(77, 150)]
    decoded = torch.cat(pieces, 1)
    assert rel_err(decoded, full) < 2e-3, f"{name}: decode vs parallel {rel_err(decoded, full):.2e}"


def test_gated_delta_long_sequence_state_stays_exact():
    """8192 tokens through the ieee kernels: the state carried across 128 chunks stays within 1e-4."""
    x = delta_inputs(1, 8192, 2, 64, 64, g_scale=0.05)
    call = _gated_delta
    ref = run_case(call, x, torch.device("cpu"), F64, "torch")
    got = run_case(call, x, CUDA, torch.float32, "triton")
    errors = _errors(got, ref)
    assert max(errors) < 1e-4, errors


def test_l2norm_kernel_path():
    """``use_qk_l2norm`` on the GPU equals normalising before the call."""
    x = delta_inputs(2, 200, 2, 64, 64)
    x = {k: v.to(CUDA, torch.float32) for k, v in x.items()}
    a, _ = gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], use_qk_l2norm=True)
    b, _ = gated_delta_rule(F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1), x["v"], x["beta"], x["g"])
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.name)
def test_op_forward_and_backward_never_synchronise_with_the_host(case):
    # Value checks run only in checking mode; outside it an op call (dense, no cu_seqlens) must not wait for
    # the device: torch raises on any synchronising call in sync-debug "error" mode.
    inputs = _map(case.inputs(), lambda t: t.to(CUDA, torch.float32).requires_grad_(t.is_floating_point()))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = _flatten(case.call(inputs, "auto"))
        if case.triton_grads:
            sum(o.float().sum() for o in outputs if o.requires_grad).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", mixer_names())
def test_a_language_model_step_never_synchronises_with_the_host(name):
    model = _lm(name).to(CUDA)
    ids = torch.randint(0, 48, (2, 300), device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(ids).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

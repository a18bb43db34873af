"""checkpoint_attention: every backend against the masked-softmax reference, and the reference against SDPA.

Independent oracles: with ``segment_len = 1`` and the tokens as their own checkpoints the op is causal softmax
attention (SDPA's ``is_causal``); with the last token of each segment as its checkpoint (SCOUT's ``stride``) it is
SDPA over all tokens with the mask "itself, or a segment's last token strictly before". The weights themselves
are read by attending to one-hot values: exactly zero on every other past token and on the future, and each row
sums to one. Then every backend (PyTorch, Triton under the interpreter) against the reference at lengths that
are not multiples of ``L``, with grouped KV heads and packed documents, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqzoo.ops import checkpoint_attention
from seqzoo.ops.checkpoint_attention import (
    checkpoint_attention_block,
    checkpoint_attention_chunk,
    checkpoint_attention_reference,
    checkpoint_offsets,
)
from seqzoo.ops.core import OpInputError, checking
from tests.helpers import assert_rel_close

F64 = torch.float64
BACKENDS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton)]


def make_inputs(batch, seq, heads, kv_heads, key_dim, value_dim, segment_len, num_ckpt=None, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(dtype)  # noqa: E731
    num_ckpt = seq // segment_len if num_ckpt is None else num_ckpt
    q = rand(batch, seq, heads, key_dim)
    k, v = rand(batch, seq, kv_heads, key_dim), rand(batch, seq, kv_heads, value_dim)
    return q, k, v, rand(batch, num_ckpt, kv_heads, key_dim), rand(batch, num_ckpt, kv_heads, value_dim)


def outputs_and_grads(fn, inputs, seed=1, **kwargs):
    """``fn``'s output and the gradients of every input for a random cotangent."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    o, extra = fn(*leaves, **kwargs)
    assert extra is None
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(o.dtype)
    (o * do).sum().backward()
    return [o.detach()] + [t.grad for t in leaves]


NAMES = ("o", "dq", "dk", "dv", "dk_ckpt", "dv_ckpt")


def assert_all_close(got, ref, tol, what=""):
    for name, a, b in zip(NAMES, got, ref):
        if a is None or b is None:  # autograd may leave the gradient of a 0-element input unset
            assert all(t is None or t.numel() == 0 for t in (a, b)), f"{what} {name}"
        elif b.numel() and b.norm() == 0:  # e.g. dq without checkpoints: exact 0 here, rounding-level elsewhere
            assert a.abs().max() < 1e-12, f"{what} {name}"
        else:
            assert_rel_close(a, b, tol, f"{what} {name}")


def sdpa(q, k, v, mask=None):
    """SDPA in the op's layout ``[batch, seq, heads, dim]``, grouped KV heads expanded."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None)
    return o.transpose(1, 2)


def stride_mask(seq: int, segment_len: int) -> torch.Tensor:
    """Query ``i`` sees token ``j`` iff ``j == i`` or ``j`` ends a segment strictly before ``i``."""
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    return (j == i) | (((j + 1) % segment_len == 0) & (j < i))


# ------------------------------------------------------------------------------- the reference's own oracles


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_len_one_is_causal_attention(backend):
    q, k, v, _, _ = make_inputs(2, 37, 4, 2, 8, 12, 1)
    # The same k and v serve as self terms and as checkpoints: gradients from both paths add up, as in SDPA.
    got = outputs_and_grads(lambda q, k, v: checkpoint_attention(q, k, v, k, v, segment_len=1, backend=backend), (q, k, v))
    want = outputs_and_grads(lambda q, k, v: (sdpa(q, k, v), None), (q, k, v))
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert_rel_close(a, b, 1e-12, f"L=1 {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segment_len", [3, 8])
def test_stride_checkpoints_are_attention_with_a_sparse_causal_mask(backend, segment_len):
    seq = 45
    q, k, v, _, _ = make_inputs(1, seq, 2, 1, 8, 8, segment_len)
    ends = slice(segment_len - 1, None, segment_len)
    o, _ = checkpoint_attention(q, k, v, k[:, ends], v[:, ends], segment_len=segment_len, backend=backend)
    assert_rel_close(o, sdpa(q, k, v, stride_mask(seq, segment_len)), 1e-12, "stride vs masked SDPA")


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_are_exactly_zero_off_the_checkpoints_and_each_row_sums_to_one(backend):
    seq, segment_len = 23, 4
    q, k, _, _, _ = make_inputs(1, seq, 2, 2, 8, 8, segment_len, seed=3)
    q = q * 3  # sharp scores: the zeros must not come from a flat softmax
    # One-hot values: output row i is query i's weight on every token (a checkpoint is its segment's last token).
    v = torch.eye(seq, dtype=F64)[None, :, None, :].expand(1, seq, 2, seq).contiguous()
    ends = slice(segment_len - 1, None, segment_len)
    weights, _ = checkpoint_attention(q, k, v, k[:, ends], v[:, ends], segment_len=segment_len, backend=backend)
    allowed = stride_mask(seq, segment_len)[:, None, :].expand(seq, 2, seq)
    assert torch.equal(weights[0][~allowed], torch.zeros_like(weights[0][~allowed])), "a weight off [self, checkpoints] is not 0"
    assert (weights[0][allowed] > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, seq, 2, dtype=F64), rtol=0, atol=1e-14)


# -------------------------------------------------------------------------------- backends vs the reference


@pytest.mark.parametrize(
    "shape",
    [
        # batch, seq, heads, kv_heads, key_dim, value_dim, segment_len
        (2, 37, 4, 2, 8, 12, 5),
        (1, 1, 2, 2, 8, 8, 4),  # a single token, no checkpoint
        (1, 9, 2, 1, 8, 8, 10),  # shorter than a segment
        (2, 70, 2, 2, 20, 8, 64),  # one checkpoint, a head dim that is not a power of two
        (1, 130, 2, 1, 16, 16, 3),  # query blocks and checkpoint blocks both span several tiles
        (1, 100, 1, 1, 72, 40, 2),  # a head wider than 64: smaller Triton blocks (64 queries, 32 checkpoints)
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_backend_matches_reference_float64(shape, backend):
    *dims, segment_len = shape
    inputs = make_inputs(*dims, segment_len)
    ref = outputs_and_grads(checkpoint_attention_reference, inputs, segment_len=segment_len)
    got = outputs_and_grads(checkpoint_attention, inputs, segment_len=segment_len, backend=backend)
    assert_all_close(got, ref, 1e-12, backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_packed_documents_match_the_reference_and_each_document_alone(backend):
    lengths, segment_len = [9, 37, 1, 20, 5], 4
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    counts = checkpoint_offsets(offsets.tolist(), segment_len)
    inputs = make_inputs(1, sum(lengths), 4, 2, 8, 8, segment_len, num_ckpt=counts[-1])
    ref = outputs_and_grads(checkpoint_attention_reference, inputs, segment_len=segment_len, cu_seqlens=offsets)
    got = outputs_and_grads(checkpoint_attention, inputs, segment_len=segment_len, cu_seqlens=offsets, backend=backend)
    assert_all_close(got, ref, 1e-12, f"packed {backend}")
    q, k, v, kc, vc = inputs
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        c = slice(counts[i], counts[i + 1])
        alone, _ = checkpoint_attention(q[:, a:b], k[:, a:b], v[:, a:b], kc[:, c], vc[:, c], segment_len=segment_len, backend=backend)
        assert_rel_close(got[0][:, a:b], alone, 1e-12, f"document {i}")


def test_float32_and_bfloat16_stay_close_to_float64():
    inputs = make_inputs(1, 100, 4, 2, 16, 16, 6)
    ref, _ = checkpoint_attention_reference(*inputs, segment_len=6)
    o32, _ = checkpoint_attention(*(t.float() for t in inputs), segment_len=6, backend="torch")
    assert o32.dtype == torch.float32
    assert_rel_close(o32, ref, 1e-5, "fp32")
    o16, _ = checkpoint_attention(*(t.bfloat16() for t in inputs), segment_len=6, backend="torch")
    assert o16.dtype == torch.bfloat16
    assert_rel_close(o16, ref, 2e-2, "bf16")


def test_query_chunks_recompute_in_backward_and_match_one_chunk():
    inputs = make_inputs(2, 100, 4, 2, 8, 8, 7)
    one = outputs_and_grads(checkpoint_attention_chunk, inputs, segment_len=7)
    chunked = outputs_and_grads(checkpoint_attention_chunk, inputs, segment_len=7, chunk_size=16)
    assert_all_close(chunked, one, 1e-12, "chunk_size=16")


@pytest.mark.parametrize("start", [0, 6, 7, 30])
def test_block_from_a_later_position_equals_the_full_call(start):
    """The layers' cached path: queries from position ``start`` on, against all checkpoints so far."""
    seq, segment_len = 37, 7
    q, k, v, kc, vc = make_inputs(2, seq, 4, 2, 8, 8, segment_len)
    full, _ = checkpoint_attention_reference(q, k, v, kc, vc, segment_len=segment_len)
    part = checkpoint_attention_block(q[:, start:], k[:, start:], v[:, start:], kc, vc, segment_len=segment_len, start=start)
    assert_rel_close(part, full[:, start:], 1e-12, f"start={start}")


def test_compiles_without_a_graph_break_on_the_torch_path():
    torch._dynamo.reset()
    inputs = make_inputs(2, 70, 4, 2, 8, 8, 6)

    def fn(q, k, v, kc, vc):
        return checkpoint_attention(q, k, v, kc, vc, segment_len=6, backend="torch")

    eager = outputs_and_grads(fn, inputs)
    compiled = outputs_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs)
    assert_all_close(compiled, eager, 1e-12, "compiled")


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_never_reaches_an_earlier_query(backend, packed):
    """Outside checking mode: a NaN value of token 30 (self term) and an Inf in checkpoint 10 (dense: segment 10,
    seen from position 33 on; packed: the second document's segment 4, seen from its position 15 on) leave every
    other query exact; a NaN query stays in its own row."""
    segment_len, seq = 3, 50
    offsets = [0, 20, 50] if packed else None
    count = checkpoint_offsets(offsets, segment_len)[-1] if packed else seq // segment_len
    q, k, v, kc, vc = make_inputs(1, seq, 4, 2, 8, 8, segment_len, num_ckpt=count)
    cu = None if offsets is None else torch.tensor(offsets)
    ref, _ = checkpoint_attention(q, k, v, kc, vc, segment_len=segment_len, cu_seqlens=cu, backend=backend)
    v[0, 30, 1, 2] = float("nan")  # KV head 1: query heads 2 and 3
    kc[0, 10, 0, 5] = float("inf")  # KV head 0: query heads 0 and 1
    local_ckpt = (10 - 6) if packed else 10  # the second document's checkpoints start after the first one's 6
    q[0, 5, 3, 0] = float("nan")
    o, _ = checkpoint_attention(q, k, v, kc, vc, segment_len=segment_len, cu_seqlens=cu, backend=backend)
    nan = torch.zeros(1, seq, 4, dtype=torch.bool)
    nan[0, 30, 2:] = True
    sees = (torch.arange(seq) - (20 if packed else 0)) // segment_len > local_ckpt  # positions past the checkpoint's segment
    nan[0, sees, :2] = True
    nan[0, 5, 3] = True
    assert torch.equal(torch.isnan(o).any(-1), nan) and torch.isnan(o[nan]).all()
    torch.testing.assert_close(o[~nan], ref[~nan], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- input errors


def test_bad_inputs_are_one_line_errors():
    q, k, v, kc, vc = make_inputs(1, 10, 4, 2, 8, 8, 3)
    cases = [
        (dict(k_ckpt=kc[:, :2]), r"k_ckpt has shape \(1, 2, 2, 8\), expected \[1, 3, 2, 8\] \(seq // segment_len = 10 // 3 checkpoints\)"),
        (dict(k=k[:, :, :1].expand(1, 10, 3, 8)), r"k's 3 heads must divide q's 4 heads"),
        (dict(segment_len=0), r"segment_len must be an int >= 1, got 0"),
        (dict(backend="fused"), r"has no 'fused' backend"),
        (dict(cu_seqlens=torch.tensor([0, 5, 10])), r"k_ckpt has shape \(1, 3, 2, 8\), expected \[1, 2, 2, 8\]"),
        (dict(q=q.expand(2, -1, -1, -1)), r"k has shape \(1, 10, 2, 8\), expected \[2, 10, kv_heads, 8\]"),
    ]
    for change, message in cases:
        args = dict(q=q, k=k, v=v, k_ckpt=kc, v_ckpt=vc, segment_len=3) | change
        with pytest.raises(OpInputError, match=rf"^checkpoint_attention: {message}"):
            checkpoint_attention(**args)
        assert "\n" not in str(pytest.raises(OpInputError, checkpoint_attention, **args).value)
    with checking(), pytest.raises(OpInputError, match=r"^checkpoint_attention: v_ckpt contains NaN or Inf$"):
        checkpoint_attention(q, k, v, kc, vc.clone().fill_(float("nan")), segment_len=3)


# ------------------------------------------------------------------------------------ the Triton torch.library ops


@pytest.mark.triton
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_opcheck_triton_ops(packed):
    from seqzoo.ops.checkpoint_attention import triton as ops

    seq, segment_len = 40, 3
    offsets = torch.tensor([0, 7, 40]) if packed else None
    count = checkpoint_offsets(offsets.tolist(), segment_len)[-1] if packed else seq // segment_len
    q, k, v, kc, vc = (t.float() for t in make_inputs(1, seq, 2, 1, 16, 16, segment_len, num_ckpt=count))
    packing = ops._packing(offsets, seq, segment_len, q.device, ops._blocks(16, 16)) if packed else (None,) * 4
    args = [t.requires_grad_() for t in (q, k, v, kc, vc)]
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(ops._ckpt_fwd, (*args, *packing, segment_len, 0.25, "ieee"), test_utils=checks)
    with torch.no_grad():
        o, lse = ops._ckpt_fwd(q, k, v, kc, vc, *packing, segment_len, 0.25, "ieee")
    bwd = (q.detach(), k.detach(), v.detach(), kc.detach(), vc.detach(), o, lse, torch.randn_like(o), *packing, segment_len, 0.25, "ieee")
    torch.library.opcheck(ops._ckpt_bwd, bwd, test_utils=checks[:2])

"""Compile the gated-delta-rule Triton kernels for a GPU target without a GPU; print shared memory and time.

Shared memory per program decides whether a config can launch at all (a Hopper SM has 227 KB, an A100's
164 KB), and it grows with the software-pipelining depth (``num_stages``). Triton compiles for a named
target without a device, so these limits can be checked on a CPU-only machine:

    python benchmarks/triton_resources.py --key-dim 256 --value-dim 128 --stages 1 3

Compiles can take minutes each for the widest shapes. Pointer arguments are typed ``*fp32`` (``*i32`` for
the chunk index tables), scalars by name; the constexprs are those of the launches in
``seqzoo.ops.gated_delta_rule.triton`` (whose output and ``dv`` stages are the shared kernels of
``seqzoo.ops.core.triton_stages``).
"""

from __future__ import annotations

import argparse
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seqzoo.ops.core import triton_stages
from seqzoo.ops.gated_delta_rule import triton as gdr

HOPPER_SHARED_BYTES = 232448
INDEX_TABLES = ("chunk_indices", "cu_seqlens", "chunk_offsets")


def kernel_specs(key_dim: int, value_dim: int, bv: int) -> dict[str, tuple[triton.JITFunction, dict, tuple[str, ...], tuple[str, ...]]]:
    """``name -> (jit function, constexprs, int scalars, fp32 scalars)`` for the chunked pipeline (packed
    sequences, gated, IEEE dots: the widest variant of each kernel)."""
    common = dict(
        H=2, K=key_dim, V=value_dim, BT=gdr.BT, BK=gdr.BK, ACC=tl.float32, G_MODE=1, IS_VARLEN=True, PRECISION="ieee"
    )  # fmt: skip
    return {
        "_kkt_inverse_kernel": (gdr._kkt_inverse_kernel, dict(common, BC=gdr.BC), ("T",), ()),
        "_wy_fwd_kernel": (gdr._wy_fwd_kernel, dict(common, BV=bv), ("T",), ()),
        "_state_fwd_kernel": (gdr._state_fwd_kernel, dict(common, BV=bv, USE_H0=True, STORE_HT=True), ("T",), ()),
        "_chunk_fwd_o_kernel": (triton_stages._chunk_fwd_o_kernel.fn, dict(common, BV=bv), ("T",), ("scale",)),
        "_chunk_bwd_dv_kernel": (triton_stages._chunk_bwd_dv_kernel.fn, dict(common, BV=bv, USE_DH=False), ("T",), ("scale",)),
        "_state_bwd_kernel": (gdr._state_bwd_kernel, dict(common, BV=bv, USE_DHT=True, STORE_DH0=True), ("T",), ("scale",)),
        "_dqk_dw_kernel": (gdr._dqk_dw_kernel, dict(common, BV=bv), ("T", "TOTAL"), ("scale",)),
        "_wy_bwd_kernel": (gdr._wy_bwd_kernel, dict(common, BV=bv, BC=gdr.BC), ("T",), ()),
    }


def compile_for_target(
    fn: triton.JITFunction,
    constexprs: dict,
    ints: tuple[str, ...],
    floats: tuple[str, ...],
    target: GPUTarget,
    num_warps: int,
    num_stages: int,
):
    """Compile ``fn`` for ``target``; returns ``(seconds, shared-memory bytes)``."""
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ints:
            signature[name] = "i32"
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "*i32" if name in INDEX_TABLES else "*fp32"
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs), target=target, options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return time.perf_counter() - start, compiled.metadata.shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key-dim", type=int, default=128)
    parser.add_argument("--value-dim", type=int, default=128)
    parser.add_argument("--block-v", type=int, default=32, help="BV of the state and output kernels")
    parser.add_argument("--num-warps", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[3])
    parser.add_argument("--kernels", nargs="+", help="default: all of the chunked pipeline")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    args = parser.parse_args()
    specs = kernel_specs(args.key_dim, args.value_dim, args.block_v)
    unknown = sorted(set(args.kernels or []) - set(specs))
    if unknown:
        parser.error(f"unknown kernels {unknown}; known: {', '.join(specs)}")
    target = GPUTarget("cuda", args.arch, 32)
    print("| kernel | K | V | BV | warps | stages | compile s | shared bytes | fits a Hopper SM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for stages in args.stages:
        for name in args.kernels or specs:
            fn, constexprs, ints, floats = specs[name]
            seconds, shared = compile_for_target(fn, constexprs, ints, floats, target, args.num_warps, stages)
            fits = "yes" if shared <= HOPPER_SHARED_BYTES else "**no**"
            print(
                f"| {name} | {args.key_dim} | {args.value_dim} | {args.block_v} | {args.num_warps} | {stages} | {seconds:.1f} | {shared} | {fits} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

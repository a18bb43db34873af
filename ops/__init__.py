"""Pure tensor functions shared by seqzoo's layers: reference loops, chunked PyTorch and Triton kernels.

Conventions (see each function's docstring): ``[batch, seq, heads, dim]`` inputs, key-major fp32
states ``[batch, heads, key_dim, value_dim]``, natural-log decay gates, ``backend="auto"`` picks Triton
on CUDA and chunked PyTorch elsewhere.
"""

from seqzoo.ops.utils import OpInputError, l2norm

__all__ = ["OpInputError", "l2norm"]

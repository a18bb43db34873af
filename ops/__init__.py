"""Pure tensor functions shared by seqzoo's layers: reference loops, chunked PyTorch and Triton kernels.

Conventions (see each function's docstring): ``[batch, seq, heads, dim]`` inputs, key-major fp32
states ``[batch, heads, key_dim, value_dim]``, natural-log decay gates, one ``backend=`` vocabulary
(:mod:`seqzoo.ops.core.dispatch`), value checks in :func:`checking` mode only (:mod:`seqzoo.ops.core.checks`).
"""

from seqzoo.ops.affine_scan import affine_scan
from seqzoo.ops.checkpoint_attention import checkpoint_attention
from seqzoo.ops.core import OpInputError, checking, checks_enabled
from seqzoo.ops.delta_rule import delta_rule
from seqzoo.ops.gated_delta_rule import gated_delta_rule
from seqzoo.ops.gla import gla
from seqzoo.ops.neural_memory import LinearMemoryState, MLPMemoryState, neural_memory
from seqzoo.ops.pararnn import ParaGRU, ParaLSTM, RecurrentCell, pararnn
from seqzoo.ops.simple_gla import simple_gla
from seqzoo.ops.utils import l2norm

__all__ = [
    "LinearMemoryState",
    "MLPMemoryState",
    "OpInputError",
    "ParaGRU",
    "ParaLSTM",
    "RecurrentCell",
    "affine_scan",
    "checking",
    "checkpoint_attention",
    "checks_enabled",
    "delta_rule",
    "gated_delta_rule",
    "gla",
    "l2norm",
    "neural_memory",
    "pararnn",
    "simple_gla",
]

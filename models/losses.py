"""Cross-entropy through the output head without ``[tokens, vocab]`` fp32 logits: the rows go through the head in
chunks, each chunk's logits live only while its loss and gradients are computed.

With a vocabulary of 32K–128K and 8K tokens per batch, the plain ``F.cross_entropy(head(h).float(), y)`` holds
``8192 × 131072 × 4`` bytes = 4 GiB of logits, plus as much again for their gradient. :func:`linear_cross_entropy`
holds one chunk (``chunk_rows × vocab``) at a time: the forward pass computes each chunk's loss and, when a gradient
is needed, its gradients with respect to the hidden states and the head weight right away (the softmax minus the
one-hot target), so the backward pass only scales them. The loss equals the plain one up to fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chunk_rows_for", "linear_cross_entropy", "linear_nll"]

#: Elements of one chunk's fp32 logits (64 MiB): the memory the chunked loss holds at a time.
CHUNK_ELEMENTS = 2**24


def chunk_rows_for(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary: ``CHUNK_ELEMENTS / vocab`` (at least 64)."""
    return max(64, CHUNK_ELEMENTS // max(1, vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):  # type: ignore[override]
        n = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad and ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad and ctx.needs_input_grad[1] else None
        )
        for start in range(0, n, chunk_rows):
            h, y = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = F.linear(h, weight).float()  # [rows, vocab]: the only logits alive
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None])[:, 0]).sum()
            correct += (logits.argmax(-1) == y).sum()
            if need_grad:
                # d(mean CE)/d logits = (softmax − onehot) / n, formed in place of the logits.
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                grad = grad.div_(n).to(h.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_rows] = grad @ weight.to(h.dtype)
                if grad_weight is not None:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0), grad_weight if grad_weight is not None else torch.empty(0)
        )
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return total / max(n, 1), correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_correct: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` (computed in fp32) and the argmax hits, chunk by chunk.

    Args:
        hidden: ``[tokens, hidden]`` (only labelled positions; no ignore index).
        weight: ``[vocab, hidden]`` head weight.
        targets: ``[tokens]`` integer ids.
        chunk_rows: rows per chunk. Default: :func:`chunk_rows_for` the vocabulary.

    Returns:
        ``(loss, correct)``: the scalar mean loss (differentiable in ``hidden`` and ``weight``; equal to
        ``F.cross_entropy(F.linear(hidden, weight).float(), targets)``), and the number of tokens whose argmax is
        the target. Memory: one chunk of ``chunk_rows × vocab`` fp32 logits and an fp32 copy of ``weight``'s
        gradient, never ``[tokens, vocab]``.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: expected hidden [tokens, dim] and targets [tokens], got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    rows = chunk_rows or chunk_rows_for(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows)


@torch.no_grad()
def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood ``[tokens]`` (fp32) of ``hidden @ weight.T``, chunk by chunk (evaluation)."""
    rows = chunk_rows or chunk_rows_for(weight.shape[0])
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start : start + rows], weight).float()
        y = targets[start : start + rows]
        out[start : start + rows] = torch.logsumexp(logits, -1) - logits.gather(1, y[:, None])[:, 0]
    return out

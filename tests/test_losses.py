"""The chunked cross-entropy through the head equals the plain one, its gradients included, without [tokens, vocab] logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqzoo.models import LanguageModel
from seqzoo.models.losses import CHUNK_ELEMENTS, linear_cross_entropy, linear_nll


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_plain_loss_and_gradients(chunk_rows, dtype):
    torch.manual_seed(0)
    hidden = torch.randn(150, 24, dtype=dtype, requires_grad=True)
    weight = torch.randn(301, 24, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 301, (150,))
    loss, correct = linear_cross_entropy(hidden, weight, targets, chunk_rows)
    (loss * 3.0).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = F.linear(hidden, weight).float() if dtype == torch.float32 else F.linear(hidden, weight)
    plain = F.cross_entropy(logits, targets)
    (plain * 3.0).backward()
    tol = 1e-6  # the chunked path sums the loss in fp32 for both dtypes
    torch.testing.assert_close(loss.double(), plain.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-5, atol=1e-7)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    torch.testing.assert_close(linear_nll(hidden, weight, targets, chunk_rows).double(),
                               F.cross_entropy(logits, targets, reduction="none").double(), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_language_model_loss_chunks_large_vocabularies(monkeypatch):
    torch.manual_seed(0)
    model = LanguageModel({"vocab_size": 1000, "hidden_size": 16, "num_layers": 1, "tie_embeddings": True})
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    plain_loss, plain_correct, count = model.loss(ids, labels)
    plain_loss.backward()
    plain_grad = model.embed.weight.grad.clone()
    model.zero_grad()
    calls = []
    import seqzoo.models.language_model as lm

    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 100)  # force the chunked path at this tiny size
    monkeypatch.setattr(lm, "linear_cross_entropy", lambda *a: calls.append(1) or linear_cross_entropy(*a, chunk_rows=5))
    loss, correct, count2 = model.loss(ids, labels)
    loss.backward()
    assert calls and count2 == count == 22 and correct == plain_correct
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    # The tied weight gets both the embedding's and the head's gradient, as with the plain loss.
    torch.testing.assert_close(model.embed.weight.grad, plain_grad, rtol=1e-5, atol=1e-6)
    assert CHUNK_ELEMENTS >= 2**20

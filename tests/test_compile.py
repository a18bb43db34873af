"""torch.compile: every registered mixer, in a LanguageModel, compiles with fullgraph=True (no graph break), and
the compiled forward and gradients equal eager; the ``compile: true`` training option trains the same model.

The per-mixer checks use the ``aot_eager`` backend: Dynamo and AOTAutograd trace the whole forward and backward
(so a graph break, a data-dependent branch or an untraceable kernel call fails), but the traced graphs run
on the eager kernels, so the comparison is exact and each mixer takes seconds, not the minute Inductor's C++
compilation takes on two cores. Inductor itself is exercised by the training test and by the benchmark
(``seqzoo-eval bench models --compile``).
"""

from __future__ import annotations

import pytest
import torch

import seqzoo.training as training
from seqzoo.models import LanguageModel, mixer_names

# Short enough to be quick, long enough for a partial chunk in every chunked op (chunk 64 / titans chunk 16).
SEQ = 70


def _lm(name: str) -> LanguageModel:
    torch.manual_seed(0)
    config = {"vocab_size": 48, "hidden_size": 16, "num_layers": 1, "pattern": [name], "mlp": "swiglu"}
    return LanguageModel(config).double()


def _forward_backward(model: torch.nn.Module, fn, ids: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = fn(ids)
    (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", mixer_names())
def test_every_mixer_compiles_without_a_graph_break_and_equals_eager(name):
    torch._dynamo.reset()
    model = _lm(name)
    ids = torch.randint(0, 48, (2, SEQ))
    eager = _forward_backward(model, model, ids)
    compiled = _forward_backward(model, torch.compile(model, fullgraph=True, backend="aot_eager"), ids)
    assert len(compiled) == len(eager) == 1 + sum(1 for p in model.parameters() if p.requires_grad)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_bad_token_id_is_one_line_in_eager_and_compiles_away():
    model = _lm("attention")
    with pytest.raises(ValueError, match=r"^LanguageModel: token ids must lie in \[0, 48\), got \[0, 50\]$"):
        model(torch.tensor([[0, 50]]))
    explained = torch._dynamo.explain(model)(torch.randint(0, 48, (1, 8)))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compile_option_trains_like_eager(tmp_path):
    overrides = [
        "model.hidden_size=16",
        "data.vocab_size=32",
        "data.train_segments=[{seq_len:16,num_kv_pairs:2,num_examples:32}]",
        "data.test_segments=[{seq_len:16,num_kv_pairs:2,num_examples:16}]",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=3",
        "test_after_fit=false",
    ]
    eager = training.run(training.compose(overrides), tmp_path / "eager")
    compiled = training.run(training.compose([*overrides, "compile=true"]), tmp_path / "compiled")
    assert [step for step, _ in compiled["losses"]] == [step for step, _ in eager["losses"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(compiled["losses"], eager["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    # The checkpoint of the compiled run loads into a plain model (no compile wrapper in the parameter names).
    model, _ = training.load_language_model(compiled["checkpoint"])
    assert all(not name.startswith("_orig_mod") for name in model.state_dict())

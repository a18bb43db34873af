"""The MQAR generator follows Zoology's definition; the data module keeps segments apart."""

import numpy as np
import pytest
import torch

from seqzoo.data import MQARDataModule, generate_mqar

V = 512


@pytest.mark.parametrize("seq_len, num_kv", [(64, 4), (128, 16), (64, 16)])
def test_mqar_invariants(seq_len, num_kv):
    inputs, labels = generate_mqar(V, 200, seq_len, num_kv, seed=3, random_non_queries=False)
    assert inputs.shape == labels.shape == (200, seq_len)
    ctx = 2 * num_kv
    keys, values = inputs[:, 0:ctx:2], inputs[:, 1:ctx:2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    for row in range(200):
        assert len(set(keys[row].tolist())) == num_kv, "keys must be distinct within an example"
        mapping = dict(zip(keys[row].tolist(), values[row].tolist()))
        query_pos = (labels[row] != -100).nonzero().flatten()
        assert len(query_pos) == num_kv, "exactly one labelled query per key"
        for pos in query_pos.tolist():
            assert (pos - ctx) % 2 == 0, "queries sit at even offsets of the query region"
            assert labels[row, pos].item() == mapping[inputs[row, pos].item()]
        assert sorted(inputs[row, query_pos].tolist()) == sorted(mapping)
        non_query = torch.ones(seq_len, dtype=torch.bool)
        non_query[:ctx] = False
        non_query[query_pos] = False
        assert (inputs[row, non_query] == 0).all(), "filler is token 0 without random_non_queries"


def test_mqar_is_deterministic_by_seed_and_random_fill_keeps_queries():
    a = generate_mqar(V, 50, 64, 8, seed=1)
    b = generate_mqar(V, 50, 64, 8, seed=1)
    c = generate_mqar(V, 50, 64, 8, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    plain = generate_mqar(V, 50, 64, 8, seed=1, random_non_queries=False)
    assert torch.equal(a[1], plain[1])
    assert torch.equal(a[0][plain[0] != 0], plain[0][plain[0] != 0])
    assert (a[0][plain[0] == 0] != 0).float().mean() > 0.9


def test_mqar_gaps_follow_a_power_law():
    _, labels = generate_mqar(8192, 4000, 256, 4, seed=0)
    gaps = ((labels != -100).nonzero()[:, 1] - 8) // 2
    # p(i) ∝ i^(−0.99): the first slot is taken far more often than a slot in the middle.
    counts = np.bincount(gaps.numpy(), minlength=124)
    assert counts[0] > 4 * counts[60:70].mean()


def test_mqar_rejects_impossible_settings():
    with pytest.raises(ValueError, match="must be even"):
        generate_mqar(V, 1, 63, 4, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        generate_mqar(V, 1, 64, 17, seed=0)
    with pytest.raises(ValueError, match="must exceed seq_len"):
        generate_mqar(64, 1, 64, 4, seed=0)


def test_datamodule_batches_never_mix_segments_and_train_differs_from_test():
    dm = MQARDataModule(
        V,
        train_segments=[{"seq_len": 32, "num_kv_pairs": 2, "num_examples": 40}, {"seq_len": 64, "num_kv_pairs": 4, "num_examples": 40}],
        test_segments=[{"seq_len": 32, "num_kv_pairs": 2, "num_examples": 40}],
        batch_size=8,
        eval_batch_size=16,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    shapes = {batch["input_ids"].shape[1] for batch in loader}
    assert shapes == {32, 64}
    for batch in loader:
        assert batch["input_ids"].shape[0] == 8
        assert batch["input_ids"].shape[1] == dm.train_segments[batch["segment"]].seq_len
    train_rows = {tuple(r) for r in dm.train_set.segments[0][0].tolist()}
    test_rows = {tuple(r) for r in dm.test_set.segments[0][0].tolist()}
    assert not train_rows & test_rows
    assert dm.segment_names == ["seq32_kv2"]

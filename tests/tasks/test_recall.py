"""The segmented recall generator follows its documented recipe."""

from __future__ import annotations

import pytest
import torch

from memgpt.tasks import IGNORE_INDEX, RecallTask


def sample(task: RecallTask, b: int = 64, seed: int = 0):
    return task.sample(b, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("task", [RecallTask(), RecallTask(num_pairs=3, segment_len=7, distance=4, num_keys=5)])
def test_layout(task):
    batch = sample(task)
    ids, tgt = batch.input_ids, batch.targets
    F, K, P, T = task.num_filler, task.num_keys, task.num_pairs, task.segment_len
    assert ids.shape == tgt.shape == (64, task.seq_len) and ids.dtype == tgt.dtype == torch.long
    assert batch.segment_len == T and batch.query_segment == task.distance
    keys, values = ids[:, 0 : 2 * P : 2], ids[:, 1 : 2 * P : 2]
    assert ((keys >= F) & (keys < F + K)).all() and ((values >= F + K) & (values < task.vocab_size)).all()
    assert all(len(set(row.tolist())) == P for row in keys)  # distinct keys per row
    q0 = task.distance * T
    queries = ids[:, q0 : q0 + P]
    assert torch.equal(queries.sort(dim=1).values, keys.sort(dim=1).values)  # the same keys, reordered
    # each query's target is its key's value
    for row in range(64):
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert [pairs[k] for k in queries[row].tolist()] == tgt[row, q0 : q0 + P].tolist()
    # everything else is filler and carries no target
    filler = torch.ones_like(ids, dtype=torch.bool)
    filler[:, : 2 * P] = False
    filler[:, q0 : q0 + P] = False
    assert (ids[filler] < F).all()
    assert (tgt[filler] == IGNORE_INDEX).all() and (tgt[:, : 2 * P] == IGNORE_INDEX).all()
    assert int(batch.answer_mask.sum()) == 64 * P


def test_no_answer_leaks_into_the_query_segment():
    """The baseline sees only the query segment: it holds no value token, so chance is its ceiling."""
    task = RecallTask(distance=3)
    batch = sample(task, b=256)
    seg = batch.input_ids[:, task.distance * task.segment_len :]
    assert (seg < task.num_filler + task.num_keys).all()
    assert task.chance == 1 / task.num_values


def test_deterministic_by_seed():
    task = RecallTask()
    a, b, c = sample(task, seed=3), sample(task, seed=3), sample(task, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, c.input_ids)


def streamed(task: RecallTask, b: int, generator: torch.Generator):
    segs = list(task.segments(b, generator))
    assert all(ids.shape == tgt.shape == (b, task.segment_len) for ids, tgt in segs)
    return torch.cat([s[0] for s in segs], dim=1), torch.cat([s[1] for s in segs], dim=1)


@pytest.mark.parametrize(
    "task", [RecallTask(), RecallTask(num_pairs=3, segment_len=7, distance=4, num_keys=5), RecallTask(distance=1)]
)
@pytest.mark.parametrize("b", [1, 6])
def test_segments_stream_the_sample(task, b):
    g_whole, g_stream = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    batch = task.sample(b, g_whole)
    ids, tgt = streamed(task, b, g_stream)
    torch.testing.assert_close(ids, batch.input_ids, rtol=0, atol=0)
    torch.testing.assert_close(tgt, batch.targets, rtol=0, atol=0)
    assert torch.equal(g_whole.get_state(), g_stream.get_state())  # the same draws, in the same order


def test_far_distance_1024():
    """d = 1,024 segments (16,400 tokens at T = 16): the recipe holds, and streaming equals sampling."""
    task = RecallTask(distance=1024)
    batch = task.sample(4, torch.Generator().manual_seed(2))
    assert batch.input_ids.shape == (4, 1025 * 16) and batch.query_segment == 1024
    q0, P = 1024 * 16, task.num_pairs
    keys, values = batch.input_ids[:, 0 : 2 * P : 2], batch.input_ids[:, 1 : 2 * P : 2]
    assert torch.equal(batch.input_ids[:, q0 : q0 + P].sort(dim=1).values, keys.sort(dim=1).values)
    for row in range(4):
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert [pairs[k] for k in batch.input_ids[row, q0 : q0 + P].tolist()] == batch.targets[row, q0:].tolist()[:P]
    assert int(batch.answer_mask.sum()) == 4 * P and (batch.input_ids[:, 2 * P : q0] < task.num_filler).all()
    ids, tgt = streamed(task, 4, torch.Generator().manual_seed(2))
    assert torch.equal(ids, batch.input_ids) and torch.equal(tgt, batch.targets)


@pytest.mark.parametrize("method", ["sample", "segments"])
def test_bad_batch_size(method):
    with pytest.raises(ValueError, match=rf"RecallTask.{method}.batch_size must be >= 1, got 0"):
        getattr(RecallTask(), method)(0, torch.Generator())  # segments checks at the call, not at next()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_pairs=0), ValueError, r"num_pairs must be >= 1, got 0"),
        (dict(num_pairs=9, segment_len=16, num_keys=16), ValueError, r"need 2 \* num_pairs = 18 positions"),
        (dict(num_pairs=5, num_keys=4), ValueError, r"num_pairs \(5\) must be <= num_keys \(4\)"),
        (dict(distance=1.5), TypeError, r"distance must be an int, got float"),
    ],
)
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RecallTask(**kwargs)

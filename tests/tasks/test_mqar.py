"""The MQAR generator follows its documented recipe, and streams the sample it materialises."""

from __future__ import annotations

import math

import pytest
import torch

from memgpt.tasks import IGNORE_INDEX, MQARTask

TASKS = [
    MQARTask(),
    MQARTask(num_pairs=10, num_keys=12, segment_len=7, num_query_segments=3, distance=2, power_a=0.01),
    MQARTask(num_pairs=64, num_keys=64, num_values=8, segment_len=16, num_query_segments=4),  # 64 queries, 64 slots
    MQARTask(num_pairs=1, segment_len=2, num_query_segments=1),
]


def sample(task: MQARTask, b: int = 64, seed: int = 0):
    return task.sample(b, torch.Generator().manual_seed(seed))


def test_geometry():
    task = MQARTask(num_pairs=32, segment_len=16, num_query_segments=4, distance=3)
    assert (task.pairs_per_segment, task.pair_segments, task.query_segment, task.num_segments) == (8, 4, 7, 11)
    assert task.seq_len == 11 * 16 and task.vocab_size == 16 + 64 + 64 and task.chance == 1 / 64
    odd = MQARTask(num_pairs=10, num_keys=12, segment_len=7, num_query_segments=3)
    assert (odd.pairs_per_segment, odd.pair_segments) == (3, 4)  # ceil(10 / 3), not ceil(20 / 7) = 3
    assert odd.key_columns().tolist() == [0, 2, 4, 7, 9, 11, 14, 16, 18, 21]


@pytest.mark.parametrize("task", TASKS)
def test_layout(task):
    b = 64
    batch = sample(task, b)
    ids, tgt = batch.input_ids, batch.targets
    F, K, P, T = task.num_filler, task.num_keys, task.num_pairs, task.segment_len
    assert ids.shape == tgt.shape == (b, task.seq_len) and ids.dtype == tgt.dtype == torch.long
    assert batch.segment_len == T and batch.query_segment == task.query_segment
    cols = task.key_columns()
    keys, values = ids[:, cols], ids[:, cols + 1]
    assert ((keys >= F) & (keys < F + K)).all() and ((values >= F + K) & (values < task.vocab_size)).all()
    assert all(len(set(row.tolist())) == P for row in keys)  # distinct keys per row
    assert (cols // T == (cols + 1) // T).all()  # a key and its value share a segment
    q0 = task.query_segment * T
    answer = batch.answer_mask
    assert (answer.sum(dim=1) == P).all() and not answer[:, :q0].any()  # targets only in the query region
    for row in range(b):
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        where = answer[row].nonzero().flatten()
        asked = ids[row, where].tolist()
        assert sorted(asked) == sorted(pairs)  # every key asked exactly once
        assert tgt[row, where].tolist() == [pairs[k] for k in asked]  # each target is its key's value
    # everything else is filler and carries no target
    filler = ~answer
    filler[:, cols] = False
    filler[:, cols + 1] = False
    assert (ids[filler] < F).all() and (tgt[filler] == IGNORE_INDEX).all()


def test_no_value_reaches_the_query_region():
    """The query region holds keys and filler only: without memory a model is at chance."""
    task = TASKS[1]
    batch = sample(task, b=256)
    region = batch.input_ids[:, task.query_segment * task.segment_len :]
    assert (region < task.num_filler + task.num_keys).all()
    between = batch.input_ids[:, task.pair_segments * task.segment_len : task.query_segment * task.segment_len]
    assert between.numel() > 0 and (between < task.num_filler).all()  # the distance segments: filler only


def query_offsets(task: MQARTask, b: int, seed: int = 0) -> torch.Tensor:
    """(b P) offsets of the queries in the query region, ascending."""
    batch = sample(task, b, seed)
    answer = batch.answer_mask[:, task.query_segment * task.segment_len :]
    return answer.nonzero()[:, 1].view(b, task.num_pairs)


def test_queries_spread_over_the_region_and_power_a_front_loads_them():
    uniform = MQARTask(num_pairs=8, segment_len=16, num_query_segments=8)
    front = MQARTask(num_pairs=8, segment_len=16, num_query_segments=8, power_a=0.01)
    u, f = query_offsets(uniform, 512), query_offsets(front, 512)
    n = uniform.num_query_segments * uniform.segment_len
    assert set((u // 16).flatten().tolist()) == set(range(8))  # every query segment gets queries
    assert abs(u.float().mean().item() - (n - 1) / 2) < 3  # uniform: mean near the middle (63.5)
    assert f.float().mean().item() < 0.6 * u.float().mean().item()  # power law: pulled to the start


def test_which_key_is_asked_where_does_not_follow_the_pair_order():
    """The earliest query asks a uniformly random pair, even when the positions are front-loaded."""
    task = MQARTask(num_pairs=8, segment_len=16, num_query_segments=4, power_a=0.01)
    batch = sample(task, b=800)
    first_query = batch.answer_mask[:, task.query_segment * 16 :].int().argmax(dim=1) + task.query_segment * 16
    asked = batch.input_ids.gather(1, first_query[:, None])
    pair = (batch.input_ids[:, task.key_columns()] == asked).int().argmax(dim=1)
    counts = torch.bincount(pair, minlength=8)
    assert counts.min() > 60 and counts.max() < 140  # about 100 each


def test_deterministic_by_seed():
    task = TASKS[1]
    a, b, c = sample(task, seed=3), sample(task, seed=3), sample(task, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("b", [1, 5])
def test_segments_stream_the_sample(task, b):
    g_whole, g_stream = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    batch = task.sample(b, g_whole)
    segs = list(task.segments(b, g_stream))
    assert len(segs) == task.num_segments
    assert all(ids.shape == tgt.shape == (b, task.segment_len) for ids, tgt in segs)
    assert all(ids.is_contiguous() and tgt.is_contiguous() for ids, tgt in segs)
    torch.testing.assert_close(torch.cat([s[0] for s in segs], dim=1), batch.input_ids, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([s[1] for s in segs], dim=1), batch.targets, rtol=0, atol=0)
    assert torch.equal(g_whole.get_state(), g_stream.get_state())  # the same draws, in the same order


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_pairs=0), ValueError, r"MQARTask.num_pairs must be >= 1, got 0"),
        (dict(num_pairs=65, num_keys=64), ValueError, r"num_pairs \(65\) must be <= num_keys \(64\)"),
        (
            dict(num_pairs=40, num_keys=64, segment_len=8, num_query_segments=4),
            ValueError,
            r"40 queries need num_pairs positions, more than .* = 4 \* 8 = 32",
        ),
        (dict(segment_len=1), ValueError, r"MQARTask.segment_len must be >= 2, got 1"),
        (dict(distance=-1), ValueError, r"MQARTask.distance must be >= 0, got -1"),
        (dict(num_query_segments=0), ValueError, r"num_query_segments must be >= 1, got 0"),
        (dict(num_keys=3.0), TypeError, r"num_keys must be an int, got float"),
        (dict(power_a=0.0), ValueError, r"power_a must be a finite float > 0, got 0.0"),
        (dict(power_a=math.nan), ValueError, r"power_a must be a finite float > 0, got nan"),
        (dict(power_a="0.01"), TypeError, r"power_a must be a float, got str"),
        (dict(power_a=True), TypeError, r"power_a must be a float, got bool"),
    ],
)
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MQARTask(**kwargs)


@pytest.mark.parametrize("method", ["sample", "segments"])
def test_bad_batch_size(method):
    with pytest.raises(ValueError, match=rf"MQARTask.{method}.batch_size must be >= 1, got 0"):
        getattr(MQARTask(), method)(0, torch.Generator())  # segments checks at the call, not at next()

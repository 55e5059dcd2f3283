"""The passkey generator follows its documented recipe."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from memgpt.tasks import IGNORE_INDEX, PasskeyTask, haystack_distance


def test_layout():
    task = PasskeyTask(passkey_len=5, segment_len=9, distance=3)
    batch = task.sample(128, torch.Generator().manual_seed(0))
    ids, tgt = batch.input_ids, batch.targets
    F, L, T = task.num_filler, task.passkey_len, task.segment_len
    assert ids.shape == (128, 4 * T) and batch.query_segment == 3
    starts = (ids[:, :T] == task.pass_id).int().argmax(dim=1)
    assert ((ids[:, :T] == task.pass_id).sum(dim=1) == 1).all() and (starts <= T - L - 1).all()
    assert len(set(starts.tolist())) > 1  # the offset varies
    digits = torch.stack([ids[i, s + 1 : s + 1 + L] for i, s in enumerate(starts.tolist())])
    assert ((digits >= F) & (digits < F + 10)).all()
    q0 = 3 * T
    assert (ids[:, q0] == task.ask_id).all()
    assert torch.equal(ids[:, q0 + 1 : q0 + L], digits[:, : L - 1])
    assert torch.equal(tgt[:, q0 : q0 + L], digits)
    assert int(batch.answer_mask.sum()) == 128 * L and (tgt[:, :q0] == IGNORE_INDEX).all()
    # outside the passkey and the query, only filler
    other = torch.ones_like(ids, dtype=torch.bool)
    for i, s in enumerate(starts.tolist()):
        other[i, s : s + L + 1] = False
    other[:, q0 : q0 + L] = False
    assert (ids[other] < F).all()


def test_first_digit_is_not_in_the_query_segment():
    task = PasskeyTask(distance=2)
    batch = task.sample(256, torch.Generator().manual_seed(1))
    q0 = task.distance * task.segment_len
    # the first target digit never appears as an input in the query segment before it
    assert (batch.input_ids[:, q0] == task.ask_id).all()


def test_deterministic_by_seed():
    task = PasskeyTask()
    a = task.sample(8, torch.Generator().manual_seed(5))
    b = task.sample(8, torch.Generator().manual_seed(5))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)


def test_bad_config():
    with pytest.raises(ValueError, match=r"PASS and 16 digits need 17 positions, more than segment_len = 16"):
        PasskeyTask(passkey_len=16, segment_len=16)


def test_bad_batch_size():
    for method in ("sample", "segments"):
        with pytest.raises(ValueError, match=rf"PasskeyTask.{method}.batch_size must be >= 1, got 0"):
            getattr(PasskeyTask(), method)(0, torch.Generator())  # segments checks at the call


@pytest.mark.parametrize(
    "task", [PasskeyTask(), PasskeyTask(distance=1), PasskeyTask(passkey_len=5, segment_len=9, distance=7)]
)
@pytest.mark.parametrize("b", [1, 6])
def test_segments_stream_the_sample(task, b):
    g_whole, g_stream = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    batch = task.sample(b, g_whole)
    segs = list(task.segments(b, g_stream))
    assert len(segs) == task.distance + 1
    assert all(ids.shape == tgt.shape == (b, task.segment_len) for ids, tgt in segs)
    torch.testing.assert_close(torch.cat([s[0] for s in segs], dim=1), batch.input_ids, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([s[1] for s in segs], dim=1), batch.targets, rtol=0, atol=0)
    assert torch.equal(g_whole.get_state(), g_stream.get_state())  # the same draws, in the same order


@pytest.mark.parametrize(
    "num_tokens, segment_len, distance",
    [(1024, 16, 63), (1000, 16, 62), (17, 16, 1), (32, 16, 1), (33, 16, 2), (2**20, 16, 65535), (10, 3, 3)],
)
def test_haystack_distance(num_tokens, segment_len, distance):
    assert haystack_distance(num_tokens, segment_len) == distance
    task = PasskeyTask.for_length(num_tokens, segment_len=segment_len, passkey_len=2)
    assert task.distance == distance and task.segment_len == segment_len and task.passkey_len == 2
    assert num_tokens <= task.seq_len < num_tokens + segment_len  # rounded up to whole segments


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((16, 16), ValueError, r"at least 2 segments \(num_tokens > segment_len = 16\), got num_tokens = 16"),
        ((0, 16), ValueError, r"haystack_distance.num_tokens must be >= 1, got 0"),
        ((1024.0, 16), TypeError, r"haystack_distance.num_tokens must be an int, got float"),
        ((1024, 0), ValueError, r"haystack_distance.segment_len must be >= 1, got 0"),
    ],
)
def test_bad_haystack(args, exc, match):
    with pytest.raises(exc, match=match):
        haystack_distance(*args)


# ------------------------------------------------------------------ flat memory when streaming
def live_tensors() -> list[torch.Tensor]:
    """Every tensor Python can reach, after a collection."""
    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]


def bytes_of_new_tensors(baseline: dict[int, weakref.ref]) -> int:
    """Bytes of the live tensors that were not alive when ``baseline`` was taken.

    Counts objects, not the process's RSS: exact and repeatable on a shared, noisy machine
    (RSS moves with the allocator and other threads; tracemalloc does not see torch's allocations).
    Only new tensors count, so a tensor of an earlier test freed meanwhile cannot pull the figure down;
    the weak reference tells a new tensor from an old one that happens to share its ``id``.
    """
    new = (t for t in live_tensors() if (ref := baseline.get(id(t))) is None or ref() is not t)
    return sum(t.nelement() * t.element_size() for t in new)


def materialised(task: PasskeyTask, b: int, generator: torch.Generator):
    """The control: segments sliced out of a whole sample, as a runner without streaming would."""
    batch = task.sample(b, generator)
    for s in range(0, task.seq_len, task.segment_len):
        yield batch.input_ids[:, s : s + task.segment_len], batch.targets[:, s : s + task.segment_len]


def held_while_streaming(task: PasskeyTask, stream, b: int = 4) -> int:
    """Bytes of the tensors alive at the next-to-last segment that were not alive before streaming began."""
    baseline = {id(t): weakref.ref(t) for t in live_tensors()}
    it = stream(task, b, torch.Generator().manual_seed(0))
    for _ in range(task.distance):  # up to the next-to-last segment, keeping none
        next(it)
    held = bytes_of_new_tensors(baseline)
    del it
    return held


def test_streaming_memory_does_not_grow_with_the_distance():
    """d = 4,096 segments (65,552 tokens) holds exactly what d = 64 holds: one segment and the secrets;
    the materialising control, measured the same way, grows with d (so the measure can fail)."""
    short, far = PasskeyTask(distance=64), PasskeyTask(distance=4096)
    stream = lambda task, b, g: task.segments(b, g)  # noqa: E731
    held_short, held_far = held_while_streaming(short, stream), held_while_streaming(far, stream)
    assert held_far == held_short
    b, T, L = 4, far.segment_len, far.passkey_len
    assert held_far <= 8 * b * (2 * T + L + 1)  # ids and targets of one segment, digits, offsets (int64)
    control_short, control_far = held_while_streaming(short, materialised), held_while_streaming(far, materialised)
    assert control_far >= 2 * 8 * b * far.seq_len and control_far > 50 * control_short


_STREAM_1M = textwrap.dedent(
    """
    import json, resource, time, torch
    torch.set_num_threads(1)
    from memgpt.tasks import IGNORE_INDEX, PasskeyTask
    task, b = PasskeyTask.for_length(2**20), 8
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    tokens = answers = 0
    t0 = time.perf_counter()
    for s, (ids, tgt) in enumerate(task.segments(b, torch.Generator().manual_seed(0))):
        if s == 0:
            start = (ids == task.pass_id).int().argmax(dim=1, keepdim=True)
            digits = ids.gather(1, start + torch.arange(1, task.passkey_len + 1))
        if s == 1024:
            warm = peak()
        tokens += ids.shape[1]
        answers += int((tgt != IGNORE_INDEX).sum())
    seconds = time.perf_counter() - t0
    ok = bool(torch.equal(tgt[:, : task.passkey_len], digits))
    print(json.dumps(dict(segments=s + 1, tokens=tokens, answers=answers, ok=ok, warm=warm, end=peak(), seconds=seconds)))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kB on Linux only")
def test_streaming_a_million_token_haystack_keeps_peak_rss_flat():
    """65,536 segments of 16 tokens (2**20 tokens), b = 8, in a fresh process: the peak RSS after
    the whole haystack is within 16 MiB of the peak after 1,024 segments; materialising the
    sample would take 2 * 8 * 2**20 * 8 B = 128 MiB."""
    out = subprocess.run([sys.executable, "-c", _STREAM_1M], capture_output=True, text=True, check=True, timeout=600)
    r = json.loads(out.stdout)
    assert (r["segments"], r["tokens"], r["answers"], r["ok"]) == (65536, 2**20, 8 * 4, True)
    assert r["end"] - r["warm"] < 16 * 2**20, r

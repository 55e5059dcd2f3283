"""Training windows, the far-copyable mask on hand-made examples, and the copy-probe builder."""

from __future__ import annotations

import pytest
import torch

from memgpt.tasks import IGNORE_INDEX
from memgpt.tasks.stdlib_text import CharVocab
from memgpt.tasks.text_windows import TextWindowTask, copy_probe, far_copyable_mask, insert_repeats, sample_windows

V = CharVocab()


def mask_of(text: str, context: int, distance: int) -> list[int]:
    return far_copyable_mask(V.encode(text), context=context, distance=distance).int().tolist()


def test_far_copyable_hand_example():
    # context 2, distance 3. t=8 ('g'): "ab" last ended at j=2, 6 back -> far.
    # t=7: "fa" never seen. t=2..6: contexts seen for the first time.
    assert mask_of("abcdefabg", 2, 3) == [0, 0, 0, 0, 0, 0, 0, 0, 1]
    # the same context 2 back only: near, not far
    assert mask_of("ababx", 2, 3) == [0, 0, 0, 0, 0]
    # exactly `distance` back is not "more than": t=5 ("ab" ended at 2, 3 back)
    assert mask_of("abxabz", 2, 3) == [0, 0, 0, 0, 0, 0]
    assert mask_of("abxabz", 2, 2) == [0, 0, 0, 0, 0, 1]


def test_far_copyable_uses_the_most_recent_occurrence():
    # "ab" at the start (far from t=12) and again just before (near): the most recent counts.
    text = "abQ" + "0123456" + "ab" + "Z" + "ab" + "Y"
    m = mask_of(text, 2, 3)
    first_repeat, second_repeat = 12, 15  # the characters after the 2nd and 3rd "ab"
    assert text[first_repeat] == "Z" and text[second_repeat] == "Y"
    assert m[first_repeat] == 1  # "ab" last ended at 2: 10 back
    assert m[second_repeat] == 0  # "ab" last ended at 12: 3 back
    assert sum(m) == 1


def test_far_copyable_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (300,), generator=g, dtype=torch.uint8)  # small alphabet: many repeats
    got = far_copyable_mask(ids, context=3, distance=10)
    s = ids.tolist()
    for t in range(len(s)):
        prev = [j for j in range(3, t) if s[j - 3 : j] == s[t - 3 : t]] if t >= 3 else []
        assert bool(got[t]) == bool(prev and t - prev[-1] > 10), t


def test_far_copyable_bad_input():
    with pytest.raises(ValueError, match=r"ids \(n,\)"):
        far_copyable_mask(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        far_copyable_mask(torch.tensor([1, 300]))
    with pytest.raises(ValueError, match="context must be >= 1"):
        far_copyable_mask(torch.tensor([1, 2]), context=0)


def files_of(*lengths: int) -> list[torch.Tensor]:
    """File i holds only the character id i + 10, so any window shows where it came from."""
    return [torch.full((n,), i + 10, dtype=torch.uint8) for i, n in enumerate(lengths)]


def test_copy_probe_layout():
    g = torch.Generator().manual_seed(0)
    files = [torch.arange(1000, dtype=torch.uint8) % 97 + (i % 2) for i in range(3)] + files_of(600, 700)
    batch = copy_probe(files, 16, chunk_len=64, filler_len=96, segment_len=32, generator=g)
    ids, tgt = batch.input_ids, batch.targets
    assert ids.shape == tgt.shape == (16, 64 + 96 + 64) and ids.dtype == torch.long
    q0 = 64 + 96
    assert batch.segment_len == 32 and batch.query_segment == q0 // 32
    assert torch.equal(ids[:, :64], ids[:, q0:])  # A again
    scored = tgt != IGNORE_INDEX
    assert scored[:, q0 : q0 + 63].all() and int(scored.sum()) == 16 * 63
    assert torch.equal(tgt[:, q0 : q0 + 63], ids[:, q0 + 1 :])  # the next character of the second A


def test_copy_probe_filler_comes_from_another_file():
    files = files_of(300, 400, 500, 100)  # the 100-character file is too short for either part
    batch = copy_probe(
        files, 32, chunk_len=64, filler_len=128, segment_len=64, generator=torch.Generator().manual_seed(1)
    )
    a, filler = batch.input_ids[:, 0], batch.input_ids[:, 64]
    assert (a != filler).all() and set(a.tolist()) | set(filler.tolist()) <= {10, 11, 12}
    assert len(set(a.tolist())) == 3  # every usable file gets used as A
    again = copy_probe(
        files, 32, chunk_len=64, filler_len=128, segment_len=64, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(batch.input_ids, again.input_ids)


def test_copy_probe_bad_input():
    g = torch.Generator()
    files = files_of(500, 500)
    with pytest.raises(ValueError, match="multiple of segment_len"):
        copy_probe(files, 2, chunk_len=100, filler_len=128, segment_len=64, generator=g)
    with pytest.raises(ValueError, match=">= 2 segments"):
        copy_probe(files, 2, chunk_len=64, filler_len=64, segment_len=64, generator=g)
    with pytest.raises(ValueError, match=">= 2 files"):
        copy_probe(files_of(500, 50), 2, chunk_len=64, filler_len=128, segment_len=64, generator=g)


def test_windows_are_uniform_over_valid_offsets():
    files = files_of(5, 13, 10)  # windows of 10: 0, 4 and 1 valid offsets
    win = sample_windows(files, 10, 4000, torch.Generator().manual_seed(0))
    assert win.shape == (4000, 10) and (win == win[:, :1]).all()  # never straddles two files
    counts = torch.bincount(win[:, 0] - 10, minlength=3).tolist()
    assert counts[0] == 0 and abs(counts[1] / 4000 - 0.8) < 0.03 and abs(counts[2] / 4000 - 0.2) < 0.03
    with pytest.raises(ValueError, match="no file holds a window of 20"):
        sample_windows(files, 20, 1, torch.Generator())


def test_text_window_task(tmp_path):
    text = "".join(f"def f{i}(x):\n\treturn x + {i}\n" for i in range(200))
    for name in ("a.py", "b.py", "c.py", "d.py"):
        (tmp_path / name).write_text(text)
    task = TextWindowTask(segment_len=16, segments=3, split="train", root=str(tmp_path))
    assert task.files and task.vocab_size == 98 and task.seq_len == 48
    batch = task.sample(8, torch.Generator().manual_seed(0))
    assert batch.input_ids.shape == batch.targets.shape == (8, 48) and batch.segment_len == 16
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])  # targets = next character
    for row in batch.input_ids:
        assert V.decode(row) in text
    again = task.sample(8, torch.Generator().manual_seed(0))
    assert torch.equal(batch.input_ids, again.input_ids)
    with pytest.raises(ValueError, match="segments must be >= 1"):
        TextWindowTask(segments=0, root=str(tmp_path))


def test_insert_repeats_copies_one_chunk_far_enough_back():
    windows = torch.arange(8 * 100).view(8, 100) % 1000  # all characters distinct within a row
    out = insert_repeats(
        windows,
        1.0,
        min_len=5,
        max_len=20,
        min_distance=30,
        max_distance=60,
        generator=torch.Generator().manual_seed(0),
    )
    for row, new in zip(windows, out):
        changed = (row != new).nonzero().flatten()
        assert len(changed) >= 5, "every row was chosen: one chunk must be overwritten"
        lo, hi = int(changed[0]), int(changed[-1]) + 1
        assert hi - lo <= 20 and (changed == torch.arange(lo, hi)).all()  # one contiguous chunk
        d = int(row[lo] - new[lo])  # rows are arange: the copied value tells the distance back
        assert 30 <= d <= 60 and torch.equal(new[lo:hi], row[lo - d : hi - d])


def test_insert_repeats_probability_and_no_draws_at_zero():
    windows = torch.arange(400 * 64).view(400, 64)
    g = torch.Generator().manual_seed(1)
    out = insert_repeats(windows, 0.25, min_len=4, max_len=8, min_distance=16, max_distance=32, generator=g)
    frac = float((out != windows).any(dim=1).float().mean())
    assert abs(frac - 0.25) < 0.07
    g0, g1 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert insert_repeats(windows, 0.0, min_len=4, max_len=8, min_distance=16, max_distance=32, generator=g0) is windows
    assert torch.equal(torch.rand(3, generator=g0), torch.rand(3, generator=g1))  # nothing was drawn
    with pytest.raises(ValueError, match="prob must be in"):
        insert_repeats(windows, 1.5, min_len=4, max_len=8, min_distance=16, max_distance=32, generator=g)
    with pytest.raises(ValueError, match="min_distance < window length 64"):
        insert_repeats(windows, 0.5, min_len=4, max_len=8, min_distance=64, max_distance=80, generator=g)
    # chunks longer than the room left are clipped to fit: a 32-character chunk at distance >= 40
    clipped = insert_repeats(windows, 1.0, min_len=40, max_len=48, min_distance=40, max_distance=60, generator=g)
    changed = (clipped != windows).sum(dim=1)
    assert int(changed.min()) == int(changed.max()) == 24


def test_text_window_task_repeats(tmp_path):
    text = "".join(f"def f{i}(x):\n\treturn x + {i}\n" for i in range(200))
    for name in ("a.py", "b.py", "c.py", "d.py"):
        (tmp_path / name).write_text(text)
    plain = TextWindowTask(segment_len=16, segments=4, split="train", root=str(tmp_path))
    rep = TextWindowTask(
        segment_len=16, segments=4, split="train", root=str(tmp_path), repeat_prob=1.0, repeat_len=(8, 8)
    )
    assert rep.repeat_distance == (16, 64)
    a, b = plain.sample(6, torch.Generator().manual_seed(0)), rep.sample(6, torch.Generator().manual_seed(0))
    assert torch.equal(b.input_ids[:, 1:], b.targets[:, :-1])  # targets still = next character
    assert not torch.equal(a.input_ids, b.input_ids)
    with pytest.raises(ValueError, match="repeat_prob must be a float in"):
        TextWindowTask(root=str(tmp_path), repeat_prob=2.0)
    with pytest.raises(ValueError, match="repeat_len must be two ints"):
        TextWindowTask(root=str(tmp_path), repeat_len=(9, 3))

"""The passkey generator follows its documented recipe."""

from __future__ import annotations

import pytest
import torch

from memgpt.tasks import IGNORE_INDEX, PasskeyTask


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

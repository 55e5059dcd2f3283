"""MemoryState: construction, validation, value operations and serialisation."""

from __future__ import annotations

import pytest
import torch

from memgpt.memory import MemoryState, write
from memgpt.memory.state import metadata_dtype
from memgpt.testing import canonical_memory

B, H, M, DK, DV = 3, 2, 4, 5, 6


def filled(device, dtype=torch.float32, requires_grad=False) -> MemoryState:
    """A state with some written slots (row 0 full, row 1 partly, row 2 empty)."""
    s = MemoryState.empty(B, H, M, DK, DV, device=device, dtype=dtype)
    keys = torch.randn(B, H, 5, DK, device=device, dtype=dtype, requires_grad=requires_grad)
    values = torch.randn(B, H, 5, DV, device=device, dtype=dtype, requires_grad=requires_grad)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool, device=device)
    return write(s, keys, values, torch.rand(B, H, 5, device=device), mask=mask)


def fields_equal(a: MemoryState, b: MemoryState) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.to_dict().values(), b.to_dict().values(), strict=True))


# ---------------------------------------------------------------------------------- empty()


def test_empty_shapes_dtypes_and_values(device):
    s = MemoryState.empty(B, H, M, DK, DV, device=device, dtype=torch.float64)
    assert (s.batch_size, s.heads, s.capacity, s.key_dim, s.value_dim) == (B, H, M, DK, DV)
    assert s.keys.shape == (B, H, M, DK) and s.values.shape == (B, H, M, DV)
    assert s.dtype == torch.float64 and s.device.type == device.type
    # slot metadata follow a float64 store (float32 for bf16/fp16/fp32 stores: see test_to_dtype...)
    for name, dt in dict(valid=torch.bool, strength=torch.float64, step=torch.long, usage=torch.float64).items():
        t = getattr(s, name)
        assert t.shape == (B, H, M) and t.dtype == dt and not t.any()
    assert s.count.shape == (B,) and s.count.dtype == torch.long and not s.count.any()
    assert not s.keys.any() and not s.values.any()


def test_empty_default_dtype_is_torch_default():
    assert MemoryState.empty(1, 1, 1, 1, 1).dtype == torch.get_default_dtype()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(capacity=0), ValueError, r"capacity must be >= 1, got 0"),
        (dict(capacity=-3), ValueError, r"capacity must be >= 1, got -3"),
        (dict(batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
        (dict(capacity=2.5), TypeError, r"capacity must be an int, got float"),
        (dict(heads=True), TypeError, r"heads must be an int, got bool"),
        (dict(key_dim="4"), TypeError, r"key_dim must be an int, got str"),
        (dict(dtype=torch.int64), TypeError, r"dtype must be a floating point dtype, got torch.int64"),
        (dict(dtype=torch.bool), TypeError, r"floating point dtype, got torch.bool"),
        (dict(dtype="float32"), TypeError, r"floating point dtype, got 'float32'"),
    ],
)
def test_empty_rejects_bad_arguments(kwargs, exc, match):
    args = dict(batch_size=B, heads=H, capacity=M, key_dim=DK, value_dim=DV)
    dtype = kwargs.pop("dtype", None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MemoryState.empty(**args, dtype=dtype)


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, bad, exc, match",
    [
        (
            "values",
            torch.zeros(B, H, M + 1, DV),
            ValueError,
            r"values must be \(b h m dv\) = \(3, 2, 4, dv\), got shape \(3, 2, 5, 6\)",
        ),
        (
            "values",
            torch.zeros(B, H, M, DV, dtype=torch.float64),
            TypeError,
            r"share a floating dtype, got torch.float32 and torch.float64",
        ),
        ("keys", torch.zeros(B, H, M), ValueError, r"keys must be \(b h m dk\), got shape \(3, 2, 4\)"),
        (
            "valid",
            torch.zeros(B, H, M + 1, dtype=torch.bool),
            ValueError,
            r"valid must be \(b h m\) = \(3, 2, 4\), got shape \(3, 2, 5\)",
        ),
        ("valid", torch.zeros(B, H, M), TypeError, r"valid must have dtype torch.bool, got torch.float32"),
        (
            "strength",
            torch.zeros(B, H, M, dtype=torch.float64),
            TypeError,
            r"strength must have dtype torch.float32, got torch.float64",
        ),
        (
            "step",
            torch.zeros(B, H, M, dtype=torch.int32),
            TypeError,
            r"step must have dtype torch.int64, got torch.int32",
        ),
        ("usage", torch.zeros(B, 1, M), ValueError, r"usage must be \(b h m\) = \(3, 2, 4\), got shape \(3, 1, 4\)"),
        ("count", torch.zeros(B + 1, dtype=torch.long), ValueError, r"count must be \(b,\) = \(3,\), got shape \(4,\)"),
        ("count", torch.zeros(B), TypeError, r"count must be int64, got torch.float32"),
        ("count", [0, 0, 0], TypeError, r"MemoryState.count must be a Tensor, got list"),
    ],
)
def test_inconsistent_fields_raise(field, bad, exc, match):
    s = MemoryState.empty(B, H, M, DK, DV, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        s.replace(**{field: bad})
    kwargs = s.to_dict()
    kwargs[field] = bad
    with pytest.raises(exc, match=match):
        MemoryState(**kwargs)


def test_zero_capacity_tensors_raise():
    kwargs = MemoryState.empty(B, H, 1, DK, DV).to_dict()
    kwargs = {k: (v[:, :, :0] if v.dim() >= 3 else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=r"capacity must be >= 1, got 0"):
        MemoryState(**kwargs)


def test_replace_rejects_unknown_field():
    with pytest.raises(ValueError, match=r"unknown MemoryState fields \['age'\]"):
        MemoryState.empty(1, 1, 1, 1, 1).replace(age=torch.zeros(1))


def test_state_is_frozen():
    s = MemoryState.empty(1, 1, 1, 1, 1)
    with pytest.raises(AttributeError):
        s.keys = torch.ones(1, 1, 1, 1)


def test_check_compatible_names_expected_and_actual():
    s = MemoryState.empty(B, H, M, DK, DV, dtype=torch.float32)
    s.check_compatible(batch_size=B, heads=H, key_dim=DK, value_dim=DV, capacity=M, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"layer 3: expected batch size 5, got 3"):
        s.check_compatible(batch_size=5, heads=H, key_dim=DK, value_dim=DV, what="layer 3")
    with pytest.raises(ValueError, match=r"expected heads 4, got 2"):
        s.check_compatible(batch_size=B, heads=4, key_dim=DK, value_dim=DV)
    with pytest.raises(ValueError, match=r"expected value_dim 7, got 6"):
        s.check_compatible(batch_size=B, heads=H, key_dim=DK, value_dim=7)
    with pytest.raises(ValueError, match=r"expected capacity 8, got 4"):
        s.check_compatible(batch_size=B, heads=H, key_dim=DK, value_dim=DV, capacity=8)
    with pytest.raises(TypeError, match=r"expected dtype torch.bfloat16, got torch.float32"):
        s.check_compatible(batch_size=B, heads=H, key_dim=DK, value_dim=DV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected device meta, got cpu"):
        s.check_compatible(batch_size=B, heads=H, key_dim=DK, value_dim=DV, device=torch.device("meta"))


def test_repr_is_informative(device):
    r = repr(MemoryState.empty(B, H, M, DK, DV, device=device, dtype=torch.bfloat16))
    for part in (
        "MemoryState(",
        "batch_size=3",
        "heads=2",
        "capacity=4",
        "key_dim=5",
        "value_dim=6",
        "bfloat16",
        device.type,
    ):
        assert part in r, (part, r)
    assert len(r) < 300  # no tensor dumps


# ---------------------------------------------------------------------------------- value operations


def test_detach_cuts_the_graph(device):
    s = filled(device, requires_grad=True)
    assert s.keys.requires_grad and s.keys.grad_fn is not None
    d = s.detach()
    for name, t in d.to_dict().items():
        assert not t.requires_grad and t.grad_fn is None, name
    assert "requires_grad=False" in repr(d) and "requires_grad=True" in repr(s)
    assert fields_equal(d, s)


def test_to_dtype_converts_storage_and_metadata_to_metadata_dtype(device):
    s = filled(device, dtype=torch.float64)
    t = s.to(dtype=torch.bfloat16)
    assert t.keys.dtype == t.values.dtype == torch.bfloat16
    assert t.strength.dtype == t.usage.dtype == metadata_dtype(torch.bfloat16) == torch.float32
    assert t.valid.dtype == torch.bool and t.step.dtype == t.count.dtype == torch.long
    torch.testing.assert_close(t.keys, s.keys.bfloat16(), rtol=0, atol=0)
    for name in ("valid", "step", "count"):
        assert torch.equal(getattr(t, name), getattr(s, name)), name
    for name in ("strength", "usage"):  # float64 -> float32 metadata: rounded, never bf16
        assert torch.equal(getattr(t, name), getattr(s, name).float()), name
    back = t.to(dtype=torch.float64)
    assert back.strength.dtype == back.usage.dtype == torch.float64
    with pytest.raises(TypeError, match=r"dtype must be floating point, got torch.int32"):
        s.to(dtype=torch.int32)
    with pytest.raises(TypeError, match=r"dtype must be floating point, got 'bfloat16'"):
        s.to(dtype="bfloat16")


def test_to_device_keeps_everything(device):
    s = filled("cpu")
    t = s.to(device)
    assert t.device.type == device.type and all(v.device.type == device.type for v in t.to_dict().values())
    assert fields_equal(t.to("cpu"), s)


def test_clone_is_independent():
    s = filled("cpu")
    c = s.clone()
    assert fields_equal(c, s)
    assert all(x.data_ptr() != y.data_ptr() for x, y in zip(c.to_dict().values(), s.to_dict().values(), strict=True))


def test_reset_rows_empties_only_masked_rows(device):
    s = filled(device)
    mask = torch.tensor([True, False, True], device=device)
    r = s.reset_rows(mask)
    empty = MemoryState.empty(B, H, M, DK, DV, device=device, dtype=s.dtype)
    for name, t in r.to_dict().items():
        assert torch.equal(t[1], getattr(s, name)[1]), name  # untouched row
        assert torch.equal(t[0], getattr(empty, name)[0]), name  # emptied rows
        assert torch.equal(t[2], getattr(empty, name)[2]), name
    assert torch.equal(r.count, torch.tensor([0, s.count[1].item(), 0], device=device))
    assert fields_equal(s.reset_rows(torch.zeros(B, dtype=torch.bool, device=device)), s)


def test_write_after_reset_rows_is_a_fresh_start(device):
    s = filled(device)
    mask = torch.tensor([True, False, False], device=device)
    keys, values = torch.randn(B, H, 3, DK, device=device), torch.randn(B, H, 3, DV, device=device)
    strength = torch.rand(B, H, 3, device=device)
    after_reset = write(s.reset_rows(mask), keys, values, strength)
    fresh = write(MemoryState.empty(B, H, M, DK, DV, device=device), keys, values, strength)
    for name, t in after_reset.to_dict().items():
        assert torch.equal(t[0], getattr(fresh, name)[0]), name


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (torch.ones(B + 1, dtype=torch.bool), ValueError, r"reset_rows mask must be \(b,\) = \(3,\), got shape \(4,\)"),
        (torch.ones(B, 1, dtype=torch.bool), ValueError, r"got shape \(3, 1\)"),
        (torch.ones(B, dtype=torch.long), TypeError, r"reset_rows mask must be bool, got torch.int64"),
        ([True, False, True], TypeError, r"mask must be a Tensor, got list"),
    ],
)
def test_reset_rows_rejects_bad_mask(mask, exc, match):
    with pytest.raises(exc, match=match):
        filled("cpu").reset_rows(mask)


@pytest.mark.parametrize("index_dtype", [torch.long, torch.int32])
def test_index_select_reorders_and_duplicates_rows(device, index_dtype):
    s = filled(device)
    index = torch.tensor([2, 0, 0, 1, 2], dtype=index_dtype, device=device)
    t = s.index_select(index)
    assert t.batch_size == 5
    for name, v in t.to_dict().items():
        for row, src in enumerate(index.tolist()):
            assert torch.equal(v[row], getattr(s, name)[src]), (name, row)
    assert s.index_select(torch.zeros(0, dtype=torch.long, device=device)).batch_size == 0


@pytest.mark.parametrize(
    "index, exc, match",
    [
        (torch.tensor([0, 3]), ValueError, r"index values must lie in \[0, 3\), got min 0 max 3"),
        (torch.tensor([-1, 1]), ValueError, r"index values must lie in \[0, 3\), got min -1 max 1"),
        (torch.tensor([[0, 1]]), ValueError, r"index must be 1-D \(b'\,\), got shape \(1, 2\)"),
        (torch.tensor([0.0, 1.0]), TypeError, r"index must be int64 or int32, got torch.float32"),
        ([0, 1], TypeError, r"index must be a Tensor, got list"),
    ],
)
def test_index_select_rejects_bad_index(index, exc, match):
    with pytest.raises(exc, match=match):
        filled("cpu").index_select(index)


# ---------------------------------------------------------------------------------- serialisation


def test_to_dict_from_dict_round_trip(device, tmp_path):
    s = filled(device)
    path = tmp_path / "memory.pt"
    torch.save(s.to_dict(), path)
    loaded = MemoryState.from_dict(torch.load(path, map_location=device))
    assert fields_equal(loaded, s)
    assert set(s.to_dict()) == {"keys", "values", "valid", "strength", "step", "usage", "count"}


def test_from_dict_rejects_missing_and_extra_fields():
    d = filled("cpu").to_dict()
    missing = {k: v for k, v in d.items() if k != "usage"}
    with pytest.raises(ValueError, match=r"missing \['usage'\], unexpected \[\]"):
        MemoryState.from_dict(missing)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]"):
        MemoryState.from_dict({**d, "extra": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"expected a dict of tensors, got list"):
        MemoryState.from_dict(list(d.values()))
    with pytest.raises(ValueError, match=r"usage must be \(b h m\)"):
        MemoryState.from_dict({**d, "usage": torch.zeros(1, 1, 1)})


# ---------------------------------------------------------------------------------- canonical form


def test_canonical_memory_ignores_slot_positions():
    s = filled("cpu")
    perm = torch.rand(B, H, M).argsort(dim=-1)

    def permute(t):
        return t.gather(2, perm if t.dim() == 3 else perm[..., None].expand_as(t))

    p = s.replace(**{k: permute(getattr(s, k)) for k in ("keys", "values", "valid", "strength", "step", "usage")})
    a, b = canonical_memory(s), canonical_memory(p)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # valid slots first, in write order
    steps = a["step"].masked_fill(~a["valid"], -1)
    valid_first = a["valid"].long().diff(dim=-1) <= 0
    assert valid_first.all()
    assert ((steps.diff(dim=-1) > 0) | ~a["valid"][..., 1:]).all()

"""MemoryStates.save / load (memgpt/integrations/states.py): the stores of a model with several
memory layers in one safetensors file, with the checks of a MemoryState file; every bad file is a
ValueError naming the file.

Most tests build the stores from memory layers directly and check against a stand-in with what
MemoryStates reads of a ``MemoryModel`` (``after`` and ``memories``); the last ones use a real
``MemoryModel`` on a tiny GPT-2 when transformers is installed.
"""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import memgpt
from memgpt.integrations import MemoryStates, ResidualMemory
from memgpt.memory import MemoryState, write
from memgpt.memory.tensor_file import METADATA_KEY, digest

B, D = 2, 16


def make_layer(seed: int = 0, **kw) -> memgpt.MemoryLayer:
    torch.manual_seed(seed)
    return memgpt.MemoryLayer(D, **(dict(heads=2, capacity=4, eviction="usage") | kw))


class StandIn(nn.Module):
    """What MemoryStates reads of a MemoryModel: ``after`` and ``memories`` (ResidualMemory by index)."""

    def __init__(self, after=(0, 2), kws=None) -> None:
        super().__init__()
        kws = kws or [dict(), dict(capacity=6, heads=1)]
        self.after = tuple(after)
        self.memories = nn.ModuleDict(
            {str(i): ResidualMemory(make_layer(seed=j, **kw)) for j, (i, kw) in enumerate(zip(after, kws))}
        )

    def layers(self) -> list[ResidualMemory]:
        return [self.memories[str(i)] for i in self.after]


@torch.no_grad()
def run(model: StandIn, x: torch.Tensor, states: MemoryStates | None = None) -> tuple[list, MemoryStates]:
    """Every memory layer of ``model`` on ``x`` from its store: (outputs, new stores)."""
    stores = [None] * len(model.after) if states is None else list(states)
    out = [layer(x, store) for layer, store in zip(model.layers(), stores)]
    return [y for y, _ in out], MemoryStates(tuple(s for _, s in out))


def assert_same(a: MemoryStates, b: MemoryStates) -> None:
    assert len(a) == len(b)
    for i, (ma, mb) in enumerate(zip(a, b)):
        fa, fb = ma.to_dict(), mb.to_dict()
        for name in fa:
            assert fa[name].dtype == fb[name].dtype and torch.equal(fa[name], fb[name]), (i, name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, states, path, bytes): two stores after more writes than capacity, saved with the model."""
    model = StandIn()
    _, states = run(model, torch.randn(B, 9, D, generator=torch.Generator().manual_seed(1)))
    path = tmp_path_factory.mktemp("states") / "states.safetensors"
    states.save(path, model)
    return model, states, path, path.read_bytes()


def rewrite(src, dst, *, header=None, tensors=None):
    """Copy a file with its header / tensors changed (the digest is NOT recomputed)."""
    with safe_open(str(src), "pt") as f:
        h = json.loads(f.metadata()[METADATA_KEY])
        t = {k: f.get_tensor(k) for k in f.keys()}
    h = header(h) if header else h
    t = tensors(t) if tensors else t
    save_file(t, str(dst), metadata={METADATA_KEY: json.dumps(h)})
    return dst


def redigest(path):
    with safe_open(str(path), "pt") as f:
        h = json.loads(f.metadata()[METADATA_KEY])
        t = {k: f.get_tensor(k) for k in f.keys()}
    h["sha256"] = digest(h, t)
    save_file(t, str(path), metadata={METADATA_KEY: json.dumps(h)})
    return path


# ---------------------------------------------------------------- round trip and header
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_exact_and_continues_identically(tmp_path, dtype):
    model = StandIn().to(dtype)
    x = torch.randn(B, 12, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    _, head = run(model, x[:, :7])
    path = tmp_path / "s.safetensors"
    head.save(path, model)
    loaded = MemoryStates.load(path, model)
    assert_same(head, loaded)
    assert all(m.dtype == dtype for m in loaded)
    ys_a, tail_a = run(model, x[:, 7:], head)
    ys_b, tail_b = run(model, x[:, 7:], loaded)
    assert all(torch.equal(a, b) for a, b in zip(ys_a, ys_b))
    assert_same(tail_a, tail_b)
    assert_same(MemoryStates.load(path), loaded)  # the model only adds checks


def test_stores_of_different_dtypes_and_shapes_share_a_file(tmp_path):
    states = MemoryStates(
        (MemoryState.empty(B, 2, 4, 8, 8, dtype=torch.bfloat16), MemoryState.empty(B, 1, 6, 3, 5, dtype=torch.float64))
    )
    states.save(tmp_path / "s.safetensors")
    loaded = MemoryStates.load(tmp_path / "s.safetensors")
    assert [m.dtype for m in loaded] == [torch.bfloat16, torch.float64]
    assert_same(states, loaded)


def test_header_records_the_layers_their_shapes_and_settings(saved):
    import memgpt.integrations.states as states_module

    _, _, path, _ = saved
    with safe_open(str(path), "pt") as f:
        h = json.loads(f.metadata()[METADATA_KEY])
        names = set(f.keys())
    assert h["format"] == "memgpt.MemoryStates" == states_module.MEMORY_STATES_FORMAT
    assert h["format_version"] == 1 == states_module.MEMORY_STATES_VERSION
    assert h["library_version"] == memgpt.__version__ and len(h["sha256"]) == 64
    assert h["batch_size"] == B and h["after"] == [0, 2]
    shapes = [[r[k] for k in ("heads", "capacity", "key_dim", "value_dim", "dtype")] for r in h["memories"]]
    assert shapes == [[2, 4, 8, 8, "float32"], [1, 6, 16, 16, "float32"]]
    assert h["memories"][1]["layer"] == {"eviction": "usage", "usage_decay": 0.9, "shift_keys": False}
    fields = ("keys", "values", "valid", "strength", "step", "usage", "count")
    assert names == {f"memories.{i}.{f}" for i in range(2) for f in fields}


def test_map_location_and_the_layers_devices(saved):
    model, _, path, _ = saved
    assert all(m.device.type == "cpu" for m in MemoryStates.load(path, model))
    assert all(m.device.type == "meta" for m in MemoryStates.load(path, model, map_location="meta"))


def test_torch_save_is_not_the_way(saved):
    """torch.load's default (weights_only=True) refuses a pickled MemoryStates: the docs say why."""
    buffer = io.BytesIO()
    torch.save(saved[1], buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------- bad files
def bad_files(tmp_path, saved):
    model, states, path, data = saved
    out = {}

    def header(name, change):
        out[name] = rewrite(path, tmp_path / name, header=change)

    def tensors(name, change, *, redigested=False):
        out[name] = rewrite(path, tmp_path / name, tensors=change)
        if redigested:
            redigest(out[name])

    (tmp_path / "garbage").write_bytes(b"\x00" * 64)
    out["garbage"] = tmp_path / "garbage"
    states[0].save(tmp_path / "one_store")  # a MemoryState file
    out["one_store"] = tmp_path / "one_store"
    header("future_version", lambda h: h | {"format_version": 7})
    header("no_memories", lambda h: h | {"memories": []})
    header("record_keys", lambda h: h | {"memories": [h["memories"][0] | {"age": 1}, h["memories"][1]]})
    header("record_dtype", lambda h: h | {"memories": [h["memories"][0], h["memories"][1] | {"dtype": "int64"}]})
    header("bad_after", lambda h: h | {"after": [2, 0]})
    header("capacity_edited", lambda h: h | {"memories": [h["memories"][0], h["memories"][1] | {"capacity": 5}]})
    header("after_edited", lambda h: h | {"after": [0, 1]})
    tensors("missing", lambda t: {k: v for k, v in t.items() if k != "memories.1.count"})
    tensors("extra", lambda t: t | {"memories.2.keys": torch.zeros(1)})
    tensors("wrong_dtype", lambda t: t | {"memories.0.usage": t["memories.0.usage"].double()})
    flipped = bytearray(data)
    flipped[-5] ^= 0x01
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    out["flipped"] = tmp_path / "flipped"
    tensors("nan_usage", lambda t: t | {"memories.1.usage": t["memories.1.usage"] * float("nan")}, redigested=True)
    messages = {
        "garbage": "not a readable safetensors file",
        "one_store": "expected format 'memgpt.MemoryStates', got 'memgpt.MemoryState'",
        "future_version": "unsupported state file version: expected 1, got 7",
        "no_memories": "header field 'memories' must be a non-empty list of stores, got \\[\\]",
        "record_keys": "memories\\[0\\] expected a store record with keys .*, got \\['age', ",
        "record_dtype": "memories\\[1\\]: dtype expected one of .*, got 'int64'",
        "bad_after": "header field 'after' expected None or 2 increasing layer indices, got \\[2, 0\\]",
        "capacity_edited": "tensor 'memories.1.keys' expected torch.float32 \\(2, 1, 5, 16\\), got torch.float32 \\(2, 1, 6, 16\\)",
        "after_edited": "corrupt state file: SHA-256",
        "missing": "missing \\['memories.1.count'\\], unexpected \\[\\]",
        "extra": "missing \\[\\], unexpected \\['memories.2.keys'\\]",
        "wrong_dtype": "tensor 'memories.0.usage' expected torch.float32 \\(2, 2, 4\\), got torch.float64 \\(2, 2, 4\\)",
        "flipped": "corrupt state file: SHA-256",
        "nan_usage": "tensor 'memories.1.usage' expected finite values in \\[0, inf\\], got nan",
    }
    assert messages.keys() == out.keys()
    return {name: (out[name], messages[name]) for name in out}


def test_bad_files_raise_value_error_naming_the_file(tmp_path, saved):
    model = saved[0]
    for name, (file, message) in bad_files(tmp_path, saved).items():
        for m in (None, model):
            with pytest.raises(ValueError, match=message) as info:
                MemoryStates.load(file, m)
            assert repr(str(file)) in str(info.value), name
    with pytest.raises(FileNotFoundError, match="absent"):
        MemoryStates.load(tmp_path / "absent.safetensors")


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(after=(0,), kws=[dict()]), "saved for another model: 1 memory layers expected \\(the model\\), got 2"),
        (dict(after=(0, 1)), "another model: memories after layers expected \\[0, 1\\] \\(the model\\), got \\[0, "),
        (
            dict(kws=[dict(), dict(capacity=8, heads=1)]),
            "memories\\[1\\] \\(after layer 2\\) was saved for another layer: capacity expected 8 \\(the layer\\), got 6",
        ),
        (
            dict(kws=[dict(eviction="fifo"), dict(capacity=6, heads=1)]),
            "memories\\[0\\] \\(after layer 0\\) was saved for another layer: eviction expected 'fifo'",
        ),
    ],
)
def test_another_models_states_are_rejected(saved, other, message):
    path = saved[2]
    with pytest.raises(ValueError, match=message) as info:
        MemoryStates.load(path, StandIn(**other))
    assert repr(str(path)) in str(info.value)


def test_a_wrong_model_argument_is_a_type_error(saved):
    _, states, path, _ = saved
    with pytest.raises(TypeError, match="model must be a MemoryModel, got Linear"):
        MemoryStates.load(path, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a MemoryModel, got Linear"):
        states.save(path, nn.Linear(2, 2))


# ---------------------------------------------------------------- saving
def test_save_checks_the_stores_against_the_model(tmp_path, saved):
    _, states, _, _ = saved
    with pytest.raises(ValueError, match="do not fit the model: 1 memory layers expected \\(the model\\), got 2"):
        states.save(tmp_path / "x", StandIn(after=(0,), kws=[dict()]))
    fit = "memories\\[1\\] \\(after layer 2\\) does not fit its layer: heads expected 2"
    with pytest.raises(ValueError, match=fit):
        states.save(tmp_path / "x", StandIn(kws=[dict(), dict(capacity=6)]))
    with pytest.raises(ValueError, match="holds no memory"):
        MemoryStates(()).save(tmp_path / "x")
    assert os.listdir(tmp_path) == []


def test_a_donated_store_cannot_be_saved(tmp_path, saved):
    _, states, _, _ = saved
    with torch.no_grad():
        donor = states[1].clone()
        write(donor, torch.randn(B, 1, 2, 16), torch.randn(B, 1, 2, 16), torch.rand(B, 1, 2), inplace=True)
    with pytest.raises(RuntimeError, match="donated"):
        MemoryStates((states[0], donor)).save(tmp_path / "s.safetensors")
    assert os.listdir(tmp_path) == []


def test_an_unwritable_place_is_an_os_error_naming_the_path(tmp_path, saved, monkeypatch):
    _, states, path, _ = saved

    def denied(tensors, filename, metadata=None):
        raise SafetensorError(
            f'Error while serializing: I/O error: Permission denied (os error 13) at path "{filename}"'
        )

    monkeypatch.setattr("safetensors.torch.save_file", denied)
    with pytest.raises(PermissionError) as info:
        states.save(tmp_path / "s.safetensors")
    assert str(tmp_path / "s.safetensors") in str(info.value)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- a real MemoryModel
@torch.no_grad()
def test_a_memory_models_states_restart_bit_identically(tmp_path):
    """(Its time alone is importing transformers, once per session: test_hf.py imports it too.)"""
    transformers = pytest.importorskip("transformers")
    from memgpt.integrations.hf import MemoryModel

    def build(seed: int = 0, **kw) -> MemoryModel:
        torch.manual_seed(seed)
        config = transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0
        )
        return MemoryModel(transformers.GPT2LMHeadModel(config).eval(), after=[0, 2], capacity=4, heads=2, **kw).eval()

    mm = build(eviction="usage")
    ids = torch.randint(0, 64, (B, 12), generator=torch.Generator().manual_seed(3))
    head = mm(ids[:, :8])
    expected = mm(ids[:, 8:], memory_state=head.memory_state).logits
    path = tmp_path / "memory.safetensors"
    head.memory_state.save(path, mm)
    loaded = MemoryStates.load(path, mm)
    assert_same(head.memory_state, loaded)
    assert torch.equal(mm(ids[:, 8:], memory_state=loaded).logits, expected)
    with pytest.raises(ValueError, match="eviction expected 'fifo' \\(the layer\\), got 'usage' \\(the file\\)"):
        MemoryStates.load(path, build())

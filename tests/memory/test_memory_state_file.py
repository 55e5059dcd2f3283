"""MemoryState.save / load (memgpt/memory/state.py on memgpt/memory/tensor_file.py): one store in a
safetensors file with a checked JSON header; every bad file is a ValueError naming the file.

The contract, as for MemGPTState files: a load returns a new, fully checked store or raises
(ValueError, or FileNotFoundError for a missing file); nothing is half-loaded, no file runs code.
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

import memgpt
from memgpt.memory import MemoryState, write
from memgpt.memory.tensor_file import METADATA_KEY, digest

B, H, M, D = 2, 2, 4, 16  # batch, heads, capacity, layer width (dk = dv = D // H = 8)


def make_layer(**kw) -> memgpt.MemoryLayer:
    torch.manual_seed(0)
    return memgpt.MemoryLayer(D, **(dict(heads=H, capacity=M, eviction="usage") | kw))


def fields(state: MemoryState) -> dict[str, torch.Tensor]:
    return state.to_dict()


def assert_same(a: MemoryState, b: MemoryState) -> None:
    fa, fb = fields(a), fields(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].dtype == fb[name].dtype and torch.equal(fa[name], fb[name]), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(layer, store, path, bytes): a store after more writes than capacity, saved with its layer."""
    layer = make_layer()
    with torch.no_grad():
        _, state = layer(torch.randn(B, 7, D, generator=torch.Generator().manual_seed(1)))
    path = tmp_path_factory.mktemp("memory") / "store.safetensors"
    state.save(path, layer)
    return layer, state, path, path.read_bytes()


def rewrite(src, dst, *, header=None, tensors=None, metadata=None):
    """Copy a file with its header / tensors changed (the digest is NOT recomputed)."""
    with safe_open(str(src), "pt") as f:
        h = json.loads(f.metadata()[METADATA_KEY])
        t = {k: f.get_tensor(k) for k in f.keys()}
    h = header(h) if header else h
    t = tensors(t) if tensors else t
    save_file(t, str(dst), metadata=metadata if metadata is not None else {METADATA_KEY: json.dumps(h)})
    return dst


def redigest(path):
    """Recompute the digest in place: a crafted file that passes the integrity check."""
    with safe_open(str(path), "pt") as f:
        h = json.loads(f.metadata()[METADATA_KEY])
        t = {k: f.get_tensor(k) for k in f.keys()}
    h["sha256"] = digest(h, t)
    save_file(t, str(path), metadata={METADATA_KEY: json.dumps(h)})
    return path


# ---------------------------------------------------------------- round trip and header
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_exact_and_continues_identically(tmp_path, dtype):
    layer = make_layer().to(dtype)
    x = torch.randn(B, 13, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[1, 3:] = False  # row 1 wrote fewer tokens
    _, head = layer(x[:, :6], mask=mask)
    path = tmp_path / "m.safetensors"
    head.save(path, layer)
    loaded = MemoryState.load(path, layer)
    assert_same(head, loaded)
    assert loaded.dtype == dtype and loaded is not head
    # continuing from the loaded store is continuing from the original, bit for bit
    y_a, s_a = layer(x[:, 6:], head)
    y_b, s_b = layer(x[:, 6:], loaded)
    assert torch.equal(y_a, y_b)
    assert_same(s_a, s_b)
    # and so are the bare ops: a read, then a write
    q = torch.randn(B, H, 3, 8, dtype=dtype)
    assert torch.equal(memgpt.memory.read(q, head, top_k=2), memgpt.memory.read(q, loaded, top_k=2))
    k, v, g = torch.randn(B, H, 5, 8, dtype=dtype), torch.randn(B, H, 5, 8, dtype=dtype), torch.rand(B, H, 5)
    assert_same(write(head, k, v, g, eviction="strength"), write(loaded, k, v, g, eviction="strength"))
    assert_same(MemoryState.load(path), loaded)  # the layer only adds checks


def test_header_records_shapes_dtype_settings_and_version(saved):
    import memgpt.memory.state as state_module

    _, _, path, _ = saved
    with safe_open(str(path), "pt") as f:
        h = json.loads(f.metadata()[METADATA_KEY])
    assert h["format"] == "memgpt.MemoryState" == state_module.MEMORY_STATE_FORMAT
    assert h["format_version"] == 1 == state_module.MEMORY_STATE_VERSION
    assert h["library_version"] == memgpt.__version__ and len(h["sha256"]) == 64
    assert (h["batch_size"], h["heads"], h["capacity"], h["key_dim"], h["value_dim"]) == (B, H, M, 8, 8)
    assert h["dtype"] == "float32"
    assert h["layer"] == {"eviction": "usage", "usage_decay": make_layer().usage_decay, "shift_keys": False}


def test_without_a_layer_the_header_has_no_settings_and_any_fitting_layer_loads_it(tmp_path, saved):
    _, state, _, _ = saved
    path = tmp_path / "bare.safetensors"
    state.save(path)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["layer"] is None
    assert_same(MemoryState.load(path, make_layer(eviction="fifo")), state)


def test_wrapped_layers_give_their_memory_layers_settings(tmp_path, saved):
    """A ResidualMemory or WithMemory around a MemoryLayer checks as that layer."""
    layer, state, path, _ = saved
    wrapped = memgpt.integrations.WithMemory(torch.nn.Identity(), layer)
    assert_same(MemoryState.load(path, wrapped), state)
    assert_same(MemoryState.load(path, wrapped.memory), state)
    other = memgpt.integrations.WithMemory(torch.nn.Identity(), make_layer(eviction="strength"))
    with pytest.raises(ValueError, match="eviction expected 'strength' \\(the layer\\), got 'usage' \\(the file\\)"):
        MemoryState.load(path, other)


def test_map_location_and_the_layers_device(saved):
    layer, _, path, _ = saved
    assert MemoryState.load(path).device.type == "cpu"
    assert MemoryState.load(path, layer).device == next(layer.parameters()).device
    assert MemoryState.load(path, layer, map_location="meta").device.type == "meta"


def test_a_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "exploit.safetensors"
    bad.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MemoryState.load(bad)
    assert not marker.exists()


def test_torch_save_is_not_the_way(tmp_path, saved):
    """Why the docs say save(), not torch.save: torch.load's default (weights_only=True) refuses the
    pickled class, and allowing it means trusting the file to run code, with nothing checked."""
    _, state, _, _ = saved
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------- bad files
def bad_files(tmp_path, path, data):
    """name -> (file, message regex): each must raise ValueError with that message."""
    out = {}

    def put(name, payload):
        (tmp_path / name).write_bytes(payload)
        return tmp_path / name

    noise = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0))
    out["random"] = put("random", bytes(noise.tolist()))
    out["empty"] = put("empty", b"")
    out["truncated"] = put("truncated", data[: len(data) // 2])
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign"))
    out["foreign"] = tmp_path / "foreign"
    out["bad_json"] = rewrite(path, tmp_path / "bad_json", metadata={METADATA_KEY: "[not json"})

    def header(name, change):
        out[name] = rewrite(path, tmp_path / name, header=change)

    def tensors(name, change, *, redigested=False):
        out[name] = rewrite(path, tmp_path / name, tensors=change)
        if redigested:  # a crafted file that passes the integrity check
            redigest(out[name])

    header("other_format", lambda h: h | {"format": "memgpt.MemGPTState"})
    header("future_version", lambda h: h | {"format_version": 2})
    header("bool_version", lambda h: h | {"format_version": True})
    header("no_batch", lambda h: {k: v for k, v in h.items() if k != "batch_size"})
    header("zero_heads", lambda h: h | {"heads": 0})
    header("dtype_name", lambda h: h | {"dtype": "int8"})
    header("no_layer", lambda h: {k: v for k, v in h.items() if k != "layer"})
    header("bad_layer", lambda h: h | {"layer": {"eviction": "usage"}})
    header("bad_decay", lambda h: h | {"layer": h["layer"] | {"usage_decay": 2.0}})
    header("heads_edited", lambda h: h | {"heads": 1})  # the tensors no longer fit the header
    header("policy_edited", lambda h: h | {"layer": h["layer"] | {"eviction": "fifo"}})
    tensors("missing", lambda t: {k: v for k, v in t.items() if k != "usage"})
    tensors("extra", lambda t: t | {"age": torch.zeros(1)})
    tensors("wrong_dtype", lambda t: t | {"valid": t["valid"].float()})
    tensors("wrong_step_dtype", lambda t: t | {"step": t["step"].int()})
    tensors("wrong_shape", lambda t: t | {"count": torch.zeros(3, dtype=torch.long)})
    flipped = bytearray(data)
    flipped[-3] ^= 0x10  # inside the last tensor's bytes
    out["flipped_data"] = put("flipped_data", bytes(flipped))
    tensors("nan_usage", lambda t: t | {"usage": t["usage"] * float("nan")}, redigested=True)
    tensors("inf_strength", lambda t: t | {"strength": t["strength"] + float("inf")}, redigested=True)
    tensors("negative_usage", lambda t: t | {"usage": t["usage"] - 10}, redigested=True)
    tensors("negative_count", lambda t: t | {"count": -t["count"] - 1}, redigested=True)
    tensors("negative_step", lambda t: t | {"step": t["step"] - 100}, redigested=True)
    two = torch.full((B, H, M), 2, dtype=torch.uint8).view(torch.bool)
    tensors("valid_byte", lambda t: t | {"valid": two}, redigested=True)
    messages = {
        "random": "not a readable safetensors file",
        "empty": "not a readable safetensors file",
        "truncated": "not a readable safetensors file",
        "foreign": "is not a memgpt state file: no 'memgpt.state' entry",
        "bad_json": "corrupt state header",
        "other_format": "expected format 'memgpt.MemoryState', got 'memgpt.MemGPTState'",
        "future_version": "unsupported state file version: expected 1, got 2",
        "bool_version": "unsupported state file version: expected 1, got True",
        "no_batch": "header field 'batch_size' must be int, got None",
        "zero_heads": "heads must be >= 1, got 0",
        "dtype_name": "dtype expected one of .*, got 'int8'",
        "no_layer": "header field 'layer' expected None or the layer's eviction settings, got none",
        "bad_layer": r"header field 'layer' expected None or keys \['eviction', 'shift_keys', 'usage_decay'\]",
        "bad_decay": r"usage_decay expected a float in \[0, 1\], got 2.0",
        "heads_edited": r"tensor 'keys' expected torch.float32 \(2, 1, 4, 8\), got torch.float32 \(2, 2, 4, 8\)",
        "policy_edited": "corrupt state file: SHA-256",
        "missing": r"missing \['usage'\], unexpected \[\]",
        "extra": r"missing \[\], unexpected \['age'\]",
        "wrong_dtype": r"tensor 'valid' expected torch.bool \(2, 2, 4\), got torch.float32 \(2, 2, 4\)",
        "wrong_step_dtype": r"tensor 'step' expected torch.int64 \(2, 2, 4\), got I32 \(2, 2, 4\)",
        "wrong_shape": r"tensor 'count' expected torch.int64 \(2,\), got torch.int64 \(3,\)",
        "flipped_data": "corrupt state file: SHA-256",
        "nan_usage": r"tensor 'usage' expected finite values in \[0, inf\], got nan",
        "inf_strength": r"tensor 'strength' expected finite values in \[-inf, inf\], got inf",
        "negative_usage": r"tensor 'usage' expected finite values in \[0, inf\], got -",
        "negative_count": r"tensor 'count' expected values in \[0, inf\], got -",
        "negative_step": r"tensor 'step' expected values in \[0, inf\], got -",
        "valid_byte": r"tensor 'valid' expected values in \[0, 1\], got 2",
    }
    assert messages.keys() == out.keys()
    return {name: (out[name], messages[name]) for name in out}


def test_bad_files_raise_value_error_naming_the_file(tmp_path, saved):
    layer, _, path, data = saved
    for name, (file, message) in bad_files(tmp_path, path, data).items():
        for lay in (None, layer):
            with pytest.raises(ValueError, match=message) as info:
                MemoryState.load(file, lay)
            assert repr(str(file)) in str(info.value), name
    with pytest.raises(FileNotFoundError, match="absent"):
        MemoryState.load(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MemoryState.load(tmp_path)  # a folder


def test_a_flipped_byte_is_an_error_or_changes_nothing(tmp_path, saved):
    """No single-byte corruption is ever loaded as a different store."""
    _, state, _, data = saved
    bad = tmp_path / "flip.safetensors"
    loaded = errors = 0
    for i in range(0, len(data), max(1, len(data) // 150)):
        flipped = bytearray(data)
        flipped[i] ^= 0x5A
        bad.write_bytes(bytes(flipped))
        try:
            other = MemoryState.load(bad)
        except ValueError:
            errors += 1
        else:
            assert_same(other, state)  # e.g. a flip in the header's padding spaces
            loaded += 1
    assert errors > 0.9 * (errors + loaded), (errors, loaded)


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(capacity=8), "capacity expected 8 \\(the layer\\), got 4 \\(the file\\)"),
        (dict(heads=1), "heads expected 1 \\(the layer\\), got 2 \\(the file\\)"),
        (dict(key_dim=4), "key_dim expected 4 \\(the layer\\), got 8 \\(the file\\)"),
        (dict(value_dim=5), "value_dim expected 5 \\(the layer\\), got 8 \\(the file\\)"),
        (dict(eviction="fifo"), "eviction expected 'fifo' \\(the layer\\), got 'usage' \\(the file\\)"),
        (dict(usage_decay=0.5), "usage_decay expected 0.5 \\(the layer\\), got 0.9"),
        (dict(shift_keys=True), "shift_keys expected True \\(the layer\\), got False \\(the file\\)"),
    ],
)
def test_another_layers_store_is_rejected(saved, other, message):
    _, _, path, _ = saved
    with pytest.raises(ValueError, match="was saved for another layer: " + message) as info:
        MemoryState.load(path, make_layer(**other))
    assert repr(str(path)) in str(info.value)


def test_a_wrong_layer_argument_is_a_type_error(saved):
    _, _, path, _ = saved
    with pytest.raises(TypeError, match="layer must be a MemoryLayer .*, got str"):
        MemoryState.load(path, "fifo")


# ---------------------------------------------------------------- saving
def test_save_checks_the_store_against_the_layer(tmp_path, saved):
    _, state, _, _ = saved
    with pytest.raises(ValueError, match="does not fit the layer: capacity expected 8 \\(the layer\\), got 4"):
        state.save(tmp_path / "x.safetensors", make_layer(capacity=8))
    with pytest.raises(TypeError, match="layer must be a MemoryLayer"):
        state.save(tmp_path / "x.safetensors", torch.nn.Linear(2, 2))
    assert os.listdir(tmp_path) == []


def test_save_refuses_values_no_load_would_accept(tmp_path, saved):
    _, state, _, _ = saved
    with pytest.raises(ValueError, match="store to save in .*'usage' expected finite values in \\[0, inf\\], got nan"):
        state.replace(usage=state.usage * float("nan")).save(tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_a_donated_store_cannot_be_saved(tmp_path, saved):
    layer, state, _, _ = saved
    with torch.no_grad():
        donor = state.clone()
        k, v = torch.randn(B, H, 3, 8), torch.randn(B, H, 3, 8)
        newer = write(donor, k, v, torch.rand(B, H, 3), inplace=True)
    newer.save(tmp_path / "newer.safetensors", layer)  # the state the write returned saves
    os.remove(tmp_path / "newer.safetensors")
    with pytest.raises(RuntimeError, match="donated"):
        donor.save(tmp_path / "s.safetensors", layer)
    assert os.listdir(tmp_path) == []


def test_saving_a_graph_store_detaches_it(tmp_path):
    layer = make_layer()
    _, state = layer(torch.randn(B, 5, D))
    assert state.keys.requires_grad
    state.save(tmp_path / "s.safetensors", layer)
    loaded = MemoryState.load(tmp_path / "s.safetensors", layer)
    assert not loaded.keys.requires_grad
    assert_same(loaded, state.detach())


def test_save_is_atomic(tmp_path, saved, monkeypatch):
    """A save that dies mid-write leaves the previous file intact and no temporary file."""
    layer, state, _, _ = saved
    path = tmp_path / "s.safetensors"
    state.save(path, layer)
    before = path.read_bytes()

    def dies(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", dies)
    with pytest.raises(OSError, match="disk full"):
        MemoryState.empty(B, H, M, 8, 8).save(path, layer)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.safetensors"]


def test_an_unwritable_place_is_an_os_error_naming_the_path(tmp_path, saved, monkeypatch):
    _, state, _, _ = saved
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    target = blocker / "s.safetensors"  # its folder is a file
    with pytest.raises(NotADirectoryError) as info:
        state.save(target)
    assert str(target) in str(info.value)

    # safetensors reports a permission error as its own error type, naming only its temporary file
    def denied(tensors, filename, metadata=None):
        raise SafetensorError(
            f'Error while serializing: I/O error: Permission denied (os error 13) at path "{filename}"'
        )

    monkeypatch.setattr("safetensors.torch.save_file", denied)
    target = tmp_path / "s.safetensors"
    with pytest.raises(PermissionError) as info:
        state.save(target)
    assert info.value.filename == str(target) and str(target) in str(info.value)
    assert os.listdir(tmp_path) == ["a-file"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_permission_error_naming_the_path(tmp_path, saved):
    _, state, _, _ = saved
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as info:
            state.save(folder / "s.safetensors")
        assert str(folder / "s.safetensors") in str(info.value)
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)

"""State files (memgpt/models/state_file.py): safetensors + JSON header; every bad file is a ValueError.

The contract: a load either returns a new, fully checked state or raises (ValueError, or
FileNotFoundError for a missing file); nothing is ever half-loaded, and no file can run code.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import memgpt.models.state_file as state_file
from memgpt import MemGPTConfig, MemGPTModel, MemGPTState
from memgpt.models.state_file import METADATA_KEY, read_header, state_config, state_spec

V, T = 37, 5
BASE = dict(vocab_size=V, dim=16, depth=2, heads=2, segment_len=T, memory_capacity=4)


def make_model(seed: int = 0, **kw) -> MemGPTModel:
    torch.manual_seed(seed)
    return MemGPTModel(MemGPTConfig(**(BASE | kw))).eval()


def ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, state, path, bytes) of a state saved mid-segment, after more writes than capacity."""
    model = make_model(memory_heads=2, eviction="usage")
    with torch.no_grad():
        state = model(ids(2, 17)).state
    path = tmp_path_factory.mktemp("state") / "good.safetensors"
    state.save(path, model)
    return model, state, path, path.read_bytes()


def assert_same_state(a: MemGPTState, b: MemGPTState) -> None:
    fa, fb = a._flat(), b._flat()
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].dtype == fb[name].dtype and torch.equal(fa[name], fb[name]), name


def rewrite(src, dst, *, header=None, tensors=None, metadata=None):
    """Copy a state file with its header / tensors changed (the digest is NOT recomputed)."""
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
    h["sha256"] = state_file._digest(h, t)
    save_file(t, str(path), metadata={METADATA_KEY: json.dumps(h)})
    return path


# ---------------------------------------------------------------- round trip and header
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_round_trip_is_exact_and_continues_identically(tmp_path, dtype, device):
    model = make_model(memory_heads=2, eviction="strength").to(device, dtype)
    x = ids(2, 23, seed=1).to(device)
    head = model(x[:, :13])  # 2 segments written, a partial third one in the buffer
    expected = model(x[:, 13:], head.state).logits
    path = tmp_path / "s.safetensors"
    head.state.save(path, model)
    loaded = MemGPTState.load(path, model)
    assert_same_state(head.state, loaded)
    assert torch.equal(model(x[:, 13:], loaded).logits, expected)
    assert loaded.position.device == model.token_emb.weight.device  # the model's device by default
    assert_same_state(MemGPTState.load(path, map_location=device), loaded)  # the model only adds checks
    assert_same_state(MemGPTState.load(path, model.config, map_location=device), loaded)


def test_header_records_shapes_dtype_capacity_policy_and_version(saved):
    model, state, path, _ = saved
    import memgpt

    h = read_header(path)
    assert h["format"] == "memgpt.MemGPTState" and h["format_version"] == 2
    assert h["library_version"] == memgpt.__version__
    assert h["batch_size"] == 2 and h["dtype"] == "float32"
    assert h["config"]["eviction"] == "usage" and h["config"]["memory_capacity"] == 4
    assert h["layers"] == [[2, 4, 8, 8], [2, 4, 8, 8]]  # per layer: heads, capacity, dk, dv
    assert len(h["sha256"]) == 64


@pytest.mark.parametrize(
    "kw", [dict(), dict(memory_heads=2, key_dim=3, value_dim=5), dict(heads=4, segment_len=3, depth=3)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_spec_is_the_layout_of_empty_state(kw, dtype):
    model = make_model(**kw)
    empty = model.empty_state(3, device="meta", dtype=dtype)
    layout = {k: (tuple(t.shape), t.dtype) for k, t in empty._flat().items()}
    assert layout == state_spec(state_config(model.config), 3, dtype)


def test_a_file_cannot_run_code(tmp_path, saved):
    """A pickle that would run code, renamed to .safetensors, is refused without being unpickled."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "exploit.safetensors"
    bad.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MemGPTState.load(bad, saved[0])
    assert not marker.exists()


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
    out["truncated_tail"] = put("truncated_tail", data[:-1])
    torch.save({"tensors": {"position": torch.zeros(2)}}, tmp_path / "pickle.safetensors")
    out["pickle"] = tmp_path / "pickle.safetensors"
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign"))
    out["foreign"] = tmp_path / "foreign"
    out["bad_json"] = rewrite(path, tmp_path / "bad_json", metadata={METADATA_KEY: "{not json"})

    def header(name, change):
        out[name] = rewrite(path, tmp_path / name, header=change)

    def tensors(name, change, *, redigested=False):
        out[name] = rewrite(path, tmp_path / name, tensors=change)
        if redigested:  # a crafted file that passes the integrity check
            redigest(out[name])

    header("version", lambda h: h | {"format_version": 99})
    header("format", lambda h: h | {"format": "other"})
    header("no_batch", lambda h: {k: v for k, v in h.items() if k != "batch_size"})
    header("dtype_name", lambda h: h | {"dtype": "int8"})
    header("policy", lambda h: h | {"config": h["config"] | {"eviction": "lru"}})
    header("layers", lambda h: h | {"layers": h["layers"][:1]})
    header("decay_edited", lambda h: h | {"config": h["config"] | {"usage_decay": 0.5}})
    tensors("missing", lambda t: {k: v for k, v in t.items() if k != "layers.1.memory.keys"})
    tensors("extra", lambda t: t | {"layers.2.memory.keys": torch.zeros(1)})
    tensors("wrong_dtype", lambda t: t | {"layers.0.memory.valid": t["layers.0.memory.valid"].float()})
    tensors("wrong_shape", lambda t: t | {"position": torch.zeros(3, dtype=torch.long)})
    flipped = bytearray(data)
    flipped[-3] ^= 0x10  # inside the last tensor's bytes
    out["flipped_data"] = put("flipped_data", bytes(flipped))
    count = "layers.0.memory.count"
    tensors("negative_count", lambda t: t | {count: -t[count] - 1}, redigested=True)
    tensors("previous_oov", lambda t: t | {"previous": t["previous"] + V + 1}, redigested=True)
    gate = "layers.1.memory.strength"
    tensors("nan_gate", lambda t: t | {gate: t[gate] * float("nan")}, redigested=True)
    messages = {
        "random": "not a readable safetensors file",
        "empty": "not a readable safetensors file",
        "truncated": "not a readable safetensors file",
        "truncated_tail": "not a readable safetensors file",
        "pickle": "not a readable safetensors file",
        "foreign": "is not a memgpt state file: no 'memgpt.state' entry",
        "bad_json": "corrupt state header",
        "version": "unsupported state file version: expected 2, got 99",
        "format": "expected format 'memgpt.MemGPTState', got 'other'",
        "no_batch": "header field 'batch_size' must be int, got None",
        "dtype_name": "dtype expected one of .*, got 'int8'",
        "policy": "invalid model settings in the header: .*lru",
        "layers": r"layer memory shapes expected 2 x \(heads, capacity, dk, dv\) = \[2, 4, 8, 8\]",
        "decay_edited": "corrupt state file: SHA-256",
        "missing": r"missing \['layers.1.memory.keys'\], unexpected \[\]",
        "extra": r"missing \[\], unexpected \['layers.2.memory.keys'\]",
        "wrong_dtype": r"tensor 'layers.0.memory.valid' expected torch.bool \(2, 2, 4\), got torch.float32 \(2, 2, 4\)",
        "wrong_shape": r"tensor 'position' expected torch.int64 \(2,\), got torch.int64 \(3,\)",
        "flipped_data": "corrupt state file: SHA-256",
        "negative_count": r"'layers.0.memory.count' expected values in \[0, inf\], got -",
        "previous_oov": r"'previous' expected values in \[0, 37\], got",
        "nan_gate": r"'layers.1.memory.strength' expected values in \[0, 1\], got nan",
    }
    assert messages.keys() == out.keys()
    return {name: (out[name], messages[name]) for name in out}


def test_bad_files_raise_value_error_naming_the_file(tmp_path, saved):
    model, _, path, data = saved
    for name, (file, message) in bad_files(tmp_path, path, data).items():
        for m in (None, model):
            with pytest.raises(ValueError, match=message) as info:
                MemGPTState.load(file, m)
            assert repr(str(file)) in str(info.value), name
    with pytest.raises(FileNotFoundError, match="absent"):
        MemGPTState.load(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MemGPTState.load(tmp_path)  # a folder


def test_every_flipped_byte_is_an_error_or_changes_nothing(tmp_path, saved):
    """No single-byte corruption is ever loaded as a different state."""
    _, state, _, data = saved
    bad = tmp_path / "flip.safetensors"
    loaded = errors = 0
    for i in range(0, len(data), max(1, len(data) // 400)):
        flipped = bytearray(data)
        flipped[i] ^= 0x5A
        bad.write_bytes(bytes(flipped))
        try:
            other = MemGPTState.load(bad)
        except ValueError:
            errors += 1
        else:
            assert_same_state(other, state)  # e.g. a flip in the header's padding spaces
            loaded += 1
    assert errors > 0.9 * (errors + loaded), (errors, loaded)


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(depth=3), "depth expected 3 \\(the model\\), got 2 \\(the file\\)"),
        (dict(memory_capacity=8), "memory_capacity expected 8 \\(the model\\), got 4"),
        (dict(eviction="fifo"), "eviction expected 'fifo' \\(the model\\), got 'usage'"),
        (dict(segment_len=6), "segment_len expected 6"),
        (dict(memory_heads=1), "memory_heads expected 1"),
        (dict(vocab_size=40), "vocab_size expected 40"),
        (dict(usage_decay=0.5), "usage_decay expected 0.5"),
    ],
)
def test_another_models_state_is_rejected(saved, other, message):
    _, _, path, _ = saved
    model = make_model(**(dict(memory_heads=2, eviction="usage") | other))
    with pytest.raises(ValueError, match="was saved for another model: " + message):
        MemGPTState.load(path, model)
    with pytest.raises(ValueError, match="was saved for another model: " + message):
        MemGPTState.load(path, model.config)


def test_shift_keys_is_checked_and_older_files_without_it_load(tmp_path, saved):
    """shift_keys changes what stored keys mean; a file from before the setting existed has none
    and was written without it."""
    model, state, path, _ = saved
    shifted = make_model(memory_heads=2, eviction="usage", shift_keys=True)
    with pytest.raises(
        ValueError, match="was saved for another model: shift_keys expected True \\(the model\\), got False"
    ):
        MemGPTState.load(path, shifted)

    def drop(h):
        del h["config"]["shift_keys"]
        return h

    older = redigest(rewrite(path, tmp_path / "older.safetensors", header=drop))
    assert_same_state(MemGPTState.load(older, model), state)
    with pytest.raises(ValueError, match="shift_keys expected True"):
        MemGPTState.load(older, shifted)


def test_model_dtype_and_device_are_checked(saved):
    model, _, path, _ = saved
    double = make_model(memory_heads=2, eviction="usage").double()
    with pytest.raises(ValueError, match="holds a torch.float32 state, the model computes in torch.float64"):
        MemGPTState.load(path, double)
    assert MemGPTState.load(path, model, map_location="meta").position.device.type == "meta"


# ---------------------------------------------------------------- saving
def test_save_checks_the_state_against_the_model(tmp_path, saved):
    _, state, _, _ = saved
    message = "made for another model.*'layers.0.memory.keys' expected torch.float32 \\(2, 1, 4, 16\\)"
    with pytest.raises(ValueError, match=message):
        state.save(tmp_path / "x.safetensors", make_model(memory_heads=1, eviction="usage"))
    with pytest.raises(TypeError, match="model must be a MemGPTModel or a MemGPTConfig, got str"):
        state.save(tmp_path / "x.safetensors", "fifo")
    assert os.listdir(tmp_path) == []


def test_a_donated_state_cannot_be_saved(tmp_path):
    """A state given to an in-place forward now holds later contents: saving it must refuse."""
    model = make_model()
    with torch.no_grad():
        state = model(ids(2, 12)).state
        model(ids(2, 5, seed=1), state, donate_state=True)
    with pytest.raises(RuntimeError, match="donated"):
        state.save(tmp_path / "s.safetensors", model)
    assert os.listdir(tmp_path) == []


def test_save_is_atomic(tmp_path, saved, monkeypatch):
    """A save that dies mid-write leaves the previous file intact and no temporary file."""
    model, state, _, _ = saved
    path = tmp_path / "s.safetensors"
    state.save(path, model)
    before = path.read_bytes()
    with torch.no_grad():
        newer = model(ids(2, 4, seed=9), state).state

    def dies(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", dies)
    with pytest.raises(OSError, match="disk full"):
        newer.save(path, model)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.safetensors"]
    monkeypatch.undo()
    newer.save(path, model)  # overwrites
    assert_same_state(MemGPTState.load(path, model), newer)
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_saving_a_graph_state_detaches_it(tmp_path):
    model = make_model()
    state = model(ids(2, 12)).state
    assert state.layers[0].memory.keys.requires_grad
    state.save(tmp_path / "s.safetensors", model)
    assert not MemGPTState.load(tmp_path / "s.safetensors", model).layers[0].memory.keys.requires_grad


# ---------------------------------------------------------------- across processes
_PROCESS_A = """
import sys, torch
torch.set_num_threads(1)
from safetensors.torch import save_model
from memgpt import MemGPTConfig, MemGPTModel
torch.manual_seed(0)
model = MemGPTModel(MemGPTConfig(**{config})).eval()
ids = torch.load(sys.argv[1] + "/ids.pt")
with torch.no_grad():
    out = model(ids[:, :{split}])
save_model(model, sys.argv[1] + "/model.safetensors")
out.state.save(sys.argv[1] + "/state.safetensors", model)
"""

_PROCESS_B = """
import sys, torch
torch.set_num_threads(1)
from safetensors.torch import load_model, save_file
from memgpt import MemGPTConfig, MemGPTModel, MemGPTState
torch.manual_seed(123)  # other weights until the file is loaded
model = MemGPTModel(MemGPTConfig(**{config})).eval()
load_model(model, sys.argv[1] + "/model.safetensors")
state = MemGPTState.load(sys.argv[1] + "/state.safetensors", model)
ids = torch.load(sys.argv[1] + "/ids.pt")
with torch.no_grad():
    logits = model(ids[:, {split}:], state).logits
save_file({{"logits": logits}}, sys.argv[1] + "/logits.safetensors")
"""


def test_restart_in_a_fresh_process_is_bit_identical(tmp_path):
    """Process A runs 3 segments (and 2 tokens) and saves; a new process B loads and continues;
    B's logits equal, bit for bit, those of the same calls without the restart."""
    config = BASE | dict(memory_heads=2, eviction="usage", top_k=2)
    split = 3 * T + 2
    x = ids(2, 6 * T + 1, seed=7)
    torch.save(x, tmp_path / "ids.pt")
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for code in (_PROCESS_A, _PROCESS_B):
        script = textwrap.dedent(code).format(config=repr(config), split=split)
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = MemGPTModel(MemGPTConfig(**config)).eval()
        with torch.no_grad():
            head = model(x[:, :split])
            expected = model(x[:, split:], head.state).logits
    finally:
        torch.set_num_threads(threads)
    with safe_open(str(tmp_path / "logits.safetensors"), "pt") as f:
        resumed = f.get_tensor("logits")
    assert torch.equal(resumed, expected)

"""The stdlib corpus: file selection, split rule, manifest, and the character vocabulary."""

from __future__ import annotations

import hashlib

import pytest
import torch

from memgpt.tasks.stdlib_text import EXCLUDED_DIRS, CharVocab, StdlibCorpus, list_stdlib_files, split_of


def make_tree(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


TREE = {
    "os.py": b"import sys\n",
    "json/decoder.py": b"def f():\n\treturn 1\n",
    "email/mime/text.py": b"x = 'caf\xc3\xa9'\n",
    "a.txt": b"not python\n",
    "test/test_os.py": b"excluded\n",
    "ctypes/test/test_x.py": b"excluded\n",
    "idlelib/idle_test/t.py": b"excluded\n",
    "site-packages/pkg/m.py": b"excluded\n",
    "tkinter/__init__.py": b"excluded\n",
    "lib2to3/x.py": b"excluded\n",
    "__pycache__/os.py": b"excluded\n",
}


def test_file_selection_sorted_and_excluding(tmp_path):
    make_tree(tmp_path, TREE)
    assert list_stdlib_files(tmp_path) == ["email/mime/text.py", "json/decoder.py", "os.py"]
    with pytest.raises(ValueError, match="not a folder"):
        list_stdlib_files(tmp_path / "missing")


def test_split_rule_is_sha1_of_the_relative_path():
    for rel in ("os.py", "json/decoder.py", "asyncio/base_events.py", "x/y/z.py"):
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10
        assert split_of(rel) == {0: "test", 1: "validation"}.get(bucket, "train")


def test_split_is_deterministic_and_partitions(tmp_path):
    make_tree(tmp_path, {f"m{i}.py": b"pass\n" for i in range(60)})
    a, b = StdlibCorpus.scan(tmp_path), StdlibCorpus.scan(tmp_path)
    assert a.files == b.files
    every = sorted(r for files in a.files.values() for r in files)
    assert every == list_stdlib_files(tmp_path)  # each file in exactly one split
    for split, files in a.files.items():
        assert list(files) == sorted(files) and all(split_of(r) == split for r in files)
    assert all(a.files[s] for s in ("train", "validation", "test"))  # 60 paths hit all three


def test_manifest_names_every_file_and_its_hash(tmp_path):
    make_tree(tmp_path, TREE)
    m = StdlibCorpus.scan(tmp_path).manifest()
    assert m["python"] and m["root"] == str(tmp_path) and "test" in m["excluded_dirs"]
    assert [e["path"] for e in m["files"]] == ["email/mime/text.py", "json/decoder.py", "os.py"]
    for e in m["files"]:
        data = TREE[e["path"]]
        assert e["sha256"] == hashlib.sha256(data).hexdigest() and e["bytes"] == len(data)
        assert e["split"] == split_of(e["path"])
    assert sum(m["counts"].values()) == 3


def test_running_stdlib_has_every_split_and_no_excluded_folder():
    corpus = StdlibCorpus.scan()
    assert all(len(corpus.files[s]) >= 10 for s in ("train", "validation", "test"))
    for files in corpus.files.values():
        for rel in files:
            assert not set(rel.split("/")[:-1]) & EXCLUDED_DIRS, rel


def test_vocabulary_ids():
    v = CharVocab()
    assert v.size == 98 and v.oov_id == 97
    assert v.encode("\t\n ~a").tolist() == [0, 1, 2, 96, 2 + ord("a") - 32]
    text = "".join(v.chars)
    assert torch.equal(v.encode(text), torch.arange(97, dtype=torch.uint8))
    assert v.decode(v.encode(text)) == text
    with pytest.raises(TypeError, match="expects str"):
        v.encode(b"bytes")


def test_odd_bytes_map_to_oov_and_never_fail():
    v = CharVocab()
    # é (2 bytes) is one OOV id; \r, NUL and DEL are OOV; invalid UTF-8 bytes become OOV too.
    assert v.encode_bytes("café\r\n".encode()).tolist() == [*v.encode("caf").tolist(), 97, 97, 1]
    assert v.encode_bytes(b"\x00\x7f").tolist() == [97, 97]
    ids = v.encode_bytes(b"a\xff\xfeb\x80")
    assert ids[0] == v.encode("a")[0] and ids[-2] == v.encode("b")[0]
    assert set(ids.tolist()) <= set(range(98)) and ids.tolist().count(97) == len(ids) - 2
    assert v.encode("x😀y").tolist() == [v.encode("x")[0], 97, v.encode("y")[0]]  # one id per character


def test_load_reads_files_in_split_order(tmp_path):
    make_tree(tmp_path, TREE)
    corpus = StdlibCorpus.scan(tmp_path)
    for split in ("train", "validation", "test"):
        loaded = corpus.load(split)
        assert [r for r, _ in loaded] == list(corpus.files[split])
        for rel, ids in loaded:
            assert ids.dtype == torch.uint8 and len(ids) == len(TREE[rel].decode())
    with pytest.raises(ValueError, match="unknown split"):
        corpus.load("dev")

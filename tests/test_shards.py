import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import IntegrityError
from pipeline.shards import (
    StreamingWriter,
    atomic_write_text,
    check_shard_filename,
    check_tensor_name,
    load_index,
    read_header,
    sha256_file,
)


def test_streaming_writer_matches_safetensors(tmp_path: Path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b.c": torch.arange(7, dtype=torch.int64),
               "d": torch.randint(0, 255, (4, 9), dtype=torch.uint8)}  # fmt: skip
    plan = [(n, {torch.bfloat16: "BF16", torch.int64: "I64", torch.uint8: "U8"}[t.dtype], tuple(t.shape))
            for n, t in tensors.items()]  # fmt: skip
    size, sha = StreamingWriter(plan, {"format": "pt"}).write(tmp_path / "x.safetensors", iter(tensors.items()))
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    assert size == (tmp_path / "x.safetensors").stat().st_size and sha == sha256_file(tmp_path / "x.safetensors")


def test_writer_refuses_out_of_plan_tensor_and_leaves_no_file(tmp_path: Path):
    w = StreamingWriter([("a", "F32", (2,))], {})
    with pytest.raises(ValueError):
        w.write(tmp_path / "x.safetensors", iter([("b", torch.zeros(2))]))
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_corrupt_headers(tmp_path: Path):
    p = tmp_path / "s.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(p))
    assert read_header(p)[0]["w"].shape == (64, 64)
    raw = p.read_bytes()
    p.write_bytes(raw[:-10])
    with pytest.raises(IntegrityError, match="truncated"):
        read_header(p)
    p.write_bytes(raw[:5])
    with pytest.raises(IntegrityError, match="truncated"):
        read_header(p)


@pytest.mark.parametrize("name", ["../x.safetensors", "a/b.safetensors", "x.bin", ".hidden.safetensors", ""])
def test_unsafe_shard_names(name: str):
    with pytest.raises(IntegrityError, match="unsafe shard file name"):
        check_shard_filename(name)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "a..b", "", "a b", "x."])
def test_unsafe_tensor_names(name: str):
    with pytest.raises(IntegrityError, match="unsafe tensor name"):
        check_tensor_name(name)


def test_index_errors(tmp_path: Path):
    with pytest.raises(IntegrityError, match=r"no model\.safetensors\.index\.json"):
        load_index(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(IntegrityError, match="weight_map"):
        load_index(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    assert load_index(tmp_path) == {"s1.safetensors": ["a"]}


def test_atomic_write_replaces_whole(tmp_path: Path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and [x.name for x in tmp_path.iterdir()] == ["f.txt"]
    assert oct(p.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "dtype must be a string"),
        ({"dtype": {"a": 1}, "shape": [2], "data_offsets": [0, 8]}, "dtype must be a string"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "shape must be a list"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "shape must be a list"),
        ({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}, "shape must be a list"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, "data_offsets must be two"),
        ({"dtype": "F32", "shape": [2], "data_offsets": 8}, "data_offsets must be two"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets end before they start"),
        ("F32", "not an object"),
    ],
)
def test_wrongly_typed_header_fields_are_named(entry: object, says: str, tmp_path: Path):
    import struct

    raw = json.dumps({"w": entry}).encode()
    p = tmp_path / "s.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(IntegrityError, match=f"s.safetensors: corrupt header entry for w: {says}"):
        read_header(p)


def test_metadata_must_map_strings_to_strings(tmp_path: Path):
    import struct

    raw = json.dumps({"__metadata__": {"hlwq": {"nested": 1}}}).encode()
    p = tmp_path / "s.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(IntegrityError, match="__metadata__ must map strings to strings"):
        read_header(p)


def test_allowlist_and_containment(tmp_path: Path):
    import os

    from pipeline.shards import contained_file, is_carried

    assert [n for n in ("config.json", "tokenizer.model", "merges.txt", "LICENSE.txt", "chat_template.jinja",
                        "secrets.env", "tokenizer.pkl", "optimizer.pt", "pytorch_model.bin", ".env", "README.md",
                        "tokenizer_fast.py", "../config.json")
            if is_carried(n)] == ["config.json", "tokenizer.model", "merges.txt", "LICENSE.txt",
                                  "chat_template.jinja"]  # fmt: skip
    snap = tmp_path / "models--o--n" / "snapshots" / "abc"
    blobs = tmp_path / "models--o--n" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "1234").write_text("{}")
    (snap / "config.json").symlink_to("../../blobs/1234")  # the Hugging Face cache layout: allowed
    (tmp_path / "secret").write_text("x")
    (snap / "LICENSE").symlink_to(tmp_path / "secret")
    os.mkfifo(snap / "NOTICE")
    assert contained_file(snap, "config.json") == (blobs / "1234").resolve()
    assert contained_file(snap, "LICENSE") is None and contained_file(snap, "NOTICE") is None
    assert contained_file(snap, "missing") is None


def test_huge_names_are_cut_in_messages():
    for check in (check_shard_filename, check_tensor_name):
        with pytest.raises(IntegrityError) as e:
            check("/" + "x" * 10_000_000)
        assert len(str(e.value)) < 400

"""Hostile safetensors headers: every structural lie is refused at open, naming file and tensors."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mksuite.common.errors import TensorFileError
from mksuite.common.loading import SafetensorsFile


def raw_file(path, header: dict | str | bytes, body: bytes):
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


def f32(offsets, shape=(1,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


def reference_refuses(path) -> bool:
    """Whether the safetensors library itself refuses the file (our checks must be at least as strict)."""
    try:
        load_file(str(path))
    except Exception:
        return True
    return False


CASES = {
    "overlap": ({"a": f32([0, 8], [2]), "b": f32([4, 12], [2])}, 12, "`a` and `b` overlap"),
    "alias": ({"a": f32([0, 4]), "b": f32([0, 4])}, 4, "overlap"),
    "gap": ({"a": f32([0, 4]), "b": f32([8, 12])}, 12, "4 unused bytes in the data section after tensor `a`"),
    "leading gap": ({"a": f32([4, 8])}, 8, "4 unused bytes in the data section before the first tensor"),
    "trailing bytes": ({"a": f32([0, 4])}, 9, "5 bytes after the last tensor `a`"),
    "bytes but no tensors": ({}, 3, "3 bytes but no tensors"),
    "span too short": ({"a": f32([0, 4], [2])}, 4, "= 8 bytes but data_offsets span 4"),
    "float shape": ({"a": f32([0, 4], [1.0])}, 4, "invalid shape"),
    "bool shape": ({"a": f32([0, 4], [True])}, 4, "invalid shape"),
    "negative shape": ({"a": f32([0, 4], [-1, -1])}, 4, "invalid shape"),
    "string shape": ({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, 4, "invalid shape"),
    "missing shape": ({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, 4, "invalid shape"),
    "negative offset": ({"a": f32([-4, 0])}, 4, "invalid data_offsets"),
    "float offset": ({"a": f32([0.0, 4.0])}, 4, "invalid data_offsets"),
    "three offsets": ({"a": f32([0, 4, 8])}, 4, "invalid data_offsets"),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, 16, "unsupported dtype"),
    "lowercase dtype": ({"a": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype"),
    "entry not object": ({"a": [0, 4]}, 4, "entry for `a` is not an object"),
    "metadata not strings": ({"__metadata__": {"k": 1}, "a": f32([0, 4])}, 4, "`__metadata__`"),
    "duplicate name": (f'{{"a": {json.dumps(f32([0, 4]))}, "a": {json.dumps(f32([4, 8]))}}}', 8, "twice"),
    "NaN in header": ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', 4, "non-JSON number NaN"),
    "Infinity in header": ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}', 4, "Infinity"),
    "deep nesting": ("[" * 200_000 + "]" * 200_000, 0, "nested too deeply"),
    "not utf-8": (b'{"\xff": 1}', 0, "not valid JSON"),
    "empty header": (b"", 0, "not valid JSON"),
    "huge shape": ({"a": f32([0, 4], [2**40, 2**40])}, 4, "data_offsets span 4"),
    "huge offsets": ({"a": f32([2**63, 2**63 + 4])}, 4, "truncated: tensor `a`"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_header_is_refused_at_open_naming_file_and_tensor(tmp_path, case):
    header, body_len, fragment = CASES[case]
    path = raw_file(tmp_path / "bad.safetensors", header, bytes(body_len))
    with pytest.raises(TensorFileError) as caught:
        SafetensorsFile(path)
    assert fragment in caught.value.message
    assert str(path) in caught.value.message
    assert caught.value.exit_code == 4


def test_overlapping_tensors_are_refused_even_though_every_span_has_the_right_length(tmp_path):
    # The attack the issue reports: `b` aliases the second half of `a` plus 4 bytes.
    path = raw_file(tmp_path / "alias.safetensors", CASES["overlap"][0], bytes(12))
    assert reference_refuses(path)
    with pytest.raises(TensorFileError, match="overlap"):
        SafetensorsFile(path)


def test_tensors_may_be_stored_out_of_name_order_and_empty_ones_share_an_offset(tmp_path):
    header = {
        "z": f32([0, 8], [2]),
        "a": f32([8, 12]),
        "empty1": {"dtype": "BF16", "shape": [0, 5], "data_offsets": [8, 8]},
        "empty2": {"dtype": "F32", "shape": [3, 0], "data_offsets": [12, 12]},
        "__metadata__": {"format": "pt"},
    }
    body = struct.pack("<3f", 1.0, 2.0, 3.0)
    path = raw_file(tmp_path / "ok.safetensors", header, body)
    assert not reference_refuses(path)
    with SafetensorsFile(path) as source:
        assert source.load("z").tolist() == [1.0, 2.0]
        assert source.load("a").tolist() == [3.0]
        assert source.load("empty1").shape == (0, 5)
        assert source.metadata == {"format": "pt"}


def test_header_padded_with_spaces_as_the_reference_writer_does_is_accepted(tmp_path):
    path = tmp_path / "padded.safetensors"
    save_file({"w": torch.arange(3, dtype=torch.float32)}, str(path))
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len % 8 == 0  # the reference pads; our parser must not mind the spaces
    with SafetensorsFile(path) as source:
        assert source.load("w").tolist() == [0.0, 1.0, 2.0]

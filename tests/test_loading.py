"""The one loading path (estimator.base.loading) and the output-path rule (estimator.base.io): every
input rule named in a ConfigError, no hang, no traceback; outputs never replace what is not a
regular file."""

from __future__ import annotations

import json
import os
import struct

import pytest

from estimator.base.errors import ConfigError
from estimator.base.io import atomic_write_json, atomic_write_text, check_output_dir, check_output_path
from estimator.base.loading import (
    MAX_DEPTH,
    MAX_YAML_ALIASES,
    load_json,
    load_table,
    load_yaml,
    parse_json,
    parse_yaml,
    read_safetensors_header,
    read_text,
)
from tests.conftest import EXAMPLES


def _raises(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    assert match in str(err.value), str(err.value)
    return str(err.value)


# ---- input paths ---------------------------------------------------------------------------


def test_paths_that_are_not_regular_files_are_named(tmp_path):
    _raises(read_text, "", "plan file", match="plan file: the path is empty")
    _raises(read_text, "a\0b", "plan file", match="NUL byte")
    _raises(read_text, tmp_path / "nope.json", "plan file", match="does not exist")
    _raises(read_text, tmp_path, "plan file", match="is a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _raises(read_text, fifo, "plan file", match="not a regular file")  # opening it would block


def test_size_cap_and_utf8_offset(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 100 + "0]")
    _raises(read_text, big, "plan file", max_bytes=50, match="larger than 50 bytes")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: ok\nalgorithm: \xff\xfe\n")
    _raises(read_text, bad, "experiment file", match="byte 0xff at offset 20")


# ---- YAML ----------------------------------------------------------------------------------


def test_yaml_duplicate_key_is_an_error_with_its_line():
    _raises(parse_yaml, "a: 1\nb: 2\na: 3\n", "exp", match="duplicate key 'a' (line 3)")
    _raises(parse_yaml, "m: {x: 1, x: 2}\n", "exp", match="duplicate key 'x'")


def test_yaml_characters_the_reader_refuses_are_named_with_their_position(tmp_path):
    # PyYAML's reader checks every character while the loader is built, before any parsing
    _raises(parse_yaml, "a: 1\nb: x\x00y\n", "exp", match="character '\\x00' (U+0000) at line 2, column 5")
    _raises(parse_yaml, "\x0c", "exp", match="(U+000C) at line 1, column 1")
    _raises(parse_yaml, "a: '\ufffe'", "exp", match="(U+FFFE) at line 1, column 5")
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"algorithm: ppo\nname: a\x00b\n")
    message = _raises(load_yaml, path, "experiment file", match="YAML allows only printable characters")
    assert str(path) in message and "line 2, column 8" in message


def test_a_nul_byte_in_an_experiment_exits_2_naming_file_and_position(tmp_path, capsys):
    from estimator.describe import main

    text = (EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text().replace("seed: 1", "seed: 1\x00")
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    line = text[:text.index("\x00")].count("\n") + 1
    assert err.startswith("error: ") and str(path) in err and f"line {line}, column 8" in err, err
    assert "Traceback" not in err


def test_yaml_alias_bomb_is_refused_fast():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines += ["name: *a8"]
    _raises(parse_yaml, "\n".join(lines), "exp", match="once YAML aliases are expanded")
    many = "a: &a 1\nb: [" + ", ".join(["*a"] * (MAX_YAML_ALIASES + 1)) + "]\n"
    _raises(parse_yaml, many, "exp", match=f"more than {MAX_YAML_ALIASES} YAML aliases")


def test_yaml_deep_nesting_is_refused_before_the_parser_recurses():
    _raises(parse_yaml, "a: " + "[" * 5000 + "]" * 5000, "exp", match=f"nested deeper than {MAX_DEPTH}")
    assert parse_yaml("a: " + "[" * 10 + "]" * 10, "exp") == {"a": [[[[[[[[[[]]]]]]]]]]}


def test_yaml_top_level_type_and_empty_document():
    _raises(parse_yaml, "- 1\n- 2\n", "exp", match="the top level must be a mapping (object), got list")
    assert parse_yaml("", "exp") == {}
    assert parse_yaml("# only a comment\n", "exp") == {}


# ---- JSON ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": 1e400}', "overflows a float"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),  # int() of over 4,300 digits
    ("[" * 100_000 + "]" * 100_000, "nested deeper than"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested deeper than"),
    ("[1, 2]", "the top level must be a mapping (object), got list"),
    ("{", "not valid JSON"),
])
def test_strict_json(text, message):
    _raises(parse_json, text, "plan x.json", match=message)


def test_json_file_and_expected_type(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"calls": {}}))
    assert load_json(path, "plan file") == {"calls": {}}
    assert load_json(path, "plan file", expect=None) == {"calls": {}}
    path.write_text("[]")
    _raises(load_json, path, "plan file", match="plan file")
    assert load_yaml(tmp_path / "p.json", "experiment file", expect=list) == []


# ---- safetensors headers -------------------------------------------------------------------


def test_safetensors_header_checked_without_torch(tmp_path):
    good = tmp_path / "good.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                         "__metadata__": {"format": "pt"}}).encode()
    good.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert read_safetensors_header(good) == {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    _raises(read_safetensors_header, garbage, match="not a safetensors file")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    _raises(read_safetensors_header, short, match="under its 8-byte header")
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)  # data shorter than offsets say
    _raises(read_safetensors_header, past, match="malformed header entry")


# ---- output paths --------------------------------------------------------------------------


def test_output_refuses_directory_fifo_and_missing_parent(tmp_path):
    _raises(check_output_path, tmp_path, "--trace", match="--trace")
    _raises(check_output_path, tmp_path, "--trace", match="is a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _raises(atomic_write_text, fifo, "x", "--trace", match="FIFO, socket or block device")
    assert fifo.is_fifo()  # never replaced
    _raises(check_output_path, tmp_path / "no" / "t.json", "--trace", match="does not exist")
    _raises(check_output_path, "", "--trace", match="the path is empty")
    _raises(check_output_path, "a\0b", "--trace", match="NUL byte")
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_an_output_directory_may_be_missing_but_must_be_creatable(tmp_path):
    assert check_output_dir(tmp_path, "--out") == tmp_path.resolve()
    assert check_output_dir(tmp_path / "a" / "b", "--out") == (tmp_path / "a" / "b").resolve()
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "f").write_text("x")
    _raises(check_output_dir, tmp_path / "f", "--out", match="--out")
    _raises(check_output_dir, tmp_path / "f", "--out", match="is not a directory")
    _raises(check_output_dir, tmp_path / "f" / "sub", "--out", match=f"{str(tmp_path / 'f')!r} is not a directory")
    _raises(check_output_dir, "", "--out", match="the path is empty")
    _raises(check_output_dir, "a\0b", "--out", match="NUL byte")


def test_output_follows_a_symlink_instead_of_replacing_it(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    atomic_write_json(link, {"new": 1})
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text()) == {"new": 1}
    assert check_output_path(link) == real.resolve()


def test_output_writes_a_regular_file_atomically(tmp_path):
    out = atomic_write_text(tmp_path / "t.json", "abc")
    assert out.read_text() == "abc" and not list(tmp_path.glob(".*.tmp"))


def test_tables(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("tp,time_s\n1,0.5\n2,0.25\n")
    assert list(load_table(path, "table", columns=("tp", "time_s"))["time_s"]) == [0.5, 0.25]
    _raises(load_table, path, "table", columns=("nope",), match="missing column(s) ['nope']")
    path.write_text("")
    _raises(load_table, path, "table", match="not a valid CSV table")
    path.write_bytes(b"a,b\n\xff,1\n")
    _raises(load_table, path, "table", match="not UTF-8")

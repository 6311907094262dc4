"""The one loading path: every file the project reads goes through here.

Experiment YAML, plan, profile and timeline JSON, Hugging Face ``config.json``, prompt JSONL,
CSV tables (:func:`load_table`) and safetensors headers are read by the functions below, so
each input rule holds for all of them at once:

- the path is non-empty, has no NUL byte, names an existing **regular** file (a directory,
  FIFO or device is named and refused; a FIFO would block the reader forever);
- at most ``max_bytes`` bytes are read (a larger file is refused, never truncated);
- text is UTF-8, and a bad byte is reported with the file and its offset;
- YAML is parsed strictly: duplicate keys are errors (YAML 1.2 requires unique keys; PyYAML
  silently keeps the last), aliases are bounded (:data:`MAX_YAML_ALIASES`) and so is the
  document's size once aliases are expanded (:data:`MAX_NODES`, the "billion laughs" guard);
- JSON rejects ``NaN``/``Infinity`` literals (not JSON, RFC 8259 §6), numbers that overflow
  a float, and duplicate keys;
- nesting depth is bounded (:data:`MAX_DEPTH`) in both (YAML before its composer recurses;
  JSON's scanner bounds its own recursion);
- the top-level type is the one the caller expects (``expect=dict`` for documents).

Every failure is a :class:`~estimator.base.errors.ConfigError` naming the file and the rule::

    from estimator.base.loading import load_json, load_yaml, read_text
    raw = load_yaml("examples/ppo-tiny-2xcpu.yaml", "experiment")          # a dict
    plan = load_json("plan.json", "plan", expect=dict)
    lines = read_text("prompts.jsonl", "prompts file", max_bytes=1 << 30).splitlines()
"""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path
from typing import Any

import yaml

from estimator.base.errors import ConfigError

MAX_DOC_BYTES = 16 << 20  # experiment, plan, profile, model config: real ones are a few KiB
MAX_DATA_BYTES = 4 << 30  # prompt files, timelines, tables
MAX_DEPTH = 64  # nesting of mappings/lists; real documents nest at most 5 deep
MAX_YAML_ALIASES = 100
MAX_NODES = 1_000_000  # values in one document, aliases expanded
SAFETENSORS_HEADER_MAX = 100 << 20  # the limit the safetensors format itself sets (lib.rs N_MAX)


def _where(path: str | Path, what: str) -> str:
    return f"{what} {str(path)!r}"


def check_input_path(path: str | Path | None, what: str) -> Path:
    """``path`` as a Path naming an existing regular file, or :class:`ConfigError`."""
    if path is None or str(path) == "":
        raise ConfigError(f"{what}: the path is empty; give a file name")
    text = str(path)
    if "\0" in text:
        raise ConfigError(f"{what} {text!r}: the path contains a NUL byte")
    p = Path(text)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"{_where(p, what)} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{_where(p, what)}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{_where(p, what)} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{_where(p, what)} is not a regular file (a FIFO, socket or device)")
    return p


def is_file(path: str | Path) -> bool:
    """``Path.is_file`` that answers False for a name the OS refuses (too long, NUL byte)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: str | Path) -> bool:
    """``Path.is_dir`` that answers False for a name the OS refuses (too long, NUL byte)."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def read_bytes(path: str | Path | None, what: str, max_bytes: int = MAX_DOC_BYTES) -> bytes:
    """The bytes of a regular file, at most ``max_bytes`` of them."""
    p = check_input_path(path, what)
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{_where(p, what)}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{_where(p, what)} is larger than {max_bytes:,} bytes, the limit for a {what}")
    return data


def decode(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; a bad byte is reported with its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                          f"({exc.reason})") from None


def read_text(path: str | Path | None, what: str, max_bytes: int = MAX_DOC_BYTES) -> str:
    """A regular file's UTF-8 text, at most ``max_bytes`` bytes of it."""
    return decode(read_bytes(path, what, max_bytes), _where(path, what))


def check_type(value: Any, expect: type | tuple[type, ...] | None, where: str) -> Any:
    if expect is not None and not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        shown = {"dict": "a mapping (object)", "list": "a list"}.get(names, names)
        raise ConfigError(f"{where}: the top level must be {shown}, got {type(value).__name__}")
    return value


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> Any:
    """Refuse containers nested deeper than ``limit`` (walked iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    raise ConfigError(f"{where}: nested deeper than {limit} levels")
                stack.append((child, depth + 1))
    return value


# ---- JSON ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (only finite numbers are allowed)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400 overflows to inf
        raise ValueError(f"{text} overflows a float (only finite numbers are allowed)")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(text: str, where: str, expect: type | tuple[type, ...] | None = dict) -> Any:
    """Strict JSON: finite numbers only, unique keys, bounded nesting, the expected top level."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:  # the C scanner bounds its own recursion and raises this cleanly
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # our hooks, or an integer of over 4,300 digits
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    return check_type(check_depth(value, where), expect, where)


def load_json(path: str | Path | None, what: str, expect: type | tuple[type, ...] | None = dict,
              max_bytes: int = MAX_DOC_BYTES) -> Any:
    """A JSON file, strictly parsed (see :func:`parse_json`)."""
    return parse_json(read_text(path, what, max_bytes), _where(path, what), expect)


# ---- YAML ---------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that bounds nesting and aliases and refuses duplicate keys."""

    def __init__(self, stream: str, where: str):
        super().__init__(stream)
        self.where = where
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"{self.where}: more than {MAX_YAML_ALIASES} YAML aliases")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConfigError(f"{self.where}: nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{self.where}: duplicate key {key!r} (line {line}); each key may appear once")
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: Any, where: str) -> int:
    """Values in the composed document with aliases expanded, memoised per node."""
    sizes: dict[int, int] = {}
    stack = [(node, False)]
    while stack:
        cur, done = stack.pop()
        if id(cur) in sizes:
            continue
        if isinstance(cur, yaml.ScalarNode):
            sizes[id(cur)] = 1
            continue
        kids = [n for pair in cur.value for n in pair] if isinstance(cur, yaml.MappingNode) else list(cur.value)
        if done:
            sizes[id(cur)] = 1 + sum(sizes[id(k)] for k in kids)
            if sizes[id(cur)] > MAX_NODES:
                raise ConfigError(f"{where}: more than {MAX_NODES:,} values once YAML aliases are expanded")
        else:
            stack.append((cur, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(node)]


def _unreadable(text: str, exc: yaml.reader.ReaderError, where: str) -> ConfigError:
    """A character YAML's reader refuses (a NUL byte, a control character), with its line and column."""
    at = exc.position
    line = text.count("\n", 0, at) + 1
    column = at - (text.rfind("\n", 0, at) + 1) + 1
    return ConfigError(f"{where}: not valid YAML: character {repr(chr(exc.character))} (U+{exc.character:04X}) at "
                       f"line {line}, column {column} (offset {at}); YAML allows only printable characters, "
                       "tab and newlines")


def parse_yaml(text: str, where: str, expect: type | tuple[type, ...] | None = dict) -> Any:
    """Strict YAML (see the module docstring); an empty document is ``{}``."""
    try:  # the reader checks every character as the loader is built
        loader = _StrictLoader(text, where)
    except yaml.reader.ReaderError as exc:
        raise _unreadable(text, exc, where) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return check_type({}, expect, where)
        _expanded_size(node, where)
        value = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()
    return check_type(value, expect, where)


def load_yaml(path: str | Path | None, what: str, expect: type | tuple[type, ...] | None = dict,
              max_bytes: int = MAX_DOC_BYTES) -> Any:
    """A YAML file, strictly parsed (see :func:`parse_yaml`)."""
    return parse_yaml(read_text(path, what, max_bytes), _where(path, what), expect)


# ---- tables -------------------------------------------------------------------------------


def load_table(path: str | Path | None, what: str, columns: tuple[str, ...] = (),
               max_bytes: int = MAX_DATA_BYTES) -> Any:  # -> pandas.DataFrame
    """A CSV table as a pandas DataFrame that has at least ``columns`` (pandas is imported
    lazily: it is slow to import and most commands never read a table)."""
    import io

    import pandas as pd

    where = _where(path, what)
    text = read_text(path, what, max_bytes)
    try:
        table = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise ConfigError(f"{where}: not a valid CSV table: {' '.join(str(exc).split())}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"{where}: missing column(s) {missing}; has {list(table.columns)}")
    return table


# ---- safetensors --------------------------------------------------------------------------


def read_safetensors_header(path: str | Path, what: str = "safetensors file") -> dict[str, dict[str, Any]]:
    """Tensor name → ``{"dtype", "shape", "data_offsets"}`` from a safetensors file's header.

    The format (huggingface/safetensors README): an unsigned little-endian 64-bit header size
    N, N bytes of JSON, then the data. Checked without torch: N within the file and the
    format's limit, each entry's shape a list of non-negative integers and its byte range
    inside the data.
    """
    p = check_input_path(path, what)
    where = _where(p, what)
    size = p.stat().st_size
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ConfigError(f"{where}: not a safetensors file ({size} bytes, under its 8-byte header)")
            (n,) = struct.unpack("<Q", head)
            if n > SAFETENSORS_HEADER_MAX or 8 + n > size:
                raise ConfigError(f"{where}: not a safetensors file (header size {n} exceeds the file or "
                                  f"the format's {SAFETENSORS_HEADER_MAX:,}-byte limit)")
            raw = fh.read(n)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    header = parse_json(decode(raw, f"{where} header"), f"{where} header", expect=dict)
    data_bytes = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        ok = (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
              and isinstance(offsets, list) and len(offsets) == 2
              and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_bytes
              and isinstance(entry.get("dtype"), str))
        if not ok:
            raise ConfigError(f"{where}: tensor {name!r} has a malformed header entry {entry!r}")
        out[name] = entry
    return out


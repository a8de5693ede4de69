"""The safetensors header: parsed with bounded effort and checked against the format's rules.

The header is untrusted JSON that says where every tensor's bytes are. Before one tensor byte
is read it must be exactly what the format allows: a JSON object of at most 100 MB nested no
deeper than the format needs; ``__metadata__`` a flat string-to-string object; every other
entry an object with a known dtype name, a shape of non-negative integers and two integer data
offsets whose span fits dtype and shape; and the spans, sorted, tiling the data buffer from 0
without holes or overlaps (the format forbids both, so two tensors can never share bytes and a
file cannot smuggle data between tensors). Anything else is refused with one line naming the
first thing wrong. Reading and dtype support are ``weights_io``'s business; this module only
knows the format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

MAX_HEADER_BYTES = 100_000_000  # the format's own limit
# The format nests three deep ({name: {"shape": [...]}}); a little room for extra entry fields.
MAX_JSON_DEPTH = 8
# Metadata values that hold JSON (configs, training settings) are parsed by their readers; real
# ones nest a few levels, and a guard here keeps every reader safe from a crafted one.
MAX_METADATA_JSON_DEPTH = 64

# Every dtype name of the format, with its size in bits.
DTYPE_BITS: Dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

METADATA_KEY = "__metadata__"


class HeaderError(ValueError):
    """The header breaks the format; the message is the reason, without the file name."""


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: Tuple[int, ...]
    begin: int  # offsets into the data buffer (after the header)
    end: int


@dataclass(frozen=True)
class Header:
    entries: Dict[str, Entry]
    metadata: Dict[str, str]
    data_bytes: int  # the size the data buffer must have


def parse(raw: bytes) -> Header:
    """Parse and validate header bytes (the JSON after the 8-byte length)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise HeaderError(f"header of {len(raw)} bytes is over the format's {MAX_HEADER_BYTES}-byte limit")
    depth = json_depth(raw, MAX_JSON_DEPTH)
    if depth > MAX_JSON_DEPTH:
        raise HeaderError(f"corrupt safetensors header: JSON nested more than {MAX_JSON_DEPTH} levels deep "
                          f"(the format needs 3)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("corrupt safetensors header (not UTF-8 text)") from None
    try:
        doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except HeaderError:
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise HeaderError(f"corrupt safetensors header (not valid JSON: {_first_line(exc)})") from None
    if not isinstance(doc, dict):
        raise HeaderError("corrupt safetensors header (not a JSON object)")
    metadata = _metadata(doc.pop(METADATA_KEY, None))
    entries = {key: _entry(key, value) for key, value in doc.items()}
    return Header(entries, metadata, _check_tiling(entries))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unique_keys(pairs: List[Tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"corrupt safetensors header: the name {key!r} appears twice")
        out[key] = value
    return out


def _no_constants(name: str):
    raise HeaderError(f"corrupt safetensors header: {name} is not allowed in JSON numbers")


def _metadata(value) -> Dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HeaderError(f"corrupt safetensors header: {METADATA_KEY} is a JSON {_kind(value)}, not an object "
                          "of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise HeaderError(f"corrupt safetensors header: metadata value {key!r} is a JSON {_kind(item)}; "
                              "the format allows only strings")
        if item.lstrip()[:1] in ("{", "[") and json_depth(item.encode("utf-8", "surrogatepass"),
                                                           MAX_METADATA_JSON_DEPTH) > MAX_METADATA_JSON_DEPTH:
            raise HeaderError(f"corrupt safetensors header: metadata value {key!r} holds JSON nested more than "
                              f"{MAX_METADATA_JSON_DEPTH} levels deep")
    return dict(value)


def _kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(key: str, value) -> Entry:
    where = f"corrupt safetensors header: tensor {key!r}"
    if not isinstance(value, dict):
        raise HeaderError(f"{where} is a JSON {_kind(value)}, not an object")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in value]
    if missing:
        raise HeaderError(f"{where} has no {', '.join(missing)}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"{where} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise HeaderError(f"{where} has shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise HeaderError(f"{where} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
    numel = 1
    for s in shape:
        numel *= s
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise HeaderError(f"{where} spans {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs "
                          f"{bits / 8:g}")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(entries: Dict[str, Entry]) -> int:
    """The spans must tile the data buffer from 0, without holes or overlaps; returns its size."""
    end, last = 0, None
    for key, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin < end:
            raise HeaderError(f"corrupt safetensors header: tensors {last!r} and {key!r} share bytes "
                              f"{e.begin}..{min(end, e.end)} of the data")
        if e.begin > end:
            raise HeaderError(f"corrupt safetensors header: data bytes {end}..{e.begin} (before tensor {key!r}) "
                              "belong to no tensor")
        if e.end > e.begin:
            end, last = e.end, key
    return end


# ----------------------------------------------------------------------------------------------
# Nesting depth without recursion

_CHUNK = 1 << 18
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


def json_depth(raw: bytes, limit: int) -> int:
    """How deep arrays and objects nest in JSON text ``raw``, found in linear time and bounded
    memory; stops early once deeper than ``limit``.

    ``json.loads`` recurses once per level, so a header of a million ``[`` would end in
    RecursionError (or, with a raised recursion limit, a crashed process). Brackets count only
    outside strings; a quote ends a string unless an odd run of backslashes precedes it. For
    valid JSON this is the exact depth; for invalid JSON it is at least the depth a parser
    reaches before the first error, so checking it first is always enough.
    """
    depth = deepest = 0
    in_string = False
    slashes = 0  # backslashes at the end of the previous chunk
    for start in range(0, len(raw), _CHUNK):
        a = np.frombuffer(raw, dtype=np.uint8, count=min(_CHUNK, len(raw) - start), offset=start)
        index = np.arange(a.size, dtype=np.int64)
        last_plain = np.maximum.accumulate(np.where(a == _BACKSLASH, -1, index))  # last non-backslash
        quotes = np.flatnonzero(a == _QUOTE)
        before = np.where(quotes > 0, last_plain[np.maximum(quotes - 1, 0)], -1)
        run = (quotes - 1) - before + np.where(before < 0, slashes, 0)  # backslashes right before
        real = quotes[run % 2 == 0]
        brackets = np.flatnonzero(_STEP[a])
        outside = (np.searchsorted(real, brackets) + in_string) % 2 == 0
        steps = _STEP[a[brackets[outside]]].astype(np.int64)
        if steps.size:
            levels = depth + np.cumsum(steps)
            deepest = max(deepest, int(levels.max()))
            depth = int(levels[-1])
            if deepest > limit:
                return deepest
        in_string = bool((int(in_string) + real.size) % 2)
        end_plain = int(last_plain[-1])
        slashes = a.size - 1 - end_plain + (slashes if end_plain < 0 else 0)
    return deepest

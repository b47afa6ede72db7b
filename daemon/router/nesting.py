"""Where a msgpack body nests too deep, found without recursion and at a bounded cost.

msgspec decodes (and skips) nested containers recursively: a list nested 100,000
deep makes it raise ``RecursionError``, which names no field. No protocol message
nests more than a few levels, so on that rare path the router walks the body here,
iteratively, to say which field is at fault and to read the ``req`` it should answer.
The walk stops after ``MAX_STEPS`` elements: a body built to make it slow costs the
router at most that much, and is then answered without a field name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_NESTING = 32  # far above any protocol message (a submit nests 5 levels)
MAX_STEPS = 200_000  # elements walked before giving up on naming the field
_PATH_PARTS = 3  # "items[0].params" says enough; the rest is the same list again

# Scalars of a fixed size after their first byte: first byte -> bytes that follow.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED.update({0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})
_FIXED.update({0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17})  # fixext: type + data
# Scalars with a length before their data: first byte -> (length bytes, extra type byte).
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
_SIZED.update({0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)})  # ext: length, type, data
_STR_TYPES = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_UINT = {1: ">B", 2: ">H", 4: ">I"}


class _Unreadable(Exception):
    """Cut short, a reserved byte, or past MAX_STEPS: no field can be named."""


@dataclass
class _Container:
    is_map: bool
    left: int  # children still to read (a map's keys and values both count)
    index: int = 0  # a list's next index; a map's entry number
    key: str = "?"  # a map's current key, when it is a string

    def part(self) -> str:
        return f".{self.key}" if self.is_map else f"[{self.index}]"


@dataclass
class Scan:
    """What a walk of the body found: the path of the first value nested deeper than
    MAX_NESTING (None: none, or the walk could not tell), and a top-level ``req``."""

    too_deep: str | None = None
    req: str | None = None


def scan(body: bytes, limit: int = MAX_NESTING, max_steps: int = MAX_STEPS) -> Scan:
    result = Scan()
    try:
        _walk(memoryview(body), limit, max_steps, result)
    except (_Unreadable, IndexError, struct.error):
        pass
    return result


def _walk(buf: memoryview, limit: int, max_steps: int, result: Scan) -> None:
    stack: list[_Container] = []
    pos = 0
    for _ in range(max_steps):
        pos, opened, text = _read_one(buf, pos)
        top = stack[-1] if stack else None
        if top is not None and top.is_map and top.left % 2 == 0:  # this was a key
            top.key = text if text is not None else "?"
        elif top is not None and len(stack) == 1 and top.is_map and top.key == "req":
            result.req = text
        if opened is not None:
            if len(stack) >= limit:
                result.too_deep = _path(stack)
                return
            stack.append(opened)
            if opened.left:
                continue
            stack.pop()  # an empty container is a complete value at once
        if not _complete_one(stack):
            return  # the top-level value is complete
    raise _Unreadable


def _complete_one(stack: list[_Container]) -> bool:
    """Count one complete child against its parent, closing finished parents; False
    once nothing is open any more."""
    while stack:
        top = stack[-1]
        top.left -= 1
        if top.is_map:
            top.index += top.left % 2 == 0
        else:
            top.index += 1
        if top.left:
            return True
        stack.pop()
    return False


def _path(stack: list[_Container]) -> str:
    return "".join(c.part() for c in stack[:_PATH_PARTS]).lstrip(".")


def _read_one(buf: memoryview, pos: int) -> tuple[int, _Container | None, str | None]:
    """One element's header (and a scalar's data): the position after it, the container
    it opens, and its text if it is a string."""
    first = buf[pos]
    pos += 1
    if first <= 0x7F or first >= 0xE0:
        return pos, None, None
    if first <= 0x8F:
        return pos, _Container(True, 2 * (first & 0x0F)), None
    if first <= 0x9F:
        return pos, _Container(False, first & 0x0F), None
    if first <= 0xBF:
        return _text(buf, pos, first & 0x1F)
    if first in _FIXED:
        return pos + _FIXED[first], None, None
    if first in _SIZED:
        size_bytes, extra = _SIZED[first]
        length = _uint(buf, pos, size_bytes)
        if first in _STR_TYPES:
            return _text(buf, pos + size_bytes, length)
        return pos + size_bytes + extra + length, None, None
    if first in (0xDC, 0xDD, 0xDE, 0xDF):
        size_bytes = 2 if first in (0xDC, 0xDE) else 4
        count = _uint(buf, pos, size_bytes)
        is_map = first >= 0xDE
        return pos + size_bytes, _Container(is_map, 2 * count if is_map else count), None
    raise _Unreadable  # 0xC1: never used


def _uint(buf: memoryview, pos: int, size: int) -> int:
    value: int = struct.unpack_from(_UINT[size], buf, pos)[0]
    return value


def _text(buf: memoryview, pos: int, length: int) -> tuple[int, None, str | None]:
    end = pos + length
    if end > len(buf):
        raise _Unreadable
    try:
        return end, None, bytes(buf[pos:end]).decode()
    except UnicodeDecodeError:
        return end, None, None

"""The one parser for JSON that anyone but this process could have written: registry indexes, signature files,
export manifests, the cache's records and sidecars read back.

Python's ``json`` accepts what no honest writer of these files produces, and each is a way in:

- nesting thousands deep (``[[[[...``) makes the decoder recurse until ``RecursionError``, a traceback and exit 1;
- a key given twice keeps the last value, so a signed index can show a decoy ``sha256`` to a reader (or a
  reviewer) who stops at the first;
- ``NaN``, ``Infinity`` and numbers such as ``1e999`` are not JSON (RFC 8259) and become non-finite floats.

:func:`loads` refuses all three with a :class:`~sct_sitehead.errors.RegistryError` (exit 5) that names the source.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from sct_sitehead.errors import RegistryError

#: Deepest nesting of arrays and objects accepted: a registry index is 8 levels deep, a sidecar 3.
MAX_DEPTH = 32
#: Strings (skipped whole, so brackets inside them do not count) and brackets, in one pass of the regex engine.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def loads(data: bytes | str, source: str, *, max_depth: int = MAX_DEPTH, malformed: str | None = None) -> Any:
    """Decode untrusted JSON.

    Args:
        data: the raw bytes (UTF-8) or text.
        source: what it is and where it came from, for messages, e.g. ``"registry index https://…/registry.json"``.
        max_depth: deepest nesting of arrays and objects accepted.
        malformed: what the message says after ``source`` when the bytes are not UTF-8 JSON at all (default: the
            decoder's own words and position).

    Returns:
        The decoded value (a dict, list, str, int, finite float, bool or None).

    Raises:
        RegistryError: not UTF-8, not JSON, nested deeper than ``max_depth``, a key repeated in one object, or a
            number that is not finite (``NaN``, ``Infinity``, ``1e999``) or an integer of more than 4300 digits.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{source} {malformed or f'is not UTF-8 text: {exc}'}") from None
    depth = nesting_depth(raw, max_depth)
    if depth > max_depth:
        raise RegistryError(
            f"{source} nests arrays and objects more than {max_depth} levels deep; no valid file does, so it was "
            "not read further"
        )
    try:
        return json.loads(
            text,
            object_pairs_hook=lambda pairs: unique_keys(pairs, source),
            parse_constant=refuse_constant,
            parse_float=finite_float,
        )
    except RegistryError:
        raise
    except json.JSONDecodeError as exc:
        where = f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise RegistryError(f"{source} {malformed or where}") from None
    except _NonFinite as exc:
        raise RegistryError(f"{source} holds the number {exc}, which is not finite; JSON has no such numbers") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise RegistryError(f"{source} holds a number that cannot be read: {exc}") from None


def nesting_depth(raw: bytes, stop_above: int = MAX_DEPTH) -> int:
    """Deepest nesting of ``[`` and ``{`` in JSON bytes, brackets inside strings not counted; the scan stops as
    soon as the depth passes ``stop_above`` (so a hostile file costs no more than an honest one)."""
    depth = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_above:
                    break
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


class _NonFinite(Exception):
    """A number the decoder would turn into NaN or +-Inf."""


def refuse_constant(name: str) -> Any:
    """``parse_constant`` hook: ``NaN``, ``Infinity`` and ``-Infinity`` are refused."""
    raise _NonFinite(name)


def finite_float(text: str) -> float:
    """``parse_float`` hook: a number such as ``1e999``, which overflows to Inf, is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def unique_keys(pairs: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    """``object_pairs_hook``: the object as a dict, refusing a repeated key.

    Raises:
        RegistryError: a key appears twice in the object.
    """
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise RegistryError(
                f"{source} gives the key {key!r} more than once in one object; which one counts would depend on the "
                "reader, so the file is refused. Fix the file so that each key appears once."
            )
        document[key] = value
    return document

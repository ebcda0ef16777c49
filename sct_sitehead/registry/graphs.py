"""ONNX Runtime's optimised graphs kept in the cache's ``ort/``, each with the sha256 it was saved with.

A graph is named after the verified sha256 of the model file it was made from, the onnxruntime version and the
execution provider (``<asset sha256[:32]>-ort1.20.1-CPUExecutionProvider.onnx``); beside it, a record
``<graph>.json`` holds the graph's own sha256 and size. :func:`read_graph` hands out a graph's bytes only when
they match its record, so a graph damaged on disk is never run: it is removed, and the caller makes it again from
the (verified) model file. Records are read with :mod:`untrusted_json`.

No lock: ONNX Runtime writes the same bytes for the same model, version and provider, so processes saving one
graph at once write identical files; a reader that catches a graph before its record is written treats it as
damaged and makes it again, which costs one optimisation, never a wrong graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from sct_sitehead.atomic import write_bytes_atomic, write_file_atomic
from sct_sitehead.errors import RegistryError
from sct_sitehead.registry import untrusted_json

logger = logging.getLogger(__name__)

GRAPH_SUFFIX = ".onnx"
RECORD_SUFFIX = ".json"
RECORD_FORMAT = 1


def graph_path(folder: Path, asset_sha256: str, runtime: str) -> Path:
    """Where the optimised graph of the model file with ``asset_sha256`` lives, for ``runtime`` (e.g.
    ``ort1.20.1-CPUExecutionProvider``)."""
    return folder / f"{asset_sha256[:32]}-{runtime}{GRAPH_SUFFIX}"


def record_path(graph: Path) -> Path:
    """``x.onnx`` -> ``x.onnx.json``: the graph's recorded sha256 and size."""
    return graph.with_name(graph.name + RECORD_SUFFIX)


def read_graph(graph: Path) -> bytes | None:
    """The graph's bytes if they match its record; None when it is missing, unrecorded or damaged (a damaged one,
    and its record, are removed when the cache is writable)."""
    try:
        data = graph.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("cannot read the optimised graph %s (%s); using the model file", graph, exc.strerror or exc)
        return None
    problem = graph_problem(graph, data)
    if problem is None:
        return data
    logger.warning(
        "ignoring optimised graph %s: it %s; it is removed and made again from the model file", graph, problem
    )
    discard(graph)
    return None


def graph_problem(graph: Path, data: bytes) -> str | None:
    """Why ``data`` (the bytes of ``graph``) may not be used, or None when they match the record."""
    try:
        record = untrusted_json.loads(record_path(graph).read_bytes(), f"record {record_path(graph)}")
    except FileNotFoundError:
        return "has no record of its sha256"
    except (OSError, RegistryError) as exc:
        return f"has an unreadable record ({exc})"
    expected = record.get("sha256") if isinstance(record, dict) else None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        return f"has sha256 {digest}, but its record says {expected}"
    return None


def save_graph(graph: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` save a graph to a temp file, then move it to ``graph`` and record its sha256 and size.

    Raises:
        OSError: the folder cannot be written; anything ``write`` raises.
    """
    digest: dict[str, str | int] = {}

    def write_and_hash(tmp: Path) -> None:
        write(tmp)
        data = tmp.read_bytes()
        digest.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    write_file_atomic(graph, write_and_hash)
    record = {"format": RECORD_FORMAT, **digest}
    write_bytes_atomic(record_path(graph), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def discard(graph: Path) -> None:
    """Remove a graph and its record; a read-only cache only logs it."""
    for path in (graph, record_path(graph)):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.debug("cannot remove %s: %s", path, exc.strerror or exc)


def check_folder(folder: Path, *, repair: bool = True) -> list[tuple[Path, str]]:
    """Check every file of an ``ort/`` folder: each graph against its record, each record against its graph.

    Args:
        folder: the cache's ``ort/``.
        repair: remove what fails (a graph is made again when next needed).

    Returns:
        ``(path, problem)`` for every file that failed.
    """
    failed: list[tuple[Path, str]] = []
    if not folder.is_dir():
        return failed
    for path in sorted(folder.iterdir()):
        if path.name.endswith(GRAPH_SUFFIX + RECORD_SUFFIX):
            graph = path.with_name(path.name[: -len(RECORD_SUFFIX)])
            if not graph.exists():
                failed.append((path, "is a record without its graph"))
            continue
        if not path.name.endswith(GRAPH_SUFFIX) or not path.is_file():
            failed.append((path, "is not an optimised graph this version writes"))
            continue
        try:
            problem = graph_problem(path, path.read_bytes())
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        if problem is not None:
            # Name the file at fault: an unreadable record is the record's damage, not the graph's.
            failed.append((record_path(path) if "record (" in problem else path, problem))
    if repair:
        for path, _ in failed:
            if path.name.endswith(GRAPH_SUFFIX + RECORD_SUFFIX):
                discard(path.with_name(path.name[: -len(RECORD_SUFFIX)]))  # the graph cannot be checked without it
            elif path.name.endswith(GRAPH_SUFFIX):
                discard(path)  # with its record
            elif not path.is_dir() or path.is_symlink():
                path.unlink(missing_ok=True)
    return failed

"""``sct_sitehead cache verify``: every file the cache holds, checked against what vouches for it.

- ``assets/``: each file's sha256 against its name (:meth:`Cache.verify`);
- ``ort/``: each optimised graph against its recorded sha256, each record against its graph (:mod:`graphs`);
- ``indexes/``: each kept index copy against the schema and, when it was signed by a key this machine trusts,
  against its signature (a copy signed by a key given only with ``-trust`` is left alone: it is verified again
  whenever it is used);
- ``state/seen.json``: readable (an unreadable one is ignored by every run anyway).

What fails is removed: an asset or graph is fetched or made again when next needed, an index copy downloaded
again. Partial downloads in ``tmp/`` are not checked here: they are hashed when complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sct_sitehead.errors import RegistryError, UsageError
from sct_sitehead.registry import graphs, untrusted_json
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.document import parse_index
from sct_sitehead.registry.signing import SIGNATURE_SUFFIX, parse_signature, verify_index_bytes
from sct_sitehead.registry.trust import load_trust_store

logger = logging.getLogger(__name__)

#: How a kept index copy's problem begins when it is its signature file that fails.
SIGNATURE_PROBLEM = "has an unusable signature"


@dataclass
class Audit:
    """What :func:`audit_cache` checked and what failed.

    Attributes:
        assets: corrupt assets (removed).
        others: ``(path, problem)`` of every other file that failed (removed).
        checked: files checked per kind, e.g. ``{"assets": 3, "optimised graphs": 2, "index copies": 1}``.
        notes: files left as they are, with why (an index copy signed by a key not trusted here).
    """

    assets: list[Path] = field(default_factory=list)
    others: list[tuple[Path, str]] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    notes: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.assets and not self.others


def audit_cache(cache: Cache) -> Audit:
    """Check every file of ``cache`` (module notes) and remove those that fail.

    Raises:
        OutputError: a corrupt asset cannot be removed.
    """
    audit = Audit()
    audit.checked["assets"] = len(cache.list())
    audit.assets = cache.verify()
    ort = cache.root / "ort"
    audit.checked["optimised graphs"] = len(list(ort.glob("*" + graphs.GRAPH_SUFFIX))) if ort.is_dir() else 0
    audit.others += graphs.check_folder(ort)
    copies = sorted((cache.root / "indexes").glob("*.json"))
    audit.checked["index copies"] = len(copies)
    for copy in copies:
        problem, note = index_copy_problem(copy)
        if note:
            audit.notes.append((copy, note))
        if problem:
            signature = copy.with_name(copy.name + SIGNATURE_SUFFIX)
            audit.others.append((signature if problem.startswith(SIGNATURE_PROBLEM) else copy, problem))
            for path in (copy, signature):
                remove_quietly(path)
    state = cache.seen_path()
    if state.is_file():
        try:
            untrusted_json.loads(state.read_bytes(), f"rollback state {state}")
        except (OSError, RegistryError) as exc:
            audit.others.append((state, f"cannot be read ({exc}); runs ignore it"))
            remove_quietly(state)
    for path, problem in audit.others:
        logger.warning("%s %s; removed", path, problem)
    return audit


def index_copy_problem(copy: Path) -> tuple[str | None, str | None]:
    """``(problem, note)`` of a kept index copy: a problem removes it; a note says what could not be checked."""
    try:
        data = copy.read_bytes()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", None
    try:
        parse_index(data, str(copy))
    except RegistryError as exc:
        return str(exc), None
    signature_path = copy.with_name(copy.name + SIGNATURE_SUFFIX)
    if not signature_path.is_file():
        return None, None  # an unsigned index the user allowed; checked again when used
    try:
        signature = parse_signature(signature_path.read_bytes(), source=str(signature_path))
        store = load_trust_store()
    except (OSError, RegistryError, UsageError) as exc:
        return f"{SIGNATURE_PROBLEM} ({exc})", None
    if signature["key_id"] not in store.keys:
        return None, f"signed by key {signature['key_id']}, not in the trusted keys here: verified when it is used"
    try:
        verify_index_bytes(data, signature, store.keys, source=str(copy))
    except RegistryError as exc:
        return f"{SIGNATURE_PROBLEM} ({exc})", None
    return None, None


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc.strerror or exc)

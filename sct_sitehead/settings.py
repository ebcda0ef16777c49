"""Where settings come from, resolved in one place: a flag or argument first, then the ``SCT_SITEHEAD_*``
environment variable (:mod:`sct_sitehead.env`), then the default.

Both command-line tools and the Python API build a :class:`ModelSource` here and open the registry through it,
so ``-offline`` / ``SCT_SITEHEAD_OFFLINE=1`` and the others mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sct_sitehead import env

if TYPE_CHECKING:
    from sct_sitehead.registry.cache import Cache
    from sct_sitehead.registry.index import Registry


@dataclass(frozen=True)
class ModelSource:
    """Where the models come from: the registry index, the cache, the network policy and the trusted keys.

    Build it with :meth:`resolve`, which applies the environment; the fields are then final.

    Attributes:
        registry: index path or URL; None: the index embedded in the package.
        cache_dir: the asset cache folder.
        offline: make no network call; use the cache and local registries only.
        allow_http: allow plain ``http://`` to hosts other than loopback.
        trust: extra trusted ed25519 public key files.
        allow_unsigned: accept an unsigned remote registry index.
    """

    registry: str | None
    cache_dir: Path
    offline: bool = False
    allow_http: bool = False
    trust: tuple[Path, ...] = ()
    allow_unsigned: bool = False

    @classmethod
    def resolve(
        cls,
        registry: str | Path | None = None,
        *,
        offline: bool = False,
        allow_http: bool = False,
        trust: Iterable[Path] = (),
        allow_unsigned: bool = False,
        cache_dir: Path | None = None,
    ) -> ModelSource:
        """The source that the given values (a flag not given: None or False) and the environment make.

        ``registry`` falls back to ``$SCT_SITEHEAD_REGISTRY``, ``cache_dir`` to ``$SCT_SITEHEAD_CACHE`` (else the
        platform's user cache); ``offline`` and ``allow_http`` are on when the flag or its variable says so.
        """
        return cls(
            registry=str(registry) if registry else env.registry_location(),
            cache_dir=Path(cache_dir) if cache_dir is not None else env.cache_dir(),
            offline=bool(offline) or env.offline(),
            allow_http=bool(allow_http) or env.allow_plain_http(),
            trust=tuple(Path(path) for path in trust),
            allow_unsigned=bool(allow_unsigned),
        )

    def open(self) -> tuple[Registry, Cache]:
        """Load and verify the registry index, with the cache it fetches through.

        Raises:
            RegistryError, DownloadError, OfflineError, UsageError: as :meth:`Registry.load`.
        """
        # Imported here: the registry (urllib.request, http.client...) would take `import sct_sitehead` from 0.04
        # to 0.09 s on 2 cores; requests, jsonschema and cryptography load later still, where they are used.
        from sct_sitehead.registry.cache import Cache
        from sct_sitehead.registry.index import Registry

        cache = Cache(self.cache_dir)
        registry = Registry.load(
            self.registry,
            cache=cache,
            offline=self.offline,
            allow_http=self.allow_http,
            trust=list(self.trust),
            allow_unsigned=self.allow_unsigned,
        )
        return registry, cache


def parse_sites(value: str | Sequence[str] | None) -> list[str]:
    """Site names from ``"a, b,a"`` or ``["a", "b"]``, in order, without repeats or blanks."""
    names = (value or "").split(",") if isinstance(value, str) or value is None else list(value)
    sites: list[str] = []
    for name in names:
        name = name.strip()
        if name and name not in sites:
            sites.append(name)
    return sites


def resolve_sites(value: str | Sequence[str] | None) -> list[str]:
    """:func:`parse_sites` of the given sites, else of ``$SCT_SITEHEAD_SITE``."""
    return parse_sites(value or env.default_site())

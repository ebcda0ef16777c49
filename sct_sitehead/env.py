"""Every environment variable the package reads, in one place, read at call time.

The README's "Environment variables" section documents the same list.
"""

from __future__ import annotations

import os
from pathlib import Path

from sct_sitehead.errors import UsageError

SITE = "SCT_SITEHEAD_SITE"
REGISTRY = "SCT_SITEHEAD_REGISTRY"
OFFLINE = "SCT_SITEHEAD_OFFLINE"
CACHE = "SCT_SITEHEAD_CACHE"
ALLOW_HTTP = "SCT_SITEHEAD_ALLOW_HTTP"
DATA = "SCT_SITEHEAD_DATA"
TRUST_DIR = "SCT_SITEHEAD_TRUST_DIR"
DOWNLOAD_TIMEOUT = "SCT_SITEHEAD_DOWNLOAD_TIMEOUT"
MAX_MEMORY = "SCT_SITEHEAD_MAX_MEMORY"

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def default_site() -> str | None:
    """Site(s) to use when ``-site`` is not given, e.g. ``"montreal"`` or ``"a,b"``."""
    return os.environ.get(SITE) or None


def registry_location() -> str | None:
    """Registry index path or URL overriding the embedded one."""
    return os.environ.get(REGISTRY) or None


def offline() -> bool:
    """True when no network call at all may be made."""
    return _flag(OFFLINE)


def allow_plain_http() -> bool:
    """True when ``http://`` URLs to hosts other than loopback are allowed."""
    return _flag(ALLOW_HTTP)


def cache_dir() -> Path:
    """Cache folder: ``$SCT_SITEHEAD_CACHE`` or the platform's user cache folder."""
    configured = os.environ.get(CACHE)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sct_sitehead", appauthor=False))


def trust_dir() -> Path:
    """Folder of the site's extra trusted public keys (``*.pub``): ``$SCT_SITEHEAD_TRUST_DIR`` or
    ``<platform user config folder>/sct_sitehead/trusted_keys``. It may not exist."""
    configured = os.environ.get(TRUST_DIR)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("sct_sitehead", appauthor=False)) / "trusted_keys"


def download_timeout() -> float | None:
    """Seconds one model file's download may take in all (every mirror and retry), if set.

    Raises:
        UsageError: the value is not a positive number of seconds.
    """
    configured = os.environ.get(DOWNLOAD_TIMEOUT, "").strip()
    if not configured:
        return None
    try:
        seconds = float(configured)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{DOWNLOAD_TIMEOUT}={configured!r} is not a positive number of seconds, e.g. 600")
    return seconds


def max_memory() -> str | None:
    """The memory budget of one run as written, e.g. ``"8G"`` (parsed by ``deploy.budget.parse_size``), if set."""
    return os.environ.get(MAX_MEMORY, "").strip() or None


def data_dir() -> Path | None:
    """Folder of the shared real BIDS data used by tests and benchmarks, if set."""
    configured = os.environ.get(DATA)
    return Path(configured).expanduser() if configured else None

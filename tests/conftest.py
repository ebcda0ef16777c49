"""Shared fixtures: where the real data lives, and small registries built on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_bids() -> Path | None:
    """The shared real BIDS dataset: ``$SCT_SITEHEAD_DATA`` or ``../shared/data/bids`` beside the repository."""
    configured = os.environ.get("SCT_SITEHEAD_DATA")
    candidate = Path(configured) if configured else REPO.parent / "shared" / "data" / "bids"
    return candidate if (candidate / "participants.tsv").is_file() else None


@pytest.fixture(scope="session")
def bids_dir() -> Path:
    path = find_bids()
    if path is None:
        pytest.skip("real data not found: set SCT_SITEHEAD_DATA or place shared/data/bids beside the repository")
    return path


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads the user's cache or registry settings, or the network by accident."""
    for name in ("SCT_SITEHEAD_SITE", "SCT_SITEHEAD_REGISTRY", "SCT_SITEHEAD_OFFLINE", "SCT_SITEHEAD_ALLOW_HTTP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SCT_SITEHEAD_CACHE", str(tmp_path_factory.mktemp("cache")))

"""Train, export and publish every model of a plan, each step skipped when its output already exists.

Work folder layout (``<work>/``)::

    sim/                                   the simulated dataset (unless -data names another)
    cache/                                 preprocessed training arrays, shared by every job (symlinked)
    models/<key>/backbone/                 train-backbone output (+ config.json: the exact config used)
    models/<key>/heads/<head>/             train-head output, one folder per head (+ config.json)
    models/<key>/timing.json               wall and CPU seconds of each training job, export and evaluation
    models/<key>/export/                   ONNX files and export.json
    models/<key>/published.json            heads published and parameter counts (the step's done-marker)
    registry/registry.json                 every model published as <key>@1.0.0
    eval/<key>.jsonl                       one row per (test case, head) through the deploy path

torch is imported only inside the functions that train or export.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments.plan import VERSION, ModelSpec, Settings, read_splits

logger = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.safetensors"


def model_dir(settings: Settings, key: str) -> Path:
    return settings.work / "models" / key


def registry_dir(settings: Settings) -> Path:
    return settings.work / "registry"


def head_checkpoint(settings: Settings, key: str, head: str, site: str) -> Path:
    return model_dir(settings, key) / "heads" / head / f"head-{site}.safetensors"


def write_json(data: Any, path: Path) -> None:
    """Atomic JSON write (temp file + rename), so an interrupted run never leaves half a marker."""
    from sct_sitehead.atomic import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(data, path)


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def json_roundtrip(data: Any) -> Any:
    """``data`` as it reads back from JSON (tuples become lists), for comparing with a stored copy."""
    return json.loads(json.dumps(data))


def timed(work: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``work``; its result and ``{"wall_s", "cpu_s"}`` (CPU of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}


def record_time(settings: Settings, key: str, job: str, entry: Mapping[str, Any]) -> None:
    path = model_dir(settings, key) / "timing.json"
    timing = read_json(path, {})
    timing[job] = dict(entry)
    write_json(timing, path)


def _job_folder(folder: Path, settings: Settings, config: Mapping[str, Any]) -> None:
    """Create a job's folder with its config.json and the shared preprocessing cache linked in."""
    shared = settings.work / "cache"
    shared.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "cache"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(os.path.relpath(shared, folder), target_is_directory=True)
    write_json(config, folder / "config.json")


def preprocess(settings: Settings, base: Mapping[str, Any]) -> None:
    """Fill the shared cache with every training case once, so that no job's timing includes it."""
    from sct_sitehead.evaluation.bids import read_bids
    from sct_sitehead.training.data import prepare_cases

    marker = settings.work / "cache" / "complete.json"
    if read_json(marker) == {"sim": str(settings.sim.resolve())}:
        return
    labels = base["labels"]
    samples, _ = read_bids(settings.sim, label_suffixes=labels["suffixes"], labels_dir=labels["derivatives"])
    splits = {s for site in read_splits(settings.sim).values() for s, split in site.items() if split == "train"}
    chosen = [s for s in samples if s.subject in splits and s.site in settings.sites]
    _, took = timed(lambda: prepare_cases(chosen, base["input"], settings.work / "cache"))
    logger.info("preprocessed %d training cases in %.0f s", len(chosen), took["wall_s"])
    write_json({"sim": str(settings.sim.resolve())}, marker)


def train_model(settings: Settings, spec: ModelSpec, base: Mapping[str, Any]) -> None:
    """Train the backbone (+ universal head) and every head of ``spec`` that is not trained yet."""
    from sct_sitehead.training import train_backbone, train_head

    folder = model_dir(settings, spec.key)
    backbone = folder / "backbone" / BACKBONE_FILE
    if not backbone.is_file():
        config = spec.config(base)
        _job_folder(folder / "backbone", settings, config)
        logger.info(
            "train %s: backbone on %s (labels %s, seed %d)", spec.key, ",".join(spec.sites), spec.mode, spec.seed
        )
        _, took = timed(lambda: train_backbone(settings.sim, folder / "backbone", config))
        record_time(settings, spec.key, "backbone", {**took, "steps": config["train"]["steps"]})
    for head in spec.heads:
        out = folder / "heads" / head.name
        if head_checkpoint(settings, spec.key, head.name, head.site).is_file():
            continue
        config = spec.head_config(base, head)
        _job_folder(out, settings, config)
        logger.info("train %s: head %s (%s, %d steps)", spec.key, head.name, head.strategy, config["head"]["steps"])
        _, took = timed(
            lambda head=head, out=out, config=config: train_head(
                settings.sim, backbone, head.site, head.strategy, out, config
            )
        )
        record_time(settings, spec.key, head.name, {**took, "steps": config["head"]["steps"]})


def export_and_publish(settings: Settings, spec: ModelSpec) -> dict[str, Any]:
    """Export ``spec`` to ONNX (checked against PyTorch) and publish it as ``<key>@1.0.0`` into the work
    registry; skipped when ``published.json`` lists the same heads. Returns the marker's content."""
    folder = model_dir(settings, spec.key)
    marker = folder / "published.json"
    heads = {h.name: head_checkpoint(settings, spec.key, h.name, h.site) for h in spec.heads}
    done = read_json(marker)
    if done is not None and done["heads"] == sorted(heads):
        return done
    from sct_sitehead.registry.publish import publish
    from sct_sitehead.training import export_release

    manifest, took = timed(
        lambda: export_release(
            folder / "backbone" / BACKBONE_FILE, heads, folder / "export", exporter=settings.exporter
        )
    )
    record_time(settings, spec.key, "export", took)
    publish(
        folder / "export",
        registry_dir(settings),
        model=spec.key,
        version=VERSION,
        replace=True,
        description=f"experiment model {spec.key}: sites {','.join(spec.sites)}, labels {spec.mode}",
    )
    done = {
        "heads": sorted(heads),
        "parameters": manifest["parameters"],
        "channels": manifest["channels"],
        "max_abs_diff": max(manifest["check"]["max_abs_diff"].values()),
    }
    write_json(done, marker)
    return done


def costs(settings: Settings, keys: list[str]) -> dict[str, dict[str, Any]]:
    """``{key: {"timing": {job: {...}}, "parameters": {name: count}}}`` of every trained model."""
    out = {}
    for key in keys:
        folder = model_dir(settings, key)
        out[key] = {
            "timing": read_json(folder / "timing.json", {}),
            "parameters": (read_json(folder / "published.json") or {}).get("parameters", {}),
        }
    return out


def job_configs(settings: Settings, keys: list[str]) -> dict[str, Any]:
    """Every job's exact config (``config.json`` of each job folder), for ``configs_used.json``."""
    found: dict[str, Any] = {}
    for key in keys:
        for path in sorted(model_dir(settings, key).glob("**/config.json")):
            if path.parent.name == "backbone":
                found[f"{key}/backbone"] = read_json(path)
            else:
                found[f"{key}/{path.parent.name}"] = read_json(path)
    return found


def simulate_data(settings: Settings, n_per_site: int) -> None:
    """Simulate the dataset into ``<work>/sim`` (the real anatomy of ``holdout`` only in the test split)."""
    from sct_sitehead.simulate import simulate

    logger.info(
        "simulate %d subjects per site at %s (seed %d, holdout %s)",
        n_per_site,
        ",".join(settings.sites),
        settings.data_seed,
        ",".join(settings.holdout),
    )
    simulate(
        settings.source,
        settings.work / "sim",
        n_per_site=n_per_site,
        seed=settings.data_seed,
        holdout=list(settings.holdout),
        sites=list(settings.sites),
    )


def registry_location(settings: Settings) -> str:
    return str(registry_dir(settings) / "registry.json")


def published_release(settings: Settings, key: str):
    """The published release ``key@1.0.0`` and the cache (inside the work folder) to fetch it through."""
    from sct_sitehead.registry.cache import Cache
    from sct_sitehead.registry.index import Registry

    cache = Cache(settings.work / "client-cache")
    index = Registry.load(registry_location(settings), cache=cache, offline=False)
    return index.release(key, VERSION), cache


def version_of_git(repo: Path, exclude: Path | None = None) -> dict[str, Any]:
    """The repository's commit and whether the tree had local changes (read-only git calls).

    ``exclude``: a folder whose changes do not count, e.g. the report folder being written (its new files would
    otherwise mark every report as made "with local changes").
    """
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    paths: list[str] = []
    if exclude is not None:
        try:
            paths = ["--", ".", f":(exclude){Path(exclude).resolve().relative_to(Path(repo).resolve()).as_posix()}"]
        except ValueError:  # outside the repository: git does not see it anyway
            paths = []
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", *paths))}

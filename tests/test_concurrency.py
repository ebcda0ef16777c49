"""Six real processes fetch the same assets into one cold cache at the same moment: one download per asset."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_download import RecordingServer
from test_registry import make_index, make_keys, write_signed_registry

import sct_sitehead

PROCESSES = 6
BACKBONE = "lesion/1.0.0/backbone.onnx"
HEAD = "lesion/1.0.0/heads/montreal.onnx"

# Each worker imports everything first, says it is ready, then waits for the common start signal, so the
# fetches (not the interpreter start-ups) overlap. Odd workers ask for the head first.
WORKER = """
import hashlib, json, os, sys, time
from pathlib import Path
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import Registry

url, root, go, number, key = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
Path(f"{go}.ready.{number}").touch()
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.002)
cache = Cache(root, retries=2, backoff=0.05)
release = Registry.load(url, cache=cache, offline=False, trust=[key]).release()
assets = [release.backbone, release.head("montreal").asset]
if number % 2:
    assets.reverse()
paths = {asset.name: str(cache.fetch(asset, offline=False)) for asset in assets}
print(json.dumps({name: [path, hashlib.sha256(Path(path).read_bytes()).hexdigest()] for name, path in paths.items()}))
"""


def test_processes_on_a_cold_cache_download_each_asset_once(tmp_path: Path) -> None:
    backbone, head = os.urandom(400_000), os.urandom(20_000)
    www = tmp_path / "www"
    private, public = make_keys(tmp_path / "keys")
    write_signed_registry(www, make_index(backbone, {"montreal": head}), {BACKBONE: backbone, HEAD: head}, private)
    server = RecordingServer(www)
    server.delay = 0.2  # a slow mirror: every worker reaches the lock while the first is still downloading
    go = tmp_path / "go"
    cache_root = tmp_path / "cache"
    environment = {**os.environ, "PYTHONPATH": str(Path(sct_sitehead.__file__).resolve().parents[1])}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                server.url("registry.json"),
                str(cache_root),
                str(go),
                str(number),
                str(public),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for number in range(PROCESSES)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("go.ready.*"))) < PROCESSES:
            assert time.monotonic() < deadline, "workers did not start"
            assert all(worker.poll() is None for worker in workers), [w.communicate() for w in workers]
            time.sleep(0.01)
        go.touch()
        results = [worker.communicate(timeout=60) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        server.close()

    for worker, (_out, err) in zip(workers, results):
        assert worker.returncode == 0, err
    outputs = [json.loads(out) for out, _ in results]
    assert all(output == outputs[0] for output in outputs)
    assert outputs[0]["backbone"][1] == hashlib.sha256(backbone).hexdigest()
    assert outputs[0]["montreal head"][1] == hashlib.sha256(head).hexdigest()
    assert Path(outputs[0]["backbone"][0]).read_bytes() == backbone
    counts = server.count()
    assert counts["/" + BACKBONE] == 1
    assert counts["/" + HEAD] == 1
    assert counts["/registry.json"] == PROCESSES
    assert list((cache_root / "tmp").iterdir()) == []

"""Distributed training: torchrun with 2 CPU processes (gloo) ends with identical weights on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import make_dataset  # noqa: E402

from sct_sitehead.errors import TrainingError  # noqa: E402
from sct_sitehead.training.checkpoint import load_checkpoint, weights_digest  # noqa: E402
from sct_sitehead.training.distributed import Context, resolve_device, setup  # noqa: E402
from sct_sitehead.training.labels import build_label_space  # noqa: E402
from sct_sitehead.training.train import _shard, load_backbone  # noqa: E402

pytestmark = pytest.mark.train

WORKER = """
import faulthandler
import sys
from pathlib import Path

faulthandler.dump_traceback_later(90, exit=True)  # a hung collective shows its stack instead of timing out mute

from sct_sitehead.training.config import load_config
from sct_sitehead.training.train import train_backbone, train_head

config = load_config("tiny")
config["train"].update(steps=6, log_every=2, checkpoint_every=3)
data, out = Path(sys.argv[1]), Path(sys.argv[2])
backbone = train_backbone(data, out, config)
train_head(data, backbone, "siteB", "spatial", out, config)
"""


@pytest.mark.slow
def test_two_gloo_processes_end_with_identical_weights(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "bids")
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER), encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            str(data),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    model, meta = load_backbone(out / "backbone.safetensors")
    assert len(meta["rank_digests"]) == 2
    assert meta["rank_digests"][0] == meta["rank_digests"][1] == weights_digest(model)
    _, head_meta, _ = load_checkpoint(out / "head-siteB.safetensors", kind="head")
    assert len(head_meta["rank_digests"]) == 2 and len(set(head_meta["rank_digests"])) == 1
    # Only rank 0 logs: one line per logged step, not one per process.
    log = [json.loads(line) for line in (out / "backbone.log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [2, 4, 6]


def test_cases_are_sharded_like_a_distributed_sampler() -> None:
    import numpy as np

    from sct_sitehead.training.data import Case

    lesion = np.zeros((2, 2, 2), np.uint8)
    cases = [
        Case(f"c{i}", "A", np.zeros((2, 2, 2), np.float32), {"lesion": lesion}, np.zeros((0, 3), np.int32), 0.0)
        for i in range(5)
    ]
    space = build_label_space({"A": {"lesion": 0.1}})
    shards = [_shard(cases, space, Context(rank, 2, torch.device("cpu")))[0] for rank in (0, 1)]
    assert [c.name for c in shards[0]] == ["c0", "c2", "c4"] and [c.name for c in shards[1]] == ["c1", "c3"]
    with pytest.raises(TrainingError, match="cannot be shared among 8 processes"):
        _shard(cases, space, Context(7, 8, torch.device("cpu")))


def test_torchrun_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.device.type, ctx.is_main, ctx.distributed) == (0, 1, "cpu", True, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(TrainingError, match="RANK 5 is outside WORLD_SIZE 2"):
        setup("cpu")


def test_devices_resolve_or_say_why_not() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TrainingError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            resolve_device("cuda")

"""Run a cohort's units: in this process (the plain loop), or on Dask (``dask.distributed``): an embedded local
cluster of ``jobs`` worker processes, or an existing cluster at ``scheduler`` (Slurm, PBS, SGE through
dask-jobqueue: docs/COHORTS.md).

On Dask a unit is a task; each worker keeps its segmenter across its scans (:func:`~.work.segmenter_for`) and writes
its outputs atomically. A worker that dies has its tasks rescheduled on another by the scheduler, even one it had
finished (its result died with it), so a scan may run twice: the copies write identical files, the records are
written here from the first result, and the run waits for every copy to stop (:data:`STRAGGLER_WAIT_S`) before
:func:`remove_stale_temps` clears the hidden temp files a dead worker left.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sct_sitehead.cohort.plan import Unit
from sct_sitehead.cohort.work import SegmenterSpec, run_scan, run_unit, segmenter_for, write_record
from sct_sitehead.deploy.qc import add_qc_entries
from sct_sitehead.errors import UsageError

logger = logging.getLogger(__name__)

#: The hidden temp names of sct_sitehead.atomic (``.mask.3f9a0c1d2e4b.tmp.nii.gz``).
_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\..+)?$")
#: How often the QC report is rendered again while a cohort runs (it is also at the end).
QC_EVERY_S = 5.0
#: How long a Dask run waits, once every scan has a result, for late copies of its tasks still running.
STRAGGLER_WAIT_S = 300.0
#: Dask settings of the embedded cluster's workers. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in each
#: worker, and setting it turns off glibc's adaptive mmap threshold: every image-sized array is then mapped and
#: unmapped again, and a sub-ms01 scan took 0.55 s instead of 0.42 s (system time 8 s instead of 2.7 s over 40
#: scans; docs/PERFORMANCE.md). None unsets it. The statistical profiler (every 10 ms) is off: nobody reads it.
LOCAL_WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
}


@dataclass
class Summary:
    """What a cohort run did: records of the scans run (done or failed), the count skipped, and the wall time."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return sum(r.get("Status") == "done" for r in self.records)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("Status") != "done"]

    def line(self) -> str:
        """The final line: scans done, failed, skipped, and scans per minute (of those run, skipped ones aside)."""
        rate = 60.0 * len(self.records) / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.done} scan(s) done, {len(self.failed)} failed, {self.skipped} skipped in {self.seconds:.1f} s "
            f"({rate:.1f} scans/min run)"
        )


def worker_threads(jobs: int, threads: int | None, cores: int | None = None) -> int:
    """ONNX Runtime threads per worker so that ``jobs`` × threads ≤ cores.

    Raises:
        UsageError: ``jobs`` < 1, or ``threads`` given and ``jobs`` × ``threads`` exceeds the cores.
    """
    cores = cores or os.cpu_count() or 1
    if jobs < 1:
        raise UsageError(f"-jobs must be at least 1, got {jobs}")
    if threads is None:
        return max(1, cores // jobs)
    if jobs * threads > cores:
        raise UsageError(f"-jobs {jobs} × -threads {threads} exceeds the {cores} cores; lower one of them")
    return threads


def run_cohort(
    units: Sequence[Unit],
    spec: SegmenterSpec,
    out_dir: Path,
    print_: dict[str, Any],
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    qc_dir: Path | None = None,
    skipped: int = 0,
) -> Summary:
    """Run every unit; a failed scan is recorded and the others go on.

    Args:
        units: the work (:func:`~.plan.split_work`'s first list).
        spec: the segmenter every worker opens.
        jobs: with Dask, worker processes of the embedded local cluster; None and no ``scheduler``: this process.
        scheduler: ``tcp://HOST:PORT`` of a running Dask scheduler.
        qc_dir: the QC report to add the rows to (the pictures are written by whoever runs the scan).
        skipped: how many scans the plan skipped (for the summary line).
    """
    started = time.perf_counter()
    summary = Summary(skipped=skipped)
    qc = _QcRows(qc_dir)
    if jobs is None and scheduler is None:
        records: Iterator[dict[str, Any]] = _in_process(units, spec, out_dir, print_)
    else:
        records = _on_dask(units, spec, out_dir, print_, jobs=jobs, scheduler=scheduler)
    by_image = {str(unit.scan.image): unit for unit in units}
    for record in _progress(records, len(units)):
        write_record(by_image[record["Image"]], record)
        summary.records.append(record)
        qc.add(record.get("Qc") or [])
    qc.flush()
    remove_stale_temps({unit.outputs[site].parent for unit in units for site in unit.outputs})
    summary.seconds = time.perf_counter() - started
    return summary


def _in_process(
    units: Sequence[Unit], spec: SegmenterSpec, out_dir: Path, print_: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    if not units:
        return
    segmenter = segmenter_for(spec)
    for unit in units:
        yield run_unit(segmenter, unit, out_dir, print_)


def _on_dask(
    units: Sequence[Unit],
    spec: SegmenterSpec,
    out_dir: Path,
    print_: dict[str, Any],
    *,
    jobs: int | None,
    scheduler: str | None,
) -> Iterator[dict[str, Any]]:
    dask, distributed = _import_dask()
    if scheduler is not None:
        client = distributed.Client(scheduler)
        cluster = None
    else:
        jobs = jobs or 1
        spec = replace(spec, options=replace(spec.options, threads=worker_threads(jobs, spec.options.threads)))
        with dask.config.set(LOCAL_WORKER_CONFIG):
            cluster = distributed.LocalCluster(
                n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
            )
        client = distributed.Client(cluster)
    try:
        futures = {
            client.submit(run_scan, spec, unit, out_dir, print_, key=f"scan-{unit.scan.stem}", pure=False): unit
            for unit in units
        }
        for future in distributed.as_completed(futures):
            unit = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # a task lost with its workers too often (KilledWorker) or a bug: recorded
                yield {
                    "Image": str(unit.scan.image),
                    "Subject": unit.scan.subject,
                    "Status": "failed",
                    "Error": f"{unit.scan.image}: {type(exc).__name__}: {exc}",
                    "ExitCode": 1,
                }
        _wait_for_stragglers(client, {future.key for future in futures})
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _wait_for_stragglers(client: Any, keys: set[str], wait_s: float = STRAGGLER_WAIT_S) -> None:
    """Wait until no worker runs one of ``keys`` (a finished task recomputed because its worker died).

    The futures are still held, so the scheduler still lists such a task; once they are released it would not,
    though the worker would go on running it.
    """
    deadline = time.monotonic() + wait_s
    while True:
        running = {key for keys_ in client.processing().values() for key in keys_} & keys
        if not running:
            return
        if time.monotonic() > deadline:
            logger.warning("%d scan(s) still running on the cluster after %.0f s: %s", len(running), wait_s, running)
            return
        time.sleep(0.2)


def _import_dask() -> tuple[Any, Any]:
    """``dask`` and ``dask.distributed`` (the ``cohort`` extra), or a usage error that says how to install them."""
    try:
        import dask
        import distributed
    except ImportError:
        raise UsageError(
            "-jobs and -scheduler need Dask: pip install 'sct_sitehead[cohort]' (dask[distributed])"
        ) from None
    return dask, distributed


def _progress(records: Iterator[dict[str, Any]], total: int) -> Iterator[dict[str, Any]]:
    """tqdm over the cohort's scans, on a terminal only, with the failures so far; log lines go above the bar."""
    if not sys.stderr.isatty():
        yield from records
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    failed = 0
    package = logging.getLogger("sct_sitehead")  # where the command line sends the log (cli/logs.py)
    with logging_redirect_tqdm([logging.root, package]), tqdm(total=total, unit="scan", desc="cohort") as bar:
        for record in records:
            if record.get("Status") != "done":
                failed += 1
                bar.set_postfix(failed=failed)
            bar.update(1)
            yield record


class _QcRows:
    """QC rows gathered from the workers' records, added to the report under its lock every few seconds."""

    def __init__(self, qc_dir: Path | None, add: Callable[[Path, list[dict[str, Any]]], Path] = add_qc_entries):
        self.qc_dir, self.add_entries = qc_dir, add
        self.pending: list[dict[str, Any]] = []
        self.last = time.monotonic()

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.pending += rows
        if time.monotonic() - self.last > QC_EVERY_S:
            self.flush(final=False)

    def flush(self, *, final: bool = True) -> None:
        """Add the pending rows; the report's path is logged once, by the final flush, not under the progress bar."""
        if self.qc_dir is not None and self.pending:
            index = self.add_entries(self.qc_dir, self.pending)
            logger.log(logging.INFO if final else logging.DEBUG, "QC: %s", index)
        self.pending, self.last = [], time.monotonic()


def remove_stale_temps(folders: set[Path]) -> int:
    """Remove the hidden temp files a killed writer left in ``folders`` (none is ever a finished output)."""
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _TEMP.match(path.name):
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        logger.info("removed %d temp file(s) left by a stopped worker", removed)
    return removed

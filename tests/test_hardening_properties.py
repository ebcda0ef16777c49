"""The rules of the issue "Hardening", each tested as a property over drawn cases (hypothesis), not only the
reported ones (those are in ``test_hardening.py``):

- never trust a file at rest: damage anywhere in any cached file is found (``cache verify``) and never run;
- never overwrite an input: whatever the names, links and options, no input changes;
- bounded work: a hostile header in a file under 10 MB runs in a child process with a memory limit, and its peak
  resident memory stays under 2 GB;
- a non-finite result is an error: intensities of any magnitude normalise alike, a NaN anywhere in a network's
  output stops the run;
- downloads end by their deadline, whatever the server's pace; no asset may be declared past the maximum;
- one parser for untrusted JSON: depth, repeated keys and non-finite numbers refused wherever they are;
- rollback state is keyed on the registry, not on the spelling of its URL;
- SIGTERM at any moment leaves either every output of a run or none, and no temp file;
- ``-threads`` is bounded by the machine.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image, run_deepseg, sha256_of, write_registry
from hypothesis import HealthCheck, assume, event, given, settings, target
from hypothesis import strategies as st
from test_hardening import AFFINE, MEASURE, child_environment, fetch_in_thread, header_image, served, trickle_site

from sct_sitehead.deploy.normalization import normalize
from sct_sitehead.deploy.prediction import NativeImage, predict_on_grid
from sct_sitehead.deploy.session import check_threads
from sct_sitehead.deploy.windows import WindowSettings
from sct_sitehead.errors import EXIT_TERMINATED, DownloadError, InferenceError, RegistryError, UsageError
from sct_sitehead.registry.audit import audit_cache
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.schema import MAX_ASSET_BYTES, check_asset_sizes
from sct_sitehead.registry.specs import input_spec
from sct_sitehead.registry.trust import canonical_location
from sct_sitehead.registry.untrusted_json import MAX_DEPTH, loads

__all__ = ["served"]  # the fixture, imported for the download properties

FUNCTION_FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


# --- never trust a file at rest -----------------------------------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(pick=st.integers(0, 10**6), where=st.floats(0, 1), length=st.sampled_from([1, 16, 4096]))
def test_damage_anywhere_in_any_cached_file_is_found_and_never_run(
    served, tmp_path_factory, capsys, pick: int, where: float, length: int
) -> None:
    """Every file a run leaves in the cache (assets, optimised graphs and their records, the index copy and its
    signature) is damaged in turn, anywhere: ``cache verify`` names it, and the next run's mask is the undamaged
    one."""
    _, _, url, public, _ = served
    template = Path(os.environ["SCT_SITEHEAD_CACHE"])
    image = template.parent / "property-image" / "t2.nii.gz"
    argv = ["-i", image, "-site", "universal", "-registry", url, "-trust", public, "-v", "0"]
    if not image.exists():
        image.parent.mkdir()
        blob_image(image, affine=AFFINE)
        code, _, err = run_deepseg([*argv, "-ofolder", template.parent / "reference"], capsys)
        assert code == 0, err
    files = sorted(p for kind in ("assets", "ort", "indexes") for p in (template / kind).rglob("*") if p.is_file())
    assert len(files) >= 8  # 2 assets, 2 graphs and their records, the index copy and its signature
    victim = files[pick % len(files)]
    event(victim.parent.name if victim.parent.name in ("ort", "indexes") else "assets")
    cache = tmp_path_factory.mktemp("damaged")
    shutil.copytree(template, cache, dirs_exist_ok=True)
    target = cache / victim.relative_to(template)
    data = bytearray(target.read_bytes())
    start = int(where * max(0, len(data) - 1))
    for index in range(start, min(len(data), start + length)):
        data[index] ^= 0xFF
    target.chmod(0o644)
    target.write_bytes(bytes(data))

    audit = audit_cache(Cache(cache))
    found = [*audit.assets, *(path for path, _ in audit.others)]
    assert target in found, (target, audit)
    os.environ["SCT_SITEHEAD_CACHE"] = str(cache)
    try:
        target.write_bytes(bytes(data))  # damaged again (verify removed it): the run must find it by itself
        out = tmp_path_factory.mktemp("out")
        code, _, err = run_deepseg([*argv, "-ofolder", out], capsys)
    finally:
        os.environ["SCT_SITEHEAD_CACHE"] = str(template)
    assert code == 0, err
    reference = np.asanyarray(nib.load(template.parent / "reference" / "t2_lesionseg.nii.gz").dataobj)
    assert np.array_equal(np.asanyarray(nib.load(out / "t2_lesionseg.nii.gz").dataobj), reference)


# --- never overwrite an input -------------------------------------------------------------------------------------
STEMS = ["a", "a_lesionseg", "a_cordseg", "a_lesionseg_soft", "b", "b_lesionseg_universal"]


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    inputs = draw(st.lists(st.sampled_from(STEMS), min_size=1, max_size=3, unique=True))
    links = draw(st.lists(st.tuples(st.sampled_from(STEMS), st.sampled_from(["symlink", "hardlink"])), max_size=3))
    sites = draw(st.sampled_from([["montreal"], ["universal"], ["montreal", "universal"]]))
    output = draw(st.sampled_from(["none", "-o input", "-o link", "-o fresh", "-ofolder same", "-ofolder link"]))
    return {
        "inputs": inputs,
        "links": links,
        "sites": sites,
        "output": output,
        "soft": draw(st.booleans()),
        "overwrite": draw(st.booleans()),
        "repeat": draw(st.booleans()),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(layout=layouts())
def test_outputs_never_resolve_to_inputs(tiny_registry, capsys, layout: dict) -> None:
    """Inputs named like each other's masks, links (symbolic and hard) to inputs under output names, -o and
    -ofolder pointing at them: every input keeps its bytes, whatever the outcome (success or exit 2)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        inputs = [blob_image(root / f"{stem}.nii.gz", affine=AFFINE, shape=(16, 16, 12)) for stem in layout["inputs"]]
        for stem, how in layout["links"]:
            link, target = root / f"{stem}_lesionseg.nii.gz", inputs[0]
            if not link.exists() and not link.is_symlink():
                link.symlink_to(target) if how == "symlink" else os.link(target, link)
        (root / "same").symlink_to(root)
        before = {path: path.read_bytes() for path in inputs}
        argv = ["-i", *inputs, "-site", ",".join(layout["sites"]), "-registry", tiny_registry, "-v", "0"]
        argv += ["-soft"] * layout["soft"] + ["-overwrite"] * layout["overwrite"]
        output = layout["output"]
        if output == "-o input":
            argv += ["-o", inputs[-1]]
        elif output == "-o link":
            argv += ["-o", root / f"{layout['inputs'][0]}_lesionseg.nii.gz"]
        elif output == "-o fresh":
            argv += ["-o", root / "fresh_mask.nii.gz"]
        elif output != "none":
            argv += ["-ofolder", root if output == "-ofolder same" else root / "same"]
        codes = [run_deepseg(argv, capsys)[0] for _ in range(1 + layout["repeat"])]
        event(f"exit codes {codes}")
        assert set(codes) <= {0, 2}, codes
        for path, data in before.items():
            assert path.read_bytes() == data, path
        assert not [p for p in root.iterdir() if ".tmp" in p.name]


# --- bounded work ---------------------------------------------------------------------------------------------------
SIZES = st.sampled_from([1, 2, 7, 40, 128, 300, 700, 1024, 2048, 4096])
ZOOMS = st.sampled_from([1e-4, 0.01, 0.3, 0.8, 1.0, 3.0, 8.0, 40.0, 500.0])
#: Peak resident memory every run must stay under, and the address-space limit the child runs with (a guard for
#: the test machine: the property is the peak, measured).
PEAK_LIMIT = 2_000_000_000
ADDRESS_LIMIT = 6 << 30


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 14)), deadline=None, suppress_health_check=FUNCTION_FIXTURES
)
@given(
    shape=st.tuples(SIZES, SIZES, SIZES),
    zooms=st.tuples(ZOOMS, ZOOMS, ZOOMS),
    dtype=st.sampled_from([np.uint8, np.int16, np.float32, np.float64]),
    noise=st.booleans(),
    localiser=st.booleans(),
)
def test_hostile_headers_stay_under_2_gb(tmp_path_factory, shape, zooms, dtype, noise, localiser) -> None:
    """Any shape up to the per-axis cap, any voxel size, any data type, compressible voxels: the file stays under
    10 MB, and the run (segmented or refused) peaks under 2 GB in bounded time."""
    voxels_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    assume(voxels_bytes <= 2_200_000_000)  # beyond, the 2 GB float32 cap refuses it from the header alone
    folder = tmp_path_factory.mktemp("hostile")
    block = np.random.default_rng(0).integers(1, 200, 1024).astype(dtype).tobytes() if noise else None
    image = header_image(folder / "hostile.nii.gz", shape, zooms, dtype=dtype, payload=block)
    assume(image.stat().st_size < 10_000_000)
    registry = write_registry(folder / "registry", patch_size=(64, 64, 64), localiser={} if localiser else None)
    argv = ["-i", image, "-site", "universal", "-registry", registry, "-ofolder", folder / "out", "-v", "0"]
    report = folder / "peak.txt"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(report), *map(str, argv)],
        capture_output=True,
        text=True,
        env=child_environment(folder / "cache"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT)),
        timeout=300,
    )
    seconds = time.monotonic() - started
    peak = int(report.read_text()) * 1024
    lines = done.stderr.strip().splitlines()
    event(f"exit {done.returncode}, peak {peak / 1e9:.1f} GB")
    target(peak / 1e9, label="peak GB")  # steer the search towards the largest runs
    assert done.returncode in (0, 3), lines
    assert done.returncode == 0 or len(lines) == 1, lines
    assert peak < PEAK_LIMIT, (peak, seconds, lines)


# --- a non-finite result is an error, not an empty mask -----------------------------------------------------------
@given(exponent=st.integers(-30, 30), seed=st.integers(0, 100))
def test_normalisation_does_not_depend_on_the_intensity_unit(exponent: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    volume = rng.normal(300, 50, (12, 10, 8))
    spec = {"method": "zscore", "clip_percentiles": [0.5, 99.5]}
    reference = normalize(volume.astype(np.float32), spec)
    scaled = normalize((volume * 10.0**exponent).astype(np.float32), spec)
    assert np.all(np.isfinite(scaled))
    np.testing.assert_allclose(scaled, reference, atol=2e-4)


SPEC = input_spec(
    {
        "orientation": "RAS",
        "spacing": [1.0, 1.0, 1.0],
        "patch_size": [8, 8, 8],
        "divisor": 2,
        "normalization": {"method": "zscore"},
    }
)


@given(
    call=st.integers(0, 100),
    index=st.integers(0, 1),
    where=st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(0, 7)),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    channel=st.integers(0, 1),
)
def test_a_non_finite_value_anywhere_in_a_network_output_is_an_inference_error(
    call, index, where, value, channel
) -> None:
    """One NaN or Inf in any call, any window of the batch, any voxel, any channel: the run stops."""
    data = np.random.default_rng(0).normal(100, 10, (16, 12, 10)).astype(np.float32)
    calls: list[int] = []

    def network(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(batch.shape[0])
        return {"site": np.repeat(1 / (1 + np.exp(-batch)), 2, axis=1)}

    windows = WindowSettings(overlap=0.5, batch_size=2)
    clean = predict_on_grid(NativeImage(data, np.eye(4)), SPEC, network, windows)
    assert np.all(np.isfinite(clean.probabilities["site"]))
    chosen, sizes = call % len(calls), list(calls)

    def broken(batch: np.ndarray) -> dict[str, np.ndarray]:
        out = network(batch)["site"]
        if len(calls) - len(sizes) - 1 == chosen:
            out[(index % sizes[chosen], channel, *where)] = value
        return {"site": out}

    with pytest.raises(InferenceError, match="NaN or infinite"):
        predict_on_grid(NativeImage(data, np.eye(4)), SPEC, broken, windows)


# --- downloads end; sizes are bounded -----------------------------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(chunk=st.sampled_from([1, 64, 4096]), pause=st.sampled_from([0.01, 0.05, 0.2]))
def test_every_download_ends_by_its_deadline(served, tmp_path_factory, chunk: int, pause: float) -> None:
    asset, server = trickle_site(served, (chunk, pause))
    cache = Cache(tmp_path_factory.mktemp("c"), retries=2, backoff=0.0, deadline=2.0, timeout=(2.0, 1.0))
    started = time.monotonic()
    error = fetch_in_thread(cache, asset, within=10)
    took = time.monotonic() - started
    server.throttle = None
    assert error is None or isinstance(error, DownloadError), error
    assert took < 2.0 + 1.0 + 0.5, took  # the deadline, one read timeout, slack
    if error is None:
        assert sha256_of(cache.asset_path(asset.sha256)) == asset.sha256


@given(size=st.one_of(st.integers(1, 2 * MAX_ASSET_BYTES), st.just(MAX_ASSET_BYTES), st.just(MAX_ASSET_BYTES + 1)))
def test_asset_sizes_are_bounded_by_the_documented_maximum(size: int) -> None:
    release = {"backbone": {"size": 100}, "heads": {"x": {"size": 100}}}
    release["heads"]["x"]["size"] = size
    if size > MAX_ASSET_BYTES:
        with pytest.raises(RegistryError, match="maximum"):
            check_asset_sizes(release, "r")
    else:
        check_asset_sizes(release, "r")


# --- one parser for untrusted JSON ----------------------------------------------------------------------------------
KEYS = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=5)
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False, allow_infinity=False), KEYS
)
DOCUMENTS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=30,
)


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


@given(document=DOCUMENTS, extra=st.integers(0, 200))
def test_untrusted_json_reads_what_json_writes_up_to_the_depth_limit(document: object, extra: int) -> None:
    wrapped: object = document
    for _ in range(extra):
        wrapped = [wrapped]
    text = json.dumps(wrapped)
    if depth(wrapped) <= MAX_DEPTH:
        assert loads(text, "test") == json.loads(text)
    else:
        with pytest.raises(RegistryError, match="levels deep"):
            loads(text, "test")


def emit(value: object, inject: tuple[str, int], counter: list[int]) -> str:
    """``value`` as JSON text, with one place changed as ``inject`` = (kind, n) says: the n-th non-empty object
    gives its first key twice (``"duplicate"``), or the n-th number is replaced by ``kind`` (a non-finite one).
    ``counter`` counts [objects, numbers] seen."""
    kind, which = inject
    if isinstance(value, dict) and value:
        mine = counter[0]
        counter[0] += 1
        parts = [f"{json.dumps(k)}: {emit(v, inject, counter)}" for k, v in value.items()]
        if kind == "duplicate" and mine == which:
            parts.append(parts[0])
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(emit(v, inject, counter) for v in value) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        counter[1] += 1
        if kind != "duplicate" and counter[1] - 1 == which:
            return kind
    return json.dumps(value)


@given(
    document=DOCUMENTS.filter(lambda d: depth(d) <= MAX_DEPTH),
    kind=st.sampled_from(["duplicate", "NaN", "Infinity", "-Infinity", "1e999", "-1e400"]),
    which=st.integers(0, 1000),
)
def test_untrusted_json_refuses_repeated_keys_and_non_finite_numbers_anywhere(document, kind, which) -> None:
    counts = [0, 0]
    emit(document, ("count", -1), counts)
    available = counts[0] if kind == "duplicate" else counts[1]
    assume(available > 0)
    text = emit(document, (kind, which % available), [0, 0])
    with pytest.raises(RegistryError, match="more than once|not finite"):
        loads(text, "test")


# --- rollback state is keyed on the registry --------------------------------------------------------------------
@given(
    host=st.sampled_from(["127.0.0.1", "localhost", "LOCALHOST", "127.0.0.2", "[::1]"]),
    port=st.sampled_from(["", ":80", ":8080"]),
    slashes=st.sampled_from(["/", "//", "/./", "/x/../", "/./x/../"]),
    query=st.sampled_from(["", "?"]),
    fragment=st.sampled_from(["", "#top"]),
    escape=st.booleans(),
    scheme=st.sampled_from(["http", "HTTP"]),
)
def test_rollback_state_does_not_depend_on_the_spelling_of_the_url(
    host, port, slashes, query, fragment, escape, scheme
) -> None:
    name = "%72egistry.json" if escape else "registry.json"
    spelled = f"{scheme}://{host}{port}/reg{slashes}{name}{query}{fragment}"
    plain = f"http://127.0.0.1{port}/reg/registry.json"
    assert canonical_location(spelled) == canonical_location(plain), spelled
    other = urllib.parse.urljoin(plain, "/other/registry.json")
    assert canonical_location(other) != canonical_location(plain)
    assert canonical_location(plain + "?v=2") != canonical_location(plain)


# --- SIGTERM at any moment -------------------------------------------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(delay=st.floats(0.0, 4.0))
def test_sigterm_at_any_moment_leaves_all_outputs_or_none(tmp_path_factory, delay: float) -> None:
    folder = tmp_path_factory.mktemp("term")
    registry = write_registry(folder / "registry")
    image = blob_image(folder / "t2.nii.gz", affine=AFFINE, shape=(64, 64, 48))
    out = folder / "out"
    command = [sys.executable, "-m", "sct_sitehead.cli.deepseg_lesion", "-i", str(image), "-site", "universal"]
    command += ["-soft", "-registry", str(registry), "-ofolder", str(out), "-v", "0"]
    worker = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=child_environment(folder / "cache"))
    time.sleep(delay)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    event(f"exit {worker.returncode}")
    assert worker.returncode in (0, EXIT_TERMINATED, -signal.SIGTERM), err
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [name for name in names if ".tmp" in name], names
    complete = ["t2_cordseg.nii.gz", "t2_lesionseg.json", "t2_lesionseg.nii.gz", "t2_lesionseg_soft.nii.gz"]
    assert names in ([], complete), names
    if worker.returncode == EXIT_TERMINATED:
        assert err.strip().splitlines() == ["sct_deepseg_lesion: terminated (SIGTERM); no partial output was left"]


# --- -threads is bounded by the machine -----------------------------------------------------------------------------
@given(threads=st.one_of(st.integers(-5, 2 * (os.cpu_count() or 1)), st.integers(10**3, 2**64)))
def test_threads_are_bounded_by_the_machine(threads: int) -> None:
    if 1 <= threads <= (os.cpu_count() or 1):
        check_threads(threads)
    else:
        with pytest.raises(UsageError, match="the CPUs of this machine"):
            check_threads(threads)

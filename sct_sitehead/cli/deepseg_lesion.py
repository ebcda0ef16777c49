"""``sct_deepseg_lesion``: segment spinal cord lesions with a site's head.

argparse rather than click here: SCT's tools take single-dash long options and ``-i FILE [FILE ...]``
(nargs='+'), which argparse supports natively, and it keeps ``-h`` free of any third-party import.
Nothing heavy (numpy, nibabel, onnxruntime, scipy) is imported before the arguments are parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from sct_sitehead.cli.logs import configure_logging
from sct_sitehead.cohort.scans import expand_inputs
from sct_sitehead.deploy.naming import plan_outputs
from sct_sitehead.deploy.options import Options
from sct_sitehead.errors import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    InputImageError,
    SiteHeadError,
    Terminated,
    UsageError,
)
from sct_sitehead.settings import ModelSource, resolve_sites
from sct_sitehead.version import __version__

if TYPE_CHECKING:
    from sct_sitehead.registry.index import Registry
    from sct_sitehead.registry.specs import Release

PROG = "sct_deepseg_lesion"
logger = logging.getLogger("sct_sitehead")

EPILOG = """\
exit codes: 0 success, 2 usage, 3 bad input image (or over the memory limit), 4 unknown model or site, 5 bad or
untrusted registry, 6 download failed, 7 integrity (sha256/size) failure, 8 missing from cache while offline,
9 cannot write output or cache, 10 inference failed, 130 interrupted, 143 terminated (SIGTERM).

environment: SCT_SITEHEAD_SITE (default -site), SCT_SITEHEAD_REGISTRY (default -registry),
SCT_SITEHEAD_OFFLINE=1 (like -offline), SCT_SITEHEAD_CACHE (cache folder), SCT_SITEHEAD_ALLOW_HTTP=1,
SCT_SITEHEAD_MAX_MEMORY (default -max-memory), SCT_SITEHEAD_DOWNLOAD_TIMEOUT (seconds per model file).

contrast: an input's contrast is its file name's BIDS suffix (_T2w, _T2star, _T1w, _MTS, _FLAIR, ...), else the
"Contrast" field of its JSON sidecar <stem>.json, else unknown. A known contrast that a head was not trained on
(-list-sites shows each head's) gives a one-line warning; the run goes on. The sidecar records it (ContrastMatch).

example: sct_deepseg_lesion -i t2.nii.gz -site montreal -qc qc/
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see -h)\n")
        raise SystemExit(UsageError.exit_code)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Segment spinal cord lesions with a shared backbone and a site's head "
        "(models fetched from a release registry, verified and cached).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    inputs = parser.add_argument_group("input and output")
    inputs.add_argument("-i", nargs="+", type=Path, metavar="FILE", help="input NIfTI image(s), 3D")
    inputs.add_argument("-o", type=Path, metavar="FILE", help="output mask (one input and one site only)")
    inputs.add_argument("-ofolder", type=Path, metavar="DIR", help="output folder (default: next to each input)")
    inputs.add_argument("-soft", action="store_true", help="also write the lesion probability map (_soft)")
    inputs.add_argument("-qc", type=Path, metavar="DIR", help="write a QC picture per input and an HTML index")
    inputs.add_argument(
        "-qc-subject",
        dest="qc_subject",
        metavar="SUBJECT",
        help="subject the QC rows are filed under (default: the file name's sub- entity, else its stem)",
    )
    inputs.add_argument(
        "-overwrite",
        action="store_true",
        help="replace the outputs of an earlier run (those its sidecar names); other files are never replaced",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "-site",
        metavar="NAME[,NAME...]",
        help="site head(s); 'universal' is the pooled head (default: $SCT_SITEHEAD_SITE)",
    )
    model.add_argument("-model", metavar="NAME[@VERSION]", help="model (default: the registry's default, latest)")
    model.add_argument("-thr", type=float, metavar="T", help="probability threshold (default: from the release)")
    model.add_argument(
        "-min-lesion",
        type=float,
        metavar="MM3",
        dest="min_lesion",
        help="drop lesions smaller than this volume, mm³; 0 keeps all (default: from the release)",
    )
    model.add_argument(
        "-no-crop",
        action="store_true",
        help="run the lesion model on the whole image, not only around the cord the release's localiser finds",
    )
    model.add_argument(
        "-tta",
        action="store_true",
        help="also run the lesion model on the left-right mirrored image and average the two (it runs twice)",
    )
    model.add_argument("-registry", metavar="URL_OR_PATH", help="registry index (default: the embedded one)")
    model.add_argument("-offline", action="store_true", help="no network at all: use the cache only")
    model.add_argument("-allow-http", action="store_true", help="allow plain http:// to hosts other than loopback")
    model.add_argument(
        "-trust", action="append", type=Path, metavar="KEYFILE", help="also trust this ed25519 public key (repeatable)"
    )
    model.add_argument("-allow-unsigned", action="store_true", help="accept an unsigned remote registry index")
    model.add_argument("-list-sites", action="store_true", help="list the model's sites and exit")
    model.add_argument("-list-models", action="store_true", help="list the registry's models and exit")

    run = parser.add_argument_group("execution")
    run.add_argument("-device", default="auto", metavar="auto|cpu|cuda[:N]", help="where to run (default: auto)")
    run.add_argument("-threads", type=int, metavar="N", help="CPU threads for inference (default: all)")
    run.add_argument(
        "-max-memory",
        dest="max_memory",
        metavar="SIZE",
        help="memory one image's run may plan to use, e.g. 4G; larger runs are refused before they start "
        "(default: $SCT_SITEHEAD_MAX_MEMORY, else 2G)",
    )
    run.add_argument("-v", type=int, choices=(0, 1, 2), default=1, help="verbosity: 0 quiet, 1 info, 2 debug")
    run.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    run.add_argument("-version", action="version", version=f"%(prog)s {__version__}")
    return parser


def list_models(registry: Registry) -> None:
    for name in registry.models():
        versions = registry.versions(name)
        marker = " (default)" if name == registry.default_model else ""
        print(f"{name}{marker}: {', '.join(versions)}")


def list_sites(release: Release) -> None:
    """One line per site: its name, head strategy, labels and the contrasts its head was trained on."""
    for site, head in sorted(release.heads.items()):
        labels = ", ".join(label.name for label in head.labels)
        contrasts = f"trained on {', '.join(head.contrasts)}" if head.contrasts else "contrasts not recorded"
        print(f"{site}\t{head.strategy}\t{labels}\t{contrasts}")


def check_inputs(paths: list[Path]) -> None:
    """Fail before downloading anything when an input plainly cannot be read (missing, broken link, folder)."""
    # The deploy modules that import numpy (nifti, pipeline, qc) load here, not at the top: numpy would take
    # `sct_deepseg_lesion -h` from 0.12 to 0.35 s on 2 cores, over its 0.3 s budget, and -h needs none of them.
    from sct_sitehead.deploy.nifti import check_input_path

    for path in paths:
        check_input_path(path)


def run(args: argparse.Namespace) -> int:
    from sct_sitehead.deploy.budget import parse_size, resolve_limit
    from sct_sitehead.deploy.output_check import check_outputs
    from sct_sitehead.deploy.pipeline import Segmenter  # numpy, scipy and nibabel: see check_inputs
    from sct_sitehead.deploy.qc import add_qc_entries, subject_of
    from sct_sitehead.deploy.session import check_threads

    source = ModelSource.resolve(
        args.registry,
        offline=args.offline,
        allow_http=args.allow_http,
        trust=args.trust or (),
        allow_unsigned=args.allow_unsigned,
    )
    registry, cache = source.open()
    if args.list_models:
        list_models(registry)
        return 0
    # The registry brings urllib and jsonschema: -h must not pay for them (0.05 s against 0.14 s).
    from sct_sitehead.registry.index import parse_model_spec

    model_name, version = parse_model_spec(args.model) if args.model else (None, None)
    release = registry.release(model_name, version)
    if args.list_sites:
        list_sites(release)
        return 0
    if not args.i:
        raise UsageError("the following argument is required: -i")
    sites = resolve_sites(args.site)
    if not sites:
        raise UsageError(f"no site given; use -site NAME with one of: {', '.join(sorted(release.heads))}")
    for site in sites:
        release.head(site)
    check_threads(args.threads, "-threads")
    # SCT_SITEHEAD_MAX_MEMORY is checked here too, before anything is fetched.
    max_memory = resolve_limit(parse_size(args.max_memory) if args.max_memory is not None else None)
    if args.thr is not None and not 0.0 < args.thr < 1.0:
        raise UsageError(f"-thr must be between 0 and 1, got {args.thr}")
    if args.min_lesion is not None and not 0.0 <= args.min_lesion < float("inf"):
        raise UsageError(f"-min-lesion must be a volume in mm³, 0 or more, got {args.min_lesion}")
    args.i = expand_inputs(args.i)  # folders -> their images; our own masks are never inputs
    check_inputs(args.i)
    plan = plan_outputs(args.i, sites, args.o, args.ofolder)
    labels = {site: [label.name for label in release.head(site).labels] for site in sites}
    check_outputs(plan, labels, soft=args.soft, qc_dir=args.qc, overwrite=args.overwrite)
    options = Options(
        threshold=args.thr,
        min_lesion_mm3=args.min_lesion,
        soft=args.soft,
        device=args.device,
        threads=args.threads,
        qc_dir=args.qc,
        crop=not args.no_crop,
        mirror=args.tta,
        max_memory=max_memory,
    )
    segmenter = Segmenter.open(
        release,
        sites,
        cache,
        options,
        offline=source.offline,
        progress=sys.stderr.isatty(),
        allow_http=source.allow_http,
    )
    failures: list[SiteHeadError] = []
    qc_entries: list[dict[str, Any]] = []
    for image in args.i:
        try:
            outputs = {site: plan[(image, site)] for site in sites}
            result = segmenter.write(segmenter.segment(image), image, outputs, qc_subject=args.qc_subject)
        except InputImageError as exc:
            # A pipeline over many subjects goes on past one bad image; the exit code still reports it.
            sys.stderr.write(f"{PROG}: error: {exc if str(image) in str(exc) else f'{image}: {exc}'}\n")
            failures.append(exc)
            continue
        for site_result in result.sites:
            logger.info(
                "%s [%s]: %d lesion(s), %.1f mm3 -> %s (%.1f s)",
                image,
                site_result.site,
                site_result.lesion_count,
                site_result.lesion_volume_mm3,
                site_result.mask,
                result.seconds,
            )
            if args.qc is not None:
                qc_entries.append(
                    {
                        "subject": args.qc_subject or subject_of(image),
                        "image": str(image),
                        "release": f"{release.model}@{release.version}",
                        "site": site_result.site,
                        "png": site_result.files[-1].name,
                        "lesions": site_result.lesion_count,
                        "volume_mm3": site_result.lesion_volume_mm3,
                    }
                )
    if args.qc is not None and qc_entries:
        index = add_qc_entries(args.qc, qc_entries)  # under a lock: runs sharing one report add their rows
        logger.info("QC: %s", index)
    return failures[0].exit_code if failures else 0


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM (``timeout``, Slurm, ``docker stop``) raises :class:`Terminated` in the main thread, so the run unwinds
    as it does on Ctrl-C and removes its temporary files; its default action would kill the process on the spot.
    Outside the main thread (a caller's worker) nothing is changed."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (documented in the README and in ``-h``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.v)
    try:
        with sigterm_raises():
            return run(args)
    except SiteHeadError as exc:
        if args.v >= 2:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code
    except Terminated:
        sys.stderr.write(f"{PROG}: terminated (SIGTERM); no partial output was left\n")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; no partial output was left\n")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.v >= 2:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: unexpected error: {type(exc).__name__}: {exc} (run with -v 2 for details)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""One exception hierarchy; the command-line tools map each class to an exit code here.

Every class is also a builtin exception, so callers may catch ``ValueError`` or
``OSError`` without knowing this package.
"""

from __future__ import annotations


class SiteHeadError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UsageError(SiteHeadError, ValueError):
    """Bad command-line arguments or option combination."""

    exit_code = 2


class InputImageError(SiteHeadError, ValueError):
    """The input image cannot be read or is not something the model can segment."""

    exit_code = 3


class UnknownModelError(SiteHeadError, LookupError):
    """The model, version or site is not in the registry."""

    exit_code = 4


class RegistryError(SiteHeadError, ValueError):
    """The registry index or a release manifest is malformed, unsupported or untrusted."""

    exit_code = 5


class DownloadError(SiteHeadError, OSError):
    """A file could not be fetched from any mirror (network, HTTP status, timeouts)."""

    exit_code = 6


class HTTPStatusError(DownloadError):
    """The server answered with an HTTP status that another attempt would not change (4xx); see ``status``."""

    status: int = 0


class IntegrityError(SiteHeadError, ValueError):
    """A file's size or sha256 differs from what the registry declares."""

    exit_code = 7


class OfflineError(SiteHeadError, LookupError):
    """Offline mode is on and something needed is not in the cache."""

    exit_code = 8


class OutputError(SiteHeadError, OSError):
    """An output file or the cache cannot be written (permissions, full disk)."""

    exit_code = 9


class InferenceError(SiteHeadError, RuntimeError):
    """ONNX Runtime failed on a model that passed its checks (device, memory)."""

    exit_code = 10


class TrainingError(SiteHeadError, RuntimeError):
    """Training, export or publishing cannot proceed (bad data, bad config)."""

    exit_code = 11


#: Exit code used when the user interrupts (Ctrl-C), as shells do for SIGINT.
EXIT_INTERRUPTED = 130
#: Exit code used when the process is asked to stop (SIGTERM: ``timeout``, Slurm, ``docker stop``), as shells do.
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that it unwinds like Ctrl-C: temporary files are removed."""


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        UsageError,
        InputImageError,
        UnknownModelError,
        RegistryError,
        DownloadError,
        IntegrityError,
        OfflineError,
        OutputError,
        InferenceError,
        TrainingError,
    )
}

"""Options shared by the ``sct_sitehead`` commands: help names, verbosity, registry and trust."""

from __future__ import annotations

from pathlib import Path

import click

from sct_sitehead.cli.logs import configure_logging

# -help as well: sct_deepseg_lesion and SCT's other tools take single-dash long options.
CONTEXT = {"help_option_names": ["-h", "-help", "--help"], "max_content_width": 110}


def _verbosity(ctx: click.Context, _param: click.Parameter, value: int) -> int:
    configure_logging(value)
    ctx.meta["verbosity"] = value
    return value


verbosity_option = click.option(
    "-v",
    "verbosity",
    type=click.IntRange(0, 2),
    default=1,
    show_default=True,
    expose_value=False,
    callback=_verbosity,
    is_eager=True,
    help="0 quiet, 1 info, 2 debug (and tracebacks)",
)
registry_option = click.option(
    "-registry", "registry", metavar="URL_OR_PATH", help="registry index (default: embedded)"
)
offline_option = click.option("-offline", is_flag=True, help="no network at all: use the cache only")


trust_option = click.option(
    "-trust",
    "trust",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="also trust this ed25519 public key (repeatable)",
)
unsigned_option = click.option(
    "-allow-unsigned", "allow_unsigned", is_flag=True, help="accept an unsigned remote registry index"
)

"""``sct_sitehead``: models, cache and registry administration; the model-building commands come from
:mod:`sct_sitehead.cli.build`.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import click

from sct_sitehead import env
from sct_sitehead.cli import bids_app, build
from sct_sitehead.cli.options import (
    CONTEXT,
    offline_option,
    registry_option,
    trust_option,
    unsigned_option,
    verbosity_option,
)
from sct_sitehead.errors import EXIT_INTERRUPTED, IntegrityError, SiteHeadError, UsageError
from sct_sitehead.registry.asset_names import name_cached_assets
from sct_sitehead.registry.audit import audit_cache
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import parse_model_spec
from sct_sitehead.registry.server import serve
from sct_sitehead.registry.signing import generate_keypair, sign_index
from sct_sitehead.settings import ModelSource, parse_sites
from sct_sitehead.version import __version__

logger = logging.getLogger("sct_sitehead")


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-version", prog_name="sct_sitehead")
def cli() -> None:
    """Shared-backbone, per-site-head lesion models: fetch, cache, serve, build and evaluate them."""


# --- models ---------------------------------------------------------------------------------------------------
@cli.group()
def models() -> None:
    """List and pre-fetch models."""


@models.command("list")
@registry_option
@offline_option
@trust_option
@unsigned_option
@verbosity_option
def models_list(registry: str | None, offline: bool, trust: tuple[Path, ...], allow_unsigned: bool) -> None:
    """List models, their releases and their sites."""
    index, _ = ModelSource.resolve(registry, offline=offline, trust=trust, allow_unsigned=allow_unsigned).open()
    for name in index.models():
        for version in index.versions(name):
            release = index.release(name, version)
            default = " (default)" if name == index.default_model else ""
            click.echo(f"{name}@{version}{default}: sites {', '.join(sorted(release.heads))}")


@models.command("install")
@click.argument("model", required=False)
@click.option("-site", "sites", metavar="A,B", help="site heads to fetch (default: all of the release's)")
@registry_option
@trust_option
@unsigned_option
@verbosity_option
def models_install(
    model: str | None, sites: str | None, registry: str | None, trust: tuple[Path, ...], allow_unsigned: bool
) -> None:
    """Pre-fetch MODEL[@VERSION] (backbone and site heads) into the cache, for later offline use."""
    source = ModelSource.resolve(registry, trust=trust, allow_unsigned=allow_unsigned)
    index, cache = source.open()
    name, version = parse_model_spec(model) if model else (None, None)
    release = index.release(name, version)
    wanted = parse_sites(sites) or sorted(release.heads)
    heads = [release.head(site) for site in wanted]
    progress = sys.stderr.isatty()
    allow_http = source.allow_http
    path = cache.fetch(release.backbone, offline=False, progress=progress, allow_http=allow_http)
    click.echo(f"backbone {release.backbone.sha256[:12]} {path}")
    if release.localiser is not None:
        for asset in (release.localiser.backbone, release.localiser.head):
            path = cache.fetch(asset, offline=False, progress=progress, allow_http=allow_http)
            click.echo(f"{asset.name} {asset.sha256[:12]} {path}")
    for head in heads:
        path = cache.fetch(head.asset, offline=False, progress=progress, allow_http=allow_http)
        click.echo(f"{head.site} {head.asset.sha256[:12]} {path}")
    click.echo(f"{release.model}@{release.version}: {len(heads)} site(s) cached in {cache.root}")


# --- cache ----------------------------------------------------------------------------------------------------
@cli.group()
def cache() -> None:
    """Inspect, verify and clean the model cache."""


@cache.command("dir")
def cache_dir() -> None:
    """Print the cache folder ($SCT_SITEHEAD_CACHE or the platform user cache)."""
    click.echo(str(env.cache_dir()))


@cache.command("list")
@verbosity_option
def cache_list() -> None:
    """List cached assets: sha256, size, path, and what each is (model, version, backbone, localiser or site head),
    from the embedded index and the cached copies of remote indexes."""
    cache = Cache(env.cache_dir())
    entries = cache.list()
    names = name_cached_assets(cache.root, [entry["sha256"] for entry in entries])
    for entry in entries:
        click.echo(f"{entry['sha256']}  {entry['size']:>12}  {entry['path']}  {names[entry['sha256']]}")
    click.echo(f"{len(entries)} asset(s), {sum(e['size'] for e in entries)} bytes")


@cache.command("verify")
@verbosity_option
def cache_verify() -> None:
    """Check every cached file: assets against their sha256, optimised graphs against their recorded sha256, index
    copies against the schema and their signature; remove what fails (it is fetched or made again when needed)."""
    audit = audit_cache(Cache(env.cache_dir()))
    for path in audit.assets:
        click.echo(f"removed corrupt asset {path}")
    for path, problem in audit.others:
        click.echo(f"removed damaged file {path}: {problem}")
    for path, note in audit.notes:
        click.echo(f"not checked: {path}: {note}")
    counts = ", ".join(f"{count} {kind}" for kind, count in audit.checked.items())
    if audit.clean:
        click.echo(f"all cached assets verified ({counts})")
        return
    click.echo(f"{len(audit.assets)} corrupt asset(s) removed, {len(audit.others)} other damaged file(s) removed")
    sys.exit(IntegrityError.exit_code)


@cache.command("clean")
@verbosity_option
def cache_clean() -> None:
    """Delete every cached asset and index copy (the next run downloads again)."""
    freed = Cache(env.cache_dir()).clean()
    click.echo(f"freed {freed} bytes")


# --- registry -------------------------------------------------------------------------------------------------
@cli.group()
def registry() -> None:
    """Host and check release registries."""


@registry.command("serve")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-port", default=8000, show_default=True, help="TCP port")
@click.option("-host", default="127.0.0.1", show_default=True, help="address to listen on")
@verbosity_option
def registry_serve(directory: Path, port: int, host: str) -> None:
    """Serve DIRECTORY (a registry index and its assets) over HTTP, with Range support, as a site mirror."""
    click.echo(f"serving {directory} on http://{host}:{port}/ (Ctrl-C to stop)")
    serve(directory, port=port, host=host)


@registry.command("keygen")
@click.argument("private", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("public", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-force", is_flag=True, help="replace existing key files")
@verbosity_option
def registry_keygen(private: Path, public: Path, force: bool) -> None:
    """Make an ed25519 key pair for signing registry indexes (keep PRIVATE secret; give PUBLIC to sites)."""
    key_id = generate_keypair(private, public, force=force)
    click.echo(f"key {key_id}: private {private} (keep it secret), public {public}")


@registry.command("sign")
@click.argument("index", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-key",
    "key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="ed25519 private key (PEM)",
)
@verbosity_option
def registry_sign(index: Path, key: Path) -> None:
    """Sign a registry index: writes INDEX.sig next to it."""
    click.echo(f"signature: {sign_index(index, key)}")


for command in [*build.COMMANDS, *bids_app.COMMANDS]:
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Entry point; maps the package's errors to the exit codes documented in the README."""
    try:
        cli.main(args=argv, prog_name="sct_sitehead", standalone_mode=False)
        return 0
    except click.UsageError as exc:
        if type(exc).__name__.startswith("NoArgsIsHelp"):  # a bare group invocation shows its help, exit 0
            click.echo(exc.format_message())
            return 0
        sys.stderr.write(f"sct_sitehead: error: {exc.format_message()} (see -h)\n")
        return UsageError.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        sys.stderr.write(f"sct_sitehead: error: {exc.format_message()}\n")
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except SiteHeadError as exc:
        if logging.getLogger("sct_sitehead").level <= logging.DEBUG:
            traceback.print_exc()
        sys.stderr.write(f"sct_sitehead: error: {exc}\n")
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        sys.stderr.write("sct_sitehead: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

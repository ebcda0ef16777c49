"""QC pictures: one PNG per input and site (axial and sagittal mosaics zoomed on the cord, lesions outlined in red),
and an HTML index that grows: many runs, in many processes, add their rows to one report folder (as SCT's ``-qc``).

Display conventions: the image is reoriented to RAS (exact axis flips and permutations), axial tiles are shown
radiologically (patient's right on the picture's left, anterior up), sagittal tiles with anterior on the left and
superior up; pixels are stretched to the voxel sizes so anatomy keeps its proportions.
"""

from __future__ import annotations

import html
import io
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from sct_sitehead.atomic import write_atomic, write_json_atomic
from sct_sitehead.deploy.spatial import nonzero_bounds
from sct_sitehead.errors import OutputError, RegistryError, UsageError
from sct_sitehead.registry import untrusted_json

if TYPE_CHECKING:
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

AXIAL_TILES = 12
AXIAL_COLUMNS = 6
SAGITTAL_TILES = 5
#: Largest tile sizes (width, height) in pixels; sagittal tiles are taller because the cord runs along S-I.
TILE_PX = 180
AXIAL_BOX = (TILE_PX, TILE_PX)
SAGITTAL_BOX = (220, 400)
#: Intensity window, in percentiles of the whole image.
WINDOW_PERCENTILES = (1.0, 99.5)
#: Spacing of the sagittal slices around the centre when there is no lesion to show.
SAGITTAL_STEP_MM = 2.0
OVERLAY_RGB = (255, 0, 0)
OVERLAY_ALPHA = 0.5
#: Lesion outline width in picture pixels: an outline leaves the lesion's own signal visible inside it.
OUTLINE_PX = 2
#: Extra native voxels kept around the zoom box on each side.
ZOOM_MARGIN_VOXELS = 4
#: Millimetres kept around the found cord (and any lesion) in a picture zoomed on the cord: the CSF and a rim.
CORD_MARGIN_MM = 8.0
#: Side of the square each axial tile shows around the cord, in mm (the cord is about 8 x 12 mm).
AXIAL_FOV_MM = 32.0
#: The report's rows, one per (subject, image, site, release); index.html is rendered from it under a lock.
ENTRIES_FILE = "entries.json"
LOCK_FILE = ".index.lock"
MARGIN = 6
TITLE_PX = 22


def write_qc(
    image: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    out_png: Path,
    title: str,
    box: Sequence[tuple[int, int]] | None = None,
    cord: np.ndarray | None = None,
) -> Path:
    """Write the QC picture of one segmentation.

    Axial slices are those holding lesions (evenly sampled when there are more than :data:`AXIAL_TILES`), or
    slices spread over the middle of the cord's extent when there is none; sagittal slices go through the lesions
    or, without lesions, around the centre of the field of view. With a cord mask, each axial tile is a square of
    :data:`AXIAL_FOV_MM` centred on the cord in its slice (the nearest slice's where it has none), grown to hold
    the slice's lesions.

    Args:
        image: (X, Y, Z) image on its native grid.
        mask: (X, Y, Z) bool lesion mask on the same grid.
        affine: (4, 4) native voxel-to-world affine.
        out_png: output path (written atomically).
        title: text written above the mosaics.
        box: native voxel box ``((x0, x1), (y0, y1), (z0, z1))`` to zoom on (the cord the localiser found);
            None: the whole field of view.
        cord: (X, Y, Z) bool cord mask on the same grid, to centre the axial tiles on; None: whole axial slices
            (of ``box``).

    Returns:
        ``out_png``.

    Raises:
        UsageError: shapes differ or are not 3D.
        OutputError: the picture cannot be written.
    """
    from PIL import Image

    image = np.asarray(image)
    mask = np.asarray(mask).astype(bool, copy=False)
    if image.ndim != 3 or image.shape != mask.shape:
        raise UsageError(f"QC needs a 3D image and a mask of the same shape, got {image.shape} and {mask.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    cord = np.zeros(mask.shape, dtype=bool) if cord is None else np.asarray(cord).astype(bool, copy=False)
    if cord.shape != mask.shape:
        raise UsageError(f"QC needs a cord mask of the image's shape {mask.shape}, got {cord.shape}")
    starts = [0, 0, 0]
    if box is not None:
        (image, mask, cord), affine, starts = zoom_to_box([image, mask, cord], affine, box)
    (volume, lesions, cord), zooms, native_index = _to_ras([image, mask, cord], affine, starts)
    low, high = (float(v) for v in np.percentile(volume, WINDOW_PERCENTILES))
    window = (low, high if high > low else low + 1.0)

    axial: list[PILImage.Image] = []
    for z in _pick_slices(lesions, 2, AXIAL_TILES, spread=0.8, zoom=zooms[2]):
        across, down = _axial_square(cord, lesions[:, :, z], z, tuple(float(v) for v in zooms))
        axial.append(
            _tile(
                volume[across, down, z].T[::-1, ::-1],
                lesions[across, down, z].T[::-1, ::-1],
                (zooms[1], zooms[0]),
                window,
                native_index(2, z),
                AXIAL_BOX,
            )
        )
    sagittal = [
        _tile(
            volume[x].T[::-1, ::-1],
            lesions[x].T[::-1, ::-1],
            (zooms[2], zooms[1]),
            window,
            native_index(0, x),
            SAGITTAL_BOX,
        )
        for x in _pick_slices(lesions, 0, SAGITTAL_TILES, spread=None, zoom=zooms[0])
    ]
    _letters(axial[0], left="R", top="A")
    _letters(sagittal[0], left="A", top="S")
    rows = [_grid(axial, AXIAL_COLUMNS), _grid(sagittal, SAGITTAL_TILES)]
    width = max(row.width for row in rows) + 2 * MARGIN
    height = TITLE_PX + sum(row.height + MARGIN for row in rows) + MARGIN
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    _text(canvas, (MARGIN, 4), title)
    top = TITLE_PX
    for row in rows:
        canvas.paste(row, (MARGIN, top))
        top += row.height + MARGIN
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    out_png = Path(out_png)
    write_atomic(out_png, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    logger.debug("QC picture %s (%dx%d)", out_png, width, height)
    return out_png


def qc_box(
    masks: Sequence[np.ndarray],
    boxes: Sequence[Sequence[tuple[int, int]] | None],
    zooms: Sequence[float],
    fallback: Sequence[tuple[int, int]] | None,
) -> Sequence[tuple[int, int]] | None:
    """The native voxel box to zoom a QC picture on: every voxel of ``masks`` (the lesions, a cord) and every box
    given (the cord the localiser found), plus :data:`CORD_MARGIN_MM` on each side, clipped to the image.

    Args:
        masks: (X, Y, Z) bool masks on the image's grid (at least one, for the shape).
        boxes: native voxel boxes, three (start, stop) pairs each; None entries are skipped.
        zooms: voxel size in mm along X, Y, Z.
        fallback: the box when the masks are empty and no box is given (None: the whole field of view).

    Returns:
        Three (start, stop) pairs, or ``fallback``.
    """
    shape = np.asarray(masks[0]).shape
    extents = [[(int(a), int(b)) for a, b in box] for box in boxes if box is not None]
    for mask in masks:
        bounds = nonzero_bounds(mask)
        if bounds is not None:
            extents.append([(int(a), int(b) + 1) for a, b in zip(*bounds)])
    if not extents:
        return fallback
    starts = [[extent[axis][0] for extent in extents] for axis in range(3)]
    stops = [[extent[axis][1] for extent in extents] for axis in range(3)]
    margins = [int(np.ceil(CORD_MARGIN_MM / float(zoom))) for zoom in zooms]
    return [
        (max(min(starts[axis]) - margins[axis], 0), min(max(stops[axis]) + margins[axis], int(shape[axis])))
        for axis in range(3)
    ]


def zoom_to_box(
    arrays: Sequence[np.ndarray], affine: np.ndarray, box: Sequence[tuple[int, int]]
) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
    """Crop arrays of one grid to a native voxel box (plus :data:`ZOOM_MARGIN_VOXELS`), with the affine moved.

    Args:
        arrays: (X, Y, Z) arrays (the image, its masks); affine: (4, 4); box: three (start, stop) voxel pairs.

    Returns:
        The cropped arrays, the crop's (4, 4) affine and its first native voxel (the arrays as given, and
        ``[0, 0, 0]``, when the box is empty).
    """
    shape = arrays[0].shape
    starts = [max(0, int(a) - ZOOM_MARGIN_VOXELS) for a, _ in box]
    stops = [min(n, int(b) + ZOOM_MARGIN_VOXELS) for (_, b), n in zip(box, shape)]
    if any(stop - start < 1 for start, stop in zip(starts, stops)):
        return list(arrays), affine, [0, 0, 0]
    window = tuple(slice(a, b) for a, b in zip(starts, stops))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.asarray(starts, dtype=np.float64) + affine[:3, 3]
    return [array[window] for array in arrays], shifted, starts


def _to_ras(
    arrays: Sequence[np.ndarray], affine: np.ndarray, starts: Sequence[int]
) -> tuple[list[np.ndarray], np.ndarray, Callable[[int, int], str]]:
    """The arrays reoriented to RAS, their voxel sizes, and a function that names an RAS slice (axis, index) by
    the native voxel index it comes from (``starts``: where the arrays begin in the native image), as a viewer
    shows it: ``"z=5"``."""
    import nibabel.orientations as nio

    shape = arrays[0].shape
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("R", "A", "S")))
    ras_affine = affine @ nio.inv_ornt_aff(transform, shape)
    zooms = np.sqrt(np.sum(ras_affine[:3, :3] ** 2, axis=0))
    # transform[native axis] = (RAS axis, flip); invert it per RAS axis.
    source = {int(ras): (native, float(flip) < 0) for native, (ras, flip) in enumerate(transform)}

    def native_index(axis: int, index: int) -> str:
        native, flipped = source[axis]
        within = shape[native] - 1 - index if flipped else index
        return f"{'xyz'[native]}={int(starts[native]) + within}"

    return [nio.apply_orientation(array, transform) for array in arrays], zooms, native_index


def _axial_square(cord: np.ndarray, lesion: np.ndarray, z: int, zooms: Sequence[float]) -> tuple[slice, slice]:
    """The (x, y) window of axial slice ``z`` of an RAS volume: :data:`AXIAL_FOV_MM` square around the cord's
    centre in that slice (or in the nearest slice that has cord), grown to hold ``lesion`` (the slice's lesions),
    shifted inside the image; the whole slice without a cord."""
    shape = cord.shape[:2]
    present = np.flatnonzero(cord.any(axis=(0, 1)))
    if present.size == 0:
        return slice(0, shape[0]), slice(0, shape[1])
    nearest = int(present[np.argmin(np.abs(present - z))])
    centre = np.argwhere(cord[:, :, nearest]).mean(axis=0)
    window = []
    for axis in range(2):
        half = AXIAL_FOV_MM / 2.0 / float(zooms[axis])
        start, stop = int(np.floor(centre[axis] - half)), int(np.ceil(centre[axis] + half)) + 1
        along = np.flatnonzero(lesion.any(axis=1 - axis))
        if along.size:
            start, stop = min(start, int(along[0]) - 2), max(stop, int(along[-1]) + 3)
        shift = max(0, -start) - max(0, stop - shape[axis])
        start, stop = max(0, start + shift), min(shape[axis], stop + shift)
        window.append(slice(start, stop))
    return window[0], window[1]


def _pick_slices(mask: np.ndarray, axis: int, count: int, *, spread: float | None, zoom: float) -> list[int]:
    """Slice indices along ``axis``: through the lesions if any, else around the centre.

    Args:
        spread: without lesions, the central fraction of the axis to sample evenly; None to take slices
            :data:`SAGITTAL_STEP_MM` apart around the centre instead.
    """
    size = mask.shape[axis]
    others = tuple(a for a in range(3) if a != axis)
    with_lesion = np.flatnonzero(mask.any(axis=others))
    if with_lesion.size:
        if with_lesion.size <= count:
            return [int(i) for i in with_lesion]
        picks = np.linspace(0, with_lesion.size - 1, count).round().astype(int)
        return sorted({int(with_lesion[i]) for i in picks})
    if size <= count:
        return list(range(size))
    if spread is not None:
        margin = (1.0 - spread) / 2.0 * (size - 1)
        return sorted({int(round(v)) for v in np.linspace(margin, size - 1 - margin, count)})
    step = max(1, int(round(SAGITTAL_STEP_MM / zoom)))
    centre = (size - 1) // 2
    indices = centre + step * (np.arange(count) - count // 2)
    return sorted({int(i) for i in np.clip(indices, 0, size - 1)})


def _tile(
    grey: np.ndarray,
    lesion: np.ndarray,
    pixel_mm: Sequence[float],
    window: tuple[float, float],
    label: str,
    box: tuple[int, int],
) -> PILImage.Image:
    """One slice as RGB, lesions blended in red, resized to fit ``box`` (width, height) with square pixels in mm."""
    from PIL import Image

    low, high = window
    scaled = np.clip((np.asarray(grey, dtype=np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    rows_mm, cols_mm = grey.shape[0] * pixel_mm[0], grey.shape[1] * pixel_mm[1]
    mm_per_px = max(cols_mm / box[0], rows_mm / box[1])
    size = (max(1, round(cols_mm / mm_per_px)), max(1, round(rows_mm / mm_per_px)))
    grey_px = np.asarray(Image.fromarray(scaled, mode="L").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    lesion_px = (
        np.asarray(
            Image.fromarray(np.ascontiguousarray(lesion, dtype=np.uint8) * 255, mode="L").resize(
                size, Image.Resampling.NEAREST
            )
        )
        > 0
    )
    rgb = np.repeat(grey_px[:, :, None], 3, axis=2)
    lesion_px = _outline(lesion_px)
    rgb[lesion_px] = (1 - OVERLAY_ALPHA) * rgb[lesion_px] + OVERLAY_ALPHA * np.asarray(OVERLAY_RGB, np.float32)
    tile = Image.fromarray(rgb.round().astype(np.uint8), mode="RGB")
    _text(tile, (3, tile.height - 13), label)
    return tile


def _outline(inside: np.ndarray) -> np.ndarray:
    """The border pixels of a (rows, columns) bool region, :data:`OUTLINE_PX` wide (small regions stay filled)."""
    eroded = inside.copy()
    for _ in range(OUTLINE_PX):
        padded = np.pad(eroded, 1)
        eroded = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    border: np.ndarray = inside & ~eroded
    return border


def _grid(tiles: list[PILImage.Image], columns: int) -> PILImage.Image:
    from PIL import Image

    cell_w = max(tile.width for tile in tiles)
    cell_h = max(tile.height for tile in tiles)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * cell_w + (columns - 1) * 2, rows * cell_h + (rows - 1) * 2), (0, 0, 0))
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        x = column * (cell_w + 2) + (cell_w - tile.width) // 2
        y = row * (cell_h + 2) + (cell_h - tile.height) // 2
        grid.paste(tile, (x, y))
    return grid


def _letters(tile: PILImage.Image, *, left: str, top: str) -> None:
    _text(tile, (2, tile.height // 2 - 6), left)
    _text(tile, (tile.width // 2 - 3, 1), top)


def _text(picture: PILImage.Image, xy: tuple[int, int], text: str) -> None:
    from PIL import ImageDraw

    # Shadowed yellow text stays readable on both dark and bright anatomy.
    draw = ImageDraw.Draw(picture)
    draw.text((xy[0] + 1, xy[1] + 1), text, fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 230, 0))


def qc_picture_path(qc_dir: Path, subject: str, image: Path, site: str, release: str) -> Path:
    """Where one segmentation's picture goes: ``<qc_dir>/[<subject>_]<image stem>_<site>_<release>.png``.

    Named by subject, image, site and release, so separate runs over one report folder never overwrite each
    other's pictures (two inputs named alike in different folders differ by subject); the subject is left out
    where the stem already starts with it, as BIDS names do.
    """
    name = image.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if not name.startswith(subject):
        name = f"{subject}_{name}"
    return Path(qc_dir) / f"{_slug(name)}_{_slug(site)}_{_slug(release)}.png"


def subject_of(image: Path) -> str:
    """The subject a picture is filed under: the BIDS ``sub-`` entity of the file name, else the file's stem."""
    match = re.match(r"^(sub-[A-Za-z0-9]+)", image.name)
    return match.group(1) if match else image.name.split(".")[0]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]+", "-", text).strip("-") or "_"


def add_qc_entries(qc_dir: Path, entries: list[dict[str, Any]]) -> Path:
    """Add rows to the report in ``qc_dir`` and render its ``index.html`` again, under a lock.

    Concurrent processes (a shell loop with ``xargs -P``, cluster jobs) may call this on one folder: each holds
    the lock while it reads ``entries.json``, adds its rows (a row with the same subject, image, site and release
    replaces the old one) and writes both files atomically, so no row is lost and a reader never sees half a page.

    Args:
        qc_dir: the report folder (created if needed).
        entries: rows as for :func:`write_qc_index`, with ``subject`` and ``release``.

    Returns:
        The path of ``index.html``.

    Raises:
        OutputError: the report cannot be written.
    """
    from filelock import FileLock

    qc_dir = Path(qc_dir)
    try:
        qc_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the QC folder {qc_dir}: {exc.strerror or exc}; pick another with -qc"
        ) from None
    with FileLock(str(qc_dir / LOCK_FILE)):
        rows = {_entry_key(row): row for row in read_qc_entries(qc_dir)}
        for entry in entries:
            row = {key: _plain(value) for key, value in entry.items()}
            png = Path(str(row.get("png", "")))
            if png.is_absolute():
                try:
                    row["png"] = png.resolve().relative_to(qc_dir.resolve()).as_posix()
                except ValueError:
                    pass
            rows[_entry_key(row)] = row
        ordered = sorted(rows.values(), key=lambda r: [str(r.get(k, "")) for k in ("subject", "image", "site")])
        write_json_atomic({"entries": ordered}, qc_dir / ENTRIES_FILE)
        return write_qc_index(qc_dir, ordered)


def read_qc_entries(qc_dir: Path) -> list[dict[str, Any]]:
    """The rows of the report in ``qc_dir`` (none if it has none yet, or an unreadable file, which is rebuilt)."""
    path = Path(qc_dir) / ENTRIES_FILE
    try:
        data = untrusted_json.loads(path.read_bytes(), f"QC rows {path}")
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("QC rows %s unreadable (%s); the report starts again from this run's rows", path, exc)
        return []
    except RegistryError as exc:  # not JSON, or too deep, a key twice, a non-finite number: the one parser's rules
        logger.warning("%s; the report starts again from this run's rows", exc)
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _entry_key(entry: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(entry.get(key, "")) for key in ("subject", "image", "site", "release"))


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


#: Click a column's header to sort the rows by it (numbers as numbers); again to reverse.
SORT_SCRIPT = """
document.querySelectorAll("th").forEach((th, column) => th.addEventListener("click", () => {
  const table = th.closest("table"), rows = Array.from(table.querySelectorAll("tr")).slice(1);
  const up = th.dataset.order !== "up"; th.dataset.order = up ? "up" : "down";
  const key = (row) => { const text = row.cells[column].dataset.sort ?? row.cells[column].textContent;
    const number = parseFloat(text); return isNaN(number) ? text : number; };
  rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (up ? 1 : -1); });
  rows.forEach((row) => table.appendChild(row));
}));
"""


def write_qc_index(qc_dir: Path, entries: list[dict[str, Any]]) -> Path:
    """Write ``index.html`` in ``qc_dir``: one row per segmentation with its picture, lesion count and volume.

    The columns sort on a click of their header.

    Args:
        qc_dir: folder holding the pictures.
        entries: dicts with ``image`` (input path), ``png`` (picture, relative to ``qc_dir`` or absolute),
            ``lesions`` (count), ``volume_mm3`` and optionally ``site``, ``subject`` and ``release``.

    Returns:
        The path of ``index.html``.

    Raises:
        OutputError: the page cannot be written.
    """
    qc_dir = Path(qc_dir)
    rows = []
    for entry in entries:
        png = Path(str(entry.get("png", "")))
        if png.is_absolute():
            try:
                png = png.resolve().relative_to(qc_dir.resolve())
            except ValueError:
                pass  # outside qc_dir: linked by absolute file:// URI below
        source = png.as_uri() if png.is_absolute() else quote(png.as_posix())
        volume = entry.get("volume_mm3")
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(entry.get('subject', '')))}</td>"
            f"<td>{html.escape(str(entry.get('image', '')))}</td>"
            f"<td>{html.escape(str(entry.get('site', '')))}</td>"
            f"<td>{html.escape(str(entry.get('release', '')))}</td>"
            f"<td class=num>{html.escape(str(entry.get('lesions', '')))}</td>"
            f"<td class=num>{'' if volume is None else f'{float(volume):.1f}'}</td>"
            f'<td><a href="{html.escape(source)}"><img src="{html.escape(source)}" '
            f'alt="{html.escape(png.name)}" loading="lazy"></a></td>'
            "</tr>"
        )
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>sct_deepseg_lesion QC</title>',
            "<style>body{font-family:sans-serif;background:#111;color:#eee}table{border-collapse:collapse}"
            "td,th{border:1px solid #444;padding:4px;vertical-align:top}.num{text-align:right}"
            "th{cursor:pointer}img{max-width:1100px}</style></head><body>",
            f"<h1>sct_deepseg_lesion QC ({len(entries)} segmentation{'s' if len(entries) != 1 else ''})</h1>",
            "<table><tr><th>subject</th><th>input</th><th>site</th><th>release</th><th>lesions</th>"
            "<th>volume (mm&sup3;)</th><th>picture</th></tr>",
            *rows,
            f'</table><script type="module">{SORT_SCRIPT}</script></body></html>',
            "",
        ]
    )
    index = qc_dir / "index.html"
    write_atomic(index, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return index

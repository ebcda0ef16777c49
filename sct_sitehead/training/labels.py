"""Label sharing across sites with different label sets (Anand et al. 2024).

Sites annotate different things (site A: lesion; site B: lesion and cord; ...). The network has n* output
channels, n* being the largest number of labels any one site has. Without a grouping, each site's labels are
ranked by their mean relative size (label voxels / image voxels, averaged over the site's cases) and the k-th
largest goes to channel k, so one channel holds structures of similar size across sites. A grouping by meaning
(``{"lesion": ["lesion", "lesion-core"], "cord": ["cord", "sc"]}``) overrides the ranking: group g is channel g
in the grouping's order.

The pooled backbone trains on every site with the loss masked per sample to its site's channels. The
``universal`` head's label map is that of the most common label set among sites (ties: the larger set, then the
set of the alphabetically first site), taken from the alphabetically first site with that set.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sct_sitehead.errors import TrainingError

logger = logging.getLogger(__name__)

UNIVERSAL = "universal"


@dataclass(frozen=True)
class LabelSpace:
    """The shared output channels and each site's map into them.

    Attributes:
        channels: n*, the number of output channels.
        site_maps: ``{site: {label: channel}}``.
        universal_site: the site whose map the ``universal`` head uses.
        sizes: ``{site: {label: mean relative size}}`` the ranking was made from (for the record).
        groups: the grouping by meaning the channels follow (``{group: [label, ...]}``, group g = channel g), or
            None when channels are ranked by size; a site added later is mapped by the same rule.
    """

    channels: int
    site_maps: dict[str, dict[str, int]]
    universal_site: str
    sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    groups: dict[str, list[str]] | None = None

    @property
    def sites(self) -> list[str]:
        """The sites with a label map, sorted."""
        return sorted(self.site_maps)

    def label_map(self, site: str) -> dict[str, int]:
        """``{label: channel}`` of ``site`` (or of the ``universal`` head).

        Raises:
            TrainingError: unknown site.
        """
        if site == UNIVERSAL:
            return dict(self.site_maps[self.universal_site])
        if site not in self.site_maps:
            raise TrainingError(f"site {site!r} is not in the label space (sites: {self.sites}); add it with with_site")
        return dict(self.site_maps[site])

    def manifest_labels(self, site: str) -> list[dict[str, Any]]:
        """The head's manifest ``labels``: ``[{"name", "value", "channel"}]`` sorted by channel, value 1 (binary)."""
        pairs = sorted(self.label_map(site).items(), key=lambda item: (item[1], item[0]))
        return [{"name": name, "value": 1, "channel": channel} for name, channel in pairs]

    def channel_mask(self, site: str) -> np.ndarray:
        """(n*,) bool: the channels ``site`` annotates (the rest get no loss)."""
        mask = np.zeros(self.channels, dtype=bool)
        mask[list(self.label_map(site).values())] = True
        return mask

    def targets(self, site: str, masks: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Stack a sample's label masks into the shared channels.

        Args:
            site: the sample's site.
            masks: ``{label: (X, Y, Z) array}``, non-zero inside. A label of the site that this sample lacks leaves
                its channel out of the channel mask (no loss), so a partly annotated case still trains the rest.
                Labels grouped into one channel are merged (union).

        Returns:
            (n*, X, Y, Z) uint8 targets and the (n*,) bool channel mask of the channels this sample annotates.

        Raises:
            TrainingError: no label of the site is present, a label is unknown to the site, or shapes differ.
        """
        label_map = self.label_map(site)
        unknown = sorted(set(masks) - set(label_map))
        present = [name for name in label_map if name in masks]
        if unknown or not present:
            raise TrainingError(
                f"sample of site {site!r} has labels {sorted(masks)}; the site's labels are {sorted(label_map)}; "
                "rebuild the label space with this sample's labels or fix the label file names"
            )
        shapes = {np.shape(masks[name]) for name in present}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise TrainingError(f"label masks of one sample have shapes {sorted(shapes)}; they must share one 3D grid")
        out = np.zeros((self.channels, *shapes.pop()), dtype=np.uint8)
        channel_mask = np.zeros(self.channels, dtype=bool)
        for name in present:
            channel = label_map[name]
            out[channel] |= np.asarray(masks[name]) != 0
            channel_mask[channel] = True
        return out, channel_mask

    def with_site(self, site: str, label_sizes: Mapping[str, float]) -> LabelSpace:
        """This space plus a new site ranked by the same rule, without changing n* or any other site's map.

        Raises:
            TrainingError: the site has more labels than the n* channels the backbone was trained with.
        """
        if site in self.site_maps:
            return self
        if len(label_sizes) > self.channels:
            raise TrainingError(
                f"site {site!r} has {len(label_sizes)} labels {sorted(label_sizes)} but the backbone has "
                f"{self.channels} channels; drop labels or retrain the backbone with this site"
            )
        new = _group_maps({site: label_sizes}, self.groups)[site] if self.groups else _rank(label_sizes)
        maps = {**self.site_maps, site: new}
        return LabelSpace(
            self.channels, maps, self.universal_site, {**self.sizes, site: dict(label_sizes)}, self.groups
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form, stored in the backbone checkpoint."""
        return {
            "channels": self.channels,
            "site_maps": self.site_maps,
            "universal_site": self.universal_site,
            "sizes": self.sizes,
            "groups": self.groups,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelSpace:
        """Inverse of :meth:`to_json`."""
        site_maps = {s: {k: int(v) for k, v in m.items()} for s, m in data["site_maps"].items()}
        return cls(
            int(data["channels"]),
            site_maps,
            str(data["universal_site"]),
            {s: {k: float(v) for k, v in m.items()} for s, m in data.get("sizes", {}).items()},
            _groups_in_channel_order(data["groups"], site_maps) if data.get("groups") else None,
        )


def _rank(label_sizes: Mapping[str, float]) -> dict[str, int]:
    # Ties broken by name so the map does not depend on dict order.
    ordered = sorted(label_sizes, key=lambda name: (-float(label_sizes[name]), name))
    return {name: k for k, name in enumerate(ordered)}


def build_label_space(
    site_label_sizes: Mapping[str, Mapping[str, float]],
    grouping: Mapping[str, Sequence[str]] | None = None,
    mode: str | None = None,
) -> LabelSpace:
    """Assign every site's labels to shared channels.

    Args:
        site_label_sizes: ``{site: {label: mean relative size}}`` (label voxels / image voxels, averaged over the
            site's cases; see :func:`measure_label_sizes`).
        grouping: optional ``{group: [label, ...]}``; group g (in this order) is channel g.
        mode: None (``grouping`` when given, else size ranking), ``"size"`` (size ranking, ``grouping``
            ignored), ``"grouping"`` (``grouping`` required) or ``"merged"``: every (site, label) its own channel
            (sites in name order, each site's labels by decreasing size), the partial-label baseline of Anand
            et al. 2024.

    Returns:
        The :class:`LabelSpace`.

    Raises:
        TrainingError: no site, a site without labels, or a label in no group / in two groups.

    Example:
        Site A {lesion: 0.001}, site B {cord: 0.02, lesion: 0.002}, site C {csf: 0.05, cord: 0.02, lesion: 0.001}:
        n* = 3; A: lesion -> 0; B: cord -> 0, lesion -> 1; C: csf -> 0, cord -> 1, lesion -> 2.
    """
    if not site_label_sizes:
        raise TrainingError("no site has any labelled case; check the dataset's derivatives/labels folder")
    empty = sorted(site for site, sizes in site_label_sizes.items() if not sizes)
    if empty:
        raise TrainingError(f"site(s) {empty} have no labels; remove them or add their label masks")
    if mode not in (None, "size", "grouping", "merged"):
        raise TrainingError(f"label mode {mode!r} is not one of None, 'size', 'grouping', 'merged'")
    if mode == "grouping" and not grouping:
        raise TrainingError("label mode 'grouping' needs labels.grouping; give the groups or use another mode")
    groups = None
    if mode == "merged":
        maps, channels = _merged_maps(site_label_sizes)
    elif grouping and mode != "size":
        maps, channels = _group_maps(site_label_sizes, grouping), len(grouping)
        groups = {group: list(members) for group, members in grouping.items()}
    else:
        maps = {site: _rank(sizes) for site, sizes in site_label_sizes.items()}
        channels = max(len(m) for m in maps.values())
    space = LabelSpace(
        channels=channels,
        site_maps=dict(sorted(maps.items())),
        universal_site=_universal_site(site_label_sizes),
        sizes={s: {k: float(v) for k, v in m.items()} for s, m in sorted(site_label_sizes.items())},
        groups=groups,
    )
    logger.info(
        "label space: %d channels, %s; universal head follows site %s", channels, space.site_maps, space.universal_site
    )
    return space


def _merged_maps(site_label_sizes: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, dict[str, int]], int]:
    maps: dict[str, dict[str, int]] = {}
    channels = 0
    for site in sorted(site_label_sizes):
        ranked = _rank(site_label_sizes[site])
        maps[site] = {label: channels + k for label, k in ranked.items()}
        channels += len(ranked)
    return maps, channels


def _groups_in_channel_order(
    groups: Mapping[str, Sequence[str]], site_maps: Mapping[str, Mapping[str, int]]
) -> dict[str, list[str]]:
    """``groups`` reordered so that group g is channel g again.

    Group g is channel g only by the order of the mapping, and a checkpoint's JSON metadata sorts its keys: read back
    as stored, ``{"cord", "csf", "lesion"}`` put a site added later on the wrong channels (its lesions on the CSF
    channel). The site maps say which channel each group's labels are on; groups no site uses keep their relative
    order in the free channels.
    """
    group_of = {label: group for group, members in groups.items() for label in members}
    channel_of: dict[str, int] = {}
    for site_map in site_maps.values():
        for label, channel in site_map.items():
            if label in group_of:
                channel_of.setdefault(group_of[label], int(channel))
    ordered: list[str | None] = [None] * len(groups)
    for group, channel in channel_of.items():
        if 0 <= channel < len(ordered) and ordered[channel] is None:
            ordered[channel] = group
    rest = iter(group for group in groups if group not in ordered)
    names = [group if group is not None else next(rest) for group in ordered]
    return {group: list(groups[group]) for group in names}


def _group_maps(
    site_label_sizes: Mapping[str, Mapping[str, float]], grouping: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, int]]:
    channel_of: dict[str, int] = {}
    for channel, members in enumerate(grouping.values()):
        for label in members:
            if label in channel_of:
                raise TrainingError(f"label {label!r} is in two groups of labels.grouping; keep it in one")
            channel_of[label] = channel
    maps = {}
    for site, sizes in site_label_sizes.items():
        unknown = sorted(set(sizes) - set(channel_of))
        if unknown:
            raise TrainingError(
                f"site {site!r} labels {unknown} are in no group of labels.grouping {dict(grouping)}; add them"
            )
        maps[site] = {label: channel_of[label] for label in sizes}
    return maps


def _universal_site(site_label_sizes: Mapping[str, Mapping[str, float]]) -> str:
    sets = {site: frozenset(sizes) for site, sizes in site_label_sizes.items()}
    counts = Counter(sets.values())
    first_site = {labels: min(s for s, v in sets.items() if v == labels) for labels in counts}
    best = min(counts, key=lambda labels: (-counts[labels], -len(labels), first_site[labels]))
    return first_site[best]


def measure_label_sizes(cases: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> dict[str, dict[str, float]]:
    """Mean relative size of each label per site.

    Args:
        cases: ``(site, {label: (X, Y, Z) mask})`` per case.

    Returns:
        ``{site: {label: mean over the site's cases having that label of (mask voxels / image voxels)}}``.
    """
    totals: dict[str, dict[str, list[float]]] = {}
    for site, masks in cases:
        for label, mask in masks.items():
            mask = np.asarray(mask)
            totals.setdefault(site, {}).setdefault(label, []).append(float(np.count_nonzero(mask)) / mask.size)
    return {site: {label: float(np.mean(v)) for label, v in labels.items()} for site, labels in sorted(totals.items())}

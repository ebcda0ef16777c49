"""Synthetic data without a scanner: a procedural spinal cord phantom, and a multi-site lesion simulator that
inserts known lesions into real anatomy and acquires and annotates it the way each site would.

numpy, scipy and nibabel only (no torch); scipy and nibabel are imported in the functions that use them, so the
``sct_sitehead phantom`` command and ``import sct_sitehead.simulate`` cost numpy alone. Public entry points:

- :func:`make_phantom`, :func:`write_phantom` (``sct_sitehead phantom``)
- :func:`simulate` (``sct_sitehead simulate``) with site profiles from :func:`load_sites`
- :func:`insert_lesions`: known lesions in your own healthy scans, to check a model
"""

from __future__ import annotations

from sct_sitehead.simulate.lesions import InsertedLesions, insert_lesions
from sct_sitehead.simulate.phantom import Phantom, make_phantom, write_phantom
from sct_sitehead.simulate.simulator import simulate
from sct_sitehead.simulate.sites import DEFAULT_SITES, Site, load_sites

__all__ = [
    "DEFAULT_SITES",
    "InsertedLesions",
    "Phantom",
    "Site",
    "insert_lesions",
    "load_sites",
    "make_phantom",
    "simulate",
    "write_phantom",
]

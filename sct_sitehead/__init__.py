"""Spinal cord lesion segmentation with a shared backbone and a small head per site."""

__version__ = "0.1.0"

"""Offline analysis of a score store: reports, selection lists, plots (numpy, zarr, matplotlib; no torch)."""
from .manifest import Manifest, read_manifest
from .report import auroc, build_report, step_blocks
from .select import select_keep

__all__ = ["Manifest", "auroc", "build_report", "read_manifest", "select_keep", "step_blocks"]

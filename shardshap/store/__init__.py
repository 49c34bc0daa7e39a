"""Per-step store of In-Run Data Shapley values (Zarr v3)."""

"""Per-step store of In-Run Data Shapley values (Zarr v3); format in docs/store.md."""

from ..errors import StoreClosedError, StoreError, StoreMismatchError, StoreWriteError
from .reader import ScoreStore, open_scores
from .reduce import reduce_store
from .schema import FORMAT_NAME, FORMAT_VERSION, SIGN_CONVENTION, StaleTotalsError, StoreFormatError
from .writer import ScoreWriter

__all__ = [
    "ScoreWriter",
    "ScoreStore",
    "open_scores",
    "reduce_store",
    "StoreError",
    "StoreFormatError",
    "StoreMismatchError",
    "StaleTotalsError",
    "StoreWriteError",
    "StoreClosedError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SIGN_CONVENTION",
]

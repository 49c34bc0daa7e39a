"""shardshap: In-Run Data Shapley values computed during training."""
from .attributor import SIGN_CONVENTION, AttributionError, Attributor, StepResult
from .config import Config, ConfigError
from .ghost import UnsupportedModule
from .optim import UnsupportedOptimizer

__version__ = "0.1.0"

__all__ = ["Attributor", "AttributionError", "Config", "ConfigError", "SIGN_CONVENTION", "StepResult",
           "UnsupportedModule", "UnsupportedOptimizer", "__version__"]

"""`Config`: every knob of an attribution run, typed, documented and validated."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .estimators import ESTIMATORS
from .estimators.predict import GRADIENT_PREDICTORS

STREAM_PREDICTORS = ("subspace",) + GRADIENT_PREDICTORS


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"Config.{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


# What each preset sets; docs/benchmarks.md ("Presets") has the measurements behind them. 'fast' is the
# fastest configuration measured to keep Pearson R >= 0.99 against exact values; it needs bf16 matrix units
# (AMX CPUs, GPUs from sm80), elsewhere bf16 matmuls are emulated and 'lowrank' is the fast one (the
# Attributor warns).
PRESETS: dict[str, dict[str, Any]] = {
    "exact": {"product_rank": None, "cache_dtype": None, "target_dtype": None},
    "fast": {"product_rank": None, "cache_dtype": "bfloat16", "target_dtype": "auto", "compile_math": True},
    "lowrank": {"product_rank": 16, "cache_dtype": None, "target_dtype": None, "compile_math": True},
}


@dataclass
class Config:
    """Settings of an In-Run Data Shapley run. See docs/method.md for the method behind each knob."""

    estimator: str = field(default="secant", metadata={"help": (
        "How one optimizer step's Shapley game is reduced to per-sample products: 'secant' (default; the "
        "secant slope of the real update map, exact for SGD/momentum and accurate for Adam/AdamW), "
        "'adam-lagged' (paper B's fixed-state form with the previous second moment; Adam/AdamW only), "
        "'sgd' (paper A's SGD proxy: lr times the target gradient).")})
    order: int = field(default=2, metadata={"help": (
        "1: target gradient at the current parameters. 2: account for the curvature of the target loss "
        "along the step (see `curvature`).")})
    curvature: str = field(default="midpoint", metadata={"help": (
        "How order 2 is computed: 'midpoint' (target gradient at the midpoint of the step; one target "
        "pass, includes higher orders) or 'hvp' (gradient at the current parameters plus an exact "
        "Hessian-vector product; the exact second-order Taylor game, costs a double backward).")})
    product_rank: Optional[int] = field(default=None, metadata={"help": (
        "None: exact products. An integer r: approximate each matrix weight's product vector W_k "
        "(nn.Linear, HF Conv1D) by its projection on an r-dimensional row subspace (randomized range "
        "finder, once per step), so that products cost tokens*r*(d_in+d_out) instead of tokens*d_in*d_out. "
        "A layer whose kept energy ||W_r||/||W|| is below 0.95 retries at rank 2r, 4r, ... while that still "
        "saves work, else uses exact products; layers where rank r saves nothing stay exact. The step "
        "metadata has product_energy, product_layer_rank and product_exact_layers. Embeddings, norms and "
        "biases stay exact, and so do Adam's cold steps under cold_start='owen' (sign-like updates, no "
        "low-rank structure). Training is unchanged; only the values are approximate (docs/benchmarks.md "
        "has their fidelity against exact products). Not used by schedule='streaming' with "
        "stream_predictor='subspace', whose sketches are low rank already (sketch_rank).")})
    cache_dtype: Optional[str] = field(default=None, metadata={"help": (
        "None: the captured activations and output gradients are kept as they come and the products run in "
        "compute_dtype (exact). 'bfloat16': they are cast to bf16 as they are captured and the products run in "
        "bf16 with float32 accumulation inside each matrix multiplication "
        "(bf16 matrix units: AMX on recent Xeons, tensor cores on GPUs); values carry bf16 rounding "
        "(about 3 significant digits per layer and sample), so the completeness check allows 2% per layer. "
        "The streaming schedule's sketches (stream_predictor='subspace') are thin projections bound by reading "
        "the captures, which a cast would read once more: they run in the output gradients' own dtype (bf16 "
        "under bf16 autocast). Training is unchanged.")})
    target_dtype: Optional[str] = field(default=None, metadata={"help": (
        "None: the target forward/backward runs as the model and target_loss do (an autocast around "
        "Attributor.step is not applied to it; one inside target_loss is). 'bfloat16': it runs under "
        "torch.autocast(bfloat16) (bf16 matrix units). 'auto' (preset='fast'): 'bfloat16' on a CPU. On "
        "accelerators (where attribution batches its kernels) it is the autocast around Attributor.step / "
        "attribute if there is one. Without one it is 'bfloat16' when the step's captures are large, and none "
        "when every capture has at most 2^20 numbers. There, autocast's casts (about six kernels per matrix "
        "layer) cost launches more than copies. Only the values change, by bf16 rounding of the target "
        "gradient; training is unchanged.")})
    compile_math: Optional[bool] = field(default=None, metadata={"help": (
        "True: fuse the per-parameter optimizer math of each step (the Adam/AdamW secant slope, D(0)) with "
        "torch.compile: one pass over the parameters instead of about 15. The first step pays the compilation "
        "(seconds; inductor needs a C++ compiler on CPU, Triton on GPU); where it "
        "fails, the eager math runs with a warning. Values equal the eager ones up to float rounding; training "
        "is unchanged. Where attribution batches its kernels (accelerators: foreach math over all parameters "
        "in about 17 launches, fewer than one compiled kernel per parameter) it is not used. None (the "
        "default): off unless the preset sets it.")})
    preset: Optional[str] = field(default=None, metadata={"help": (
        "A named set of field values: 'exact' (the reference), 'fast' (cache_dtype 'bfloat16' and target_dtype "
        "'auto': products, and on a CPU the target pass, on bf16 matrix units; for GPUs from sm80 and CPUs "
        "with AMX) "
        "or 'lowrank' (product_rank=16: for CPUs without bf16 units); both also set compile_math. "
        "docs/benchmarks.md has their speed and fidelity. The preset fills the fields it names; giving one of "
        "them a non-default value that differs from the preset's is an error (drop the preset or that field).")})
    reduction: str = field(default="mean", metadata={"help": (
        "How the training loss combines per-sample losses: 'mean' (L = sum_i l_i / |B|, the usual) or "
        "'sum'. |B| counts every sample of every micro-batch of the optimizer step (with per-position "
        "sample_ids: every counted position, over all ranks).")})
    max_grad_norm: Optional[float] = field(default=None, metadata={"help": (
        "Clip the gradient to this global L2 norm before the optimizer step, exactly like "
        "torch.nn.utils.clip_grad_norm_. The clip factor is frozen at the full batch's value in the game. "
        "None: no clipping.")})
    exclude: list = field(default_factory=list, metadata={"help": (
        "Parameter or module names (fnmatch patterns, e.g. 'transformer.wpe.*') left out of attribution. "
        "They are still trained; their contribution to the values is dropped and they are recorded in "
        "the result metadata.")})
    target_names: Optional[list] = field(default=None, metadata={"help": (
        "Names of the K targets, in the order of the target loss vector. Default: target0, target1, ...")})
    target_mode: str = field(default="eval", metadata={"help": (
        "Mode of the model while the target losses are taken: 'eval' (dropout off, so the target loss is a "
        "fixed function of the parameters and the game is not noisy; every submodule's mode is restored "
        "afterwards) or 'train' (the model's mode as it is). Training is unchanged either way.")})
    target_sharding: str = field(default="replicated", metadata={"help": (
        "Under DDP: 'replicated' (every rank passes the same targets; no communication) or 'split' (each "
        "rank passes an equal share of every target set; target losses and gradients are averaged over "
        "ranks).")})
    num_samples: Optional[int] = field(default=None, metadata={"help": (
        "Size of the training set (sample ids are in [0, num_samples)). Required when writing a store.")})
    store_slots: Optional[int] = field(default=None, metadata={"help": (
        "Values the store keeps per rank and step (one per player). None: the widest rank's count at the first "
        "step, right for fixed batches. With per-position sample_ids the documents per step vary: set it to the "
        "most documents a rank sees in one step (a step with more is refused before it trains).")})
    schedule: str = field(default="cached", metadata={"help": (
        "When the per-sample products are taken. 'cached': every attributed module's input and output "
        "gradient is kept until the end of the step, then multiplied by the W of the real step (exact; memory "
        "grows with the micro-batches of the step). 'streaming': each module's contribution is taken in the "
        "backward as soon as its output gradient exists (per-sample sketches, or products against a predicted "
        "W: `stream_predictor`), so nothing is kept across modules or micro-batches (flat memory, activation "
        "checkpointing keeps its saving); values approximate. docs/method.md has the fidelity of each.")})
    stream_predictor: str = field(default="subspace", metadata={"help": (
        "Streaming only: what is fixed before the backward. 'subspace': each matrix weight's per-sample "
        "gradient is kept as a small sketch (sketch_rank x K per side, squared, per sample) in the subspace of "
        "the previous step's W, and the step's exact W multiplies the sketches after the backward; norms, "
        "biases and other small parameters keep exact per-sample gradients. The others freeze W itself at a "
        "predicted batch gradient: 'momentum' (the optimizer's bias-corrected first moment), 'previous' (the "
        "previous step's clipped gradient; one gradient-sized copy per rank, not in Attributor.state_dict()) or "
        "'zero' (what momentum and weight decay do alone). The clip factor is the real one in every case; "
        "docs/method.md has the fidelity of each.")})
    sketch_rank: int = field(default=16, metadata={"help": (
        "stream_predictor='subspace': directions per target and side of each weight's subspace; each sample "
        "keeps a (K * sketch_rank)^2 sketch per matrix weight (capped at the weight's own size). The step "
        "metadata has sketch_energy: what the previous step's subspace kept of each weight's W "
        "(||U^T W V|| / ||W||); the Attributor warns once when one falls below 0.8.")})
    cold_start: Optional[str] = field(default=None, metadata={"help": (
        "Estimator for the first `cold_steps` steps of Adam/AdamW (state near zero, update close to "
        "lr*sign(g), where the secant's slope is ill-conditioned): 'owen' (Owen's multilinear extension of "
        "the true per-coordinate update with Gaussian coalition sums; needs the exact per-coordinate sum of "
        "squared per-sample gradients, one extra weight-gradient-sized pass) or 'none' (plain secant). "
        "Applies to estimator='secant'; SGD's update is affine, so the secant is already exact there. "
        "Owen needs the real batch gradient, so under schedule='streaming' its steps run cached. Default: "
        "'owen' for the cached schedule, 'none' for streaming (memory stays flat from the first step).")})
    cold_steps: int = field(default=10, metadata={"help": (
        "Number of first optimizer steps (counted by the optimizer's own state, so a resumed optimizer is "
        "not cold) that use `cold_start`.")})
    compute_dtype: str = field(default="auto", metadata={"help": (
        "Precision of the attribution math: 'auto' (float64 for float64 models, else float32), "
        "'float32' or 'float64'. Never lower than float32, whatever the model dtype.")})
    check_completeness: bool = field(default=True, metadata={"help": (
        "Every step, check that the per-sample products of each parameter sum to the product of its "
        "batch gradient. A mismatch means a parameter is used outside the module that owns it (e.g. a "
        "functional call) or broadcast across the batch, and raises instead of returning wrong values.")})
    check_timing: Optional[str] = field(default=None, metadata={"help": (
        "When the step's checks of values (finite losses and targets, products that add up) and its values "
        "for the store reach the host. 'before-step': read before the optimizer steps, so that a failing step "
        "is refused before it trains; one host sync per step (on a GPU the host waits for the device to catch "
        "up). 'next-step': copied to the host without waiting and read at the next step (or flush/close): no "
        "sync; a failing step has trained by then, as the plain step would have, nothing of it is in the store "
        "and the next step is refused before it trains. StepResult.clip_factor (and sketch_energy) are then "
        "0-d device tensors. None (the default): 'before-step' on a CPU, where reading costs nothing, "
        "'next-step' on accelerators.")})

    def __post_init__(self) -> None:
        self._apply_preset()
        if self.product_rank is not None and (isinstance(self.product_rank, bool)
                                              or not isinstance(self.product_rank, int) or self.product_rank < 1):
            raise ConfigError(f"Config.product_rank={self.product_rank!r} must be a positive integer or None (exact)")
        _choice("estimator", self.estimator, tuple(ESTIMATORS))
        _choice("order", self.order, (1, 2))
        _choice("curvature", self.curvature, ("midpoint", "hvp"))
        _choice("reduction", self.reduction, ("mean", "sum"))
        _choice("compute_dtype", self.compute_dtype, ("auto", "float32", "float64"))
        _choice("schedule", self.schedule, ("cached", "streaming"))
        _choice("stream_predictor", self.stream_predictor, STREAM_PREDICTORS)
        if isinstance(self.sketch_rank, bool) or not isinstance(self.sketch_rank, int) or self.sketch_rank < 1:
            raise ConfigError(f"Config.sketch_rank={self.sketch_rank!r} must be a positive integer")
        if self.cold_start is None:
            self.cold_start = "owen" if self.schedule == "cached" else "none"
        _choice("cold_start", self.cold_start, ("owen", "none"))
        _choice("check_timing", self.check_timing, (None, "before-step", "next-step"))
        _choice("target_sharding", self.target_sharding, ("replicated", "split"))
        _choice("target_mode", self.target_mode, ("eval", "train"))
        _choice("cache_dtype", self.cache_dtype, (None, "bfloat16"))
        _choice("target_dtype", self.target_dtype, (None, "bfloat16", "auto"))
        if not (isinstance(self.cold_steps, int) and self.cold_steps >= 0):
            raise ConfigError(f"Config.cold_steps={self.cold_steps!r} must be a non-negative integer")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and self.max_grad_norm > 0):
            raise ConfigError(f"Config.max_grad_norm={self.max_grad_norm!r} must be a positive number or None")
        if isinstance(self.exclude, str) or not all(isinstance(x, str) for x in self.exclude):
            raise ConfigError(f"Config.exclude={self.exclude!r} must be a list of name patterns (strings)")
        self.exclude = list(self.exclude)
        if self.target_names is not None:
            if isinstance(self.target_names, str) or not all(isinstance(x, str) for x in self.target_names):
                raise ConfigError(f"Config.target_names={self.target_names!r} must be a list of strings")
            if len(set(self.target_names)) != len(self.target_names):
                raise ConfigError(f"Config.target_names={self.target_names!r} has duplicates; names must be unique")
            self.target_names = list(self.target_names)
        if self.num_samples is not None and not (isinstance(self.num_samples, int) and self.num_samples > 0):
            raise ConfigError(f"Config.num_samples={self.num_samples!r} must be a positive integer or None")
        if self.store_slots is not None and not (isinstance(self.store_slots, int) and self.store_slots > 0):
            raise ConfigError(f"Config.store_slots={self.store_slots!r} must be a positive integer or None")
        if self.compile_math is None:
            self.compile_math = False
        if not isinstance(self.compile_math, bool):
            raise ConfigError(f"Config.compile_math={self.compile_math!r} must be true or false")
        if not isinstance(self.check_completeness, bool):
            raise ConfigError(f"Config.check_completeness={self.check_completeness!r} must be true or false")

    def _apply_preset(self) -> None:
        """Fill the preset's fields; a field the user set to something else is a conflict, not overridden."""
        if self.preset is None:
            return
        _choice("preset", self.preset, tuple(PRESETS))
        defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                    for f in dataclasses.fields(self)}
        for key, value in PRESETS[self.preset].items():
            current = getattr(self, key)
            if current == value:
                continue
            if current != defaults[key]:
                raise ConfigError(f"Config.preset={self.preset!r} sets {key}={value!r}, but {key}={current!r} was "
                                  f"given; drop the preset or the field")
            setattr(self, key, value)

    @classmethod
    def fields_help(cls) -> dict[str, str]:
        """The docstring of every field, by name."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """Build from a mapping; unknown keys are an error naming the key (and the closest valid one)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a shardshap config must be a mapping of keys to values, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, section: Optional[str] = None) -> "Config":
        """Load from a YAML or JSON file; `section` picks a sub-mapping (e.g. 'shardshap')."""
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
        if section is not None:
            if not isinstance(data, dict) or section not in data:
                raise ConfigError(f"{path}: no section {section!r}")
            data = data[section]
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

"""The training config of `launch/train.py`: a pydantic schema, loadable from YAML or JSON.

Unknown keys and bad values raise `ConfigError` with one line that names the key and the fix. Relative
paths are relative to the directory the trainer is started from."""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import Config, ConfigError

__all__ = ["RecipeConfig", "ConfigError", "load_config", "apply_overrides", "deepspeed_dict"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    family: Literal["gpt2", "llama"] = "gpt2"
    pretrained: Optional[str] = Field(None, description="local folder for from_pretrained (never downloaded); "
                                                        "the size keys below are then ignored")
    n_layer: int = Field(2, gt=0)
    d_model: int = Field(64, gt=0)
    n_head: int = Field(4, gt=0)
    n_kv_head: Optional[int] = Field(None, gt=0, description="llama: grouped-query heads (default n_head)")
    d_ff: Optional[int] = Field(None, gt=0, description="MLP width (default 4 * d_model)")
    vocab_size: Optional[int] = Field(None, gt=0, description="default: the tokenizer's vocabulary")
    max_positions: Optional[int] = Field(None, gt=0, description="default: data.seq_len")
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"
    activation_checkpointing: Literal["none", "nonreentrant", "reentrant"] = Field(
        "none", description="recompute each block's activations in the backward instead of keeping them "
                            "(transformers' gradient_checkpointing_enable, use_reentrant=False or True); pair "
                            "with attribution.schedule: streaming to keep the memory it saves")

    @model_validator(mode="after")
    def _heads(self):
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} must be a multiple of model.n_head={self.n_head}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}")
        return self


class CorpusEntry(_Section):
    path: str
    domain: Optional[str] = Field(None, description="domain of the file's texts (JSONL rows may name their own); "
                                                    "default: the file name without extension")


class DataConfig(_Section):
    corpus: list[Union[str, CorpusEntry]] = Field(min_length=1, description=".txt/.md (one document per file "
                                                  "or per blank-line paragraph) or .jsonl files, or folders of them")
    seq_len: int = Field(64, gt=1)
    packing: Literal["pad", "pack"] = Field("pad", description="pad: one document per sequence (a longer one "
                                            "is split into seq_len chunks); pack: documents concatenated")
    truncate: bool = Field(False, description="pad only: keep just the first seq_len tokens of a document")
    attention: Literal["causal", "document"] = Field(
        "causal", description="causal: a token attends to every earlier token of its sequence (across the "
        "documents a packed sequence holds); document (pack only): only to earlier tokens of its own document, "
        "positions restarting at each document, as if each were a sequence of its own")
    values_per: Optional[Literal["sequence", "document"]] = Field(
        None, description="what the store values: each training sequence, or each corpus document (its "
        "positions' shares summed over every sequence, micro-batch and rank of a step; ids index the corpus's "
        "documents). Default: document with attention: document, else sequence. With pack and causal attention "
        "per-document values are approximate (a token's gradient also comes from later documents' losses)")
    tokenizer: str = Field("bytes",
                           description="'bytes' (built-in, 256 bytes + 1 special) or a local HF tokenizer folder")
    validation: dict[str, Union[str, list[str]]] = Field(default_factory=dict)
    val_sequences: int = Field(8, gt=0, description="first sequences of each validation set used as its target")
    keep: Optional[str] = Field(None, description="index list written by `shardshap select`: train on these ids "
                                "only (sequences, or documents with values_per: document)")


    @model_validator(mode="after")
    def _attention(self):
        if self.attention == "document" and self.packing != "pack":
            raise ConfigError("data.attention: document needs data.packing: pack (padded sequences hold one "
                              "document each already)")
        if self.values_per is None:
            self.values_per = "document" if self.attention == "document" else "sequence"
        return self


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="save every N optimizer steps (0: never)")
    dir: Optional[str] = Field(None, description="default: <out_dir>/checkpoints")


class TrainConfig(_Section):
    steps: int = Field(gt=0)
    micro_batch: int = Field(gt=0, description="sequences per micro-batch per rank")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(0, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(None, gt=0, description="torch CPU threads per rank")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    resume: Union[bool, str] = Field(False, description="true: the latest checkpoint in checkpoint.dir; or a path")
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0, description="every N optimizer steps (and after the last), compute each "
                            "validation target's loss, also with attribution off; logged to the summary "
                            "('eval') and <out_dir>/eval.jsonl (0: never)")

    @model_validator(mode="after")
    def _lr(self):
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}; lower min_lr")
        return self


class DistributedConfig(_Section):
    engine: Literal["none", "ddp", "fsdp2", "deepspeed"] = "none"
    deepspeed: Union[str, dict, None] = Field(None, description="path of a DeepSpeed JSON, or the dict itself")
    backend: Optional[Literal["gloo", "nccl"]] = Field(None, description="default: nccl on GPUs, gloo on CPU")
    timeout_s: float = Field(300.0, gt=0)


class AttributionConfig(_Section):
    """`enabled`, `store`, `overwrite`; every other key is a `shardshap.Config` field."""
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    enabled: bool = True
    store: Optional[str] = Field(None, description="default: <out_dir>/run.zarr")
    overwrite: bool = Field(False, description="replace an existing store at the start of a fresh run")

    def shardshap_fields(self) -> dict:
        return dict(self.model_extra or {})


class RecipeConfig(_Section):
    name: Optional[str] = Field(None, description="run id of the store (default: a hash of the config)")
    out_dir: str = "runs/train"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)

    @model_validator(mode="after")
    def _cross(self):
        fields = self.attribution.shardshap_fields()
        for key in ("num_samples", "max_grad_norm", "target_names"):
            if key in fields:
                where = {"num_samples": "the size of the built training set",
                         "max_grad_norm": "train.max_grad_norm",
                         "target_names": "the names under data.validation"}[key]
                raise ConfigError(f"attribution.{key} is set by the trainer from {where}; remove it")
        try:
            Config.from_dict(fields)
        except ConfigError as err:
            raise ConfigError(f"attribution: {err}") from None
        if self.attribution.enabled and not self.data.validation:
            raise ConfigError("attribution.enabled needs targets: add data.validation: {name: [files]} "
                             "(or set attribution.enabled: false)")
        if self.distributed.engine == "deepspeed":
            deepspeed_dict(self, world_size=None)  # static checks of the JSON
        elif self.distributed.deepspeed is not None:
            raise ConfigError("distributed.deepspeed is set but distributed.engine is "
                             f"{self.distributed.engine!r}; set engine: deepspeed or remove it")
        return self

    # ---------------------------------------------------------------- derived values
    @property
    def store_path(self) -> str:
        return self.attribution.store or str(Path(self.out_dir) / "run.zarr")

    @property
    def checkpoint_dir(self) -> str:
        return self.train.checkpoint.dir or str(Path(self.out_dir) / "checkpoints")

    def shardshap_config(self, num_samples: int, store_slots: Optional[int] = None) -> Config:
        """The attribution section as a shardshap.Config. Under DeepSpeed the clipping is DeepSpeed's;
        `store_slots` applies unless the section sets it."""
        clip = None if self.distributed.engine == "deepspeed" else self.train.max_grad_norm
        fields = self.attribution.shardshap_fields()
        if store_slots is not None:
            fields.setdefault("store_slots", store_slots)
        return Config.from_dict({**fields, "num_samples": num_samples, "max_grad_norm": clip,
                                 "target_names": list(self.data.validation)})

    def run_id(self) -> str:
        """Same model, data, seed and attribution settings -> same id (a resumed run must match its store).
        train.steps and checkpointing are left out so that a run can be extended."""
        if self.name:
            return self.name
        keyed = self.model_dump(include={"model": True, "data": True, "attribution": True,
                                         "train": {"seed", "lr", "micro_batch", "grad_accum"}})
        return "train-" + hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def deepspeed_dict(cfg: RecipeConfig, world_size: Optional[int]) -> dict:
    """The DeepSpeed config with the recipe's batch sizes and clipping filled in. The recipe owns the
    optimizer and schedule (torch AdamW + LambdaLR passed to deepspeed.initialize), so the JSON must not
    define them; a batch or clipping value that disagrees with the train section is an error."""
    src = cfg.distributed.deepspeed
    if src is None:
        raise ConfigError("distributed.engine is 'deepspeed' but distributed.deepspeed is missing; set it to "
                         "a DeepSpeed JSON path (e.g. configs/ds_zero2.json) or a dict")
    if isinstance(src, str):
        p = Path(src)
        if not p.is_file():
            raise ConfigError(f"distributed.deepspeed: no file {src!r} (paths are relative to the working "
                             "directory; run from the repository root or give an absolute path)")
        try:
            ds = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"distributed.deepspeed: {src} is not valid JSON ({err})") from None
    else:
        ds = dict(src)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"distributed.deepspeed: remove the {key!r} section; the trainer builds AdamW "
                             "and the warmup+cosine schedule from the train section")
    want = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.train.max_grad_norm or 0.0}
    for key, value in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"distributed.deepspeed: {key}={ds[key]} disagrees with the train section "
                             f"({value}); remove it from the DeepSpeed config (the trainer fills it in)")
        ds[key] = value
    if world_size is not None:
        total = cfg.train.micro_batch * cfg.train.grad_accum * world_size
        if ds.get("train_batch_size", total) != total:
            raise ConfigError(f"distributed.deepspeed: train_batch_size={ds['train_batch_size']} but micro_batch x "
                             f"grad_accum x ranks = {total}; remove train_batch_size")
        ds["train_batch_size"] = total
    for fp in ("fp16",):
        if ds.get(fp, {}).get("enabled"):
            raise ConfigError("distributed.deepspeed: fp16 is not supported by attribution (dynamic loss "
                             "scaling); use bf16 or fp32")
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


# -------------------------------------------------------------------- loading
def _format(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-after", "union[")))
    if e["type"] == "extra_forbidden":
        *parent, key = [str(x) for x in e["loc"]]
        section = RecipeConfig
        for name in parent:  # walk to the section model to suggest the closest valid key
            field = section.model_fields.get(name)
            ann = getattr(field, "annotation", None)
            section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if section is None:
                break
        valid = list(section.model_fields) if section else []
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown config key {loc!r}; {hint}valid keys here: {', '.join(valid)}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error":  # our validators name the key themselves
        return msg if not loc or msg.startswith(loc.split(".")[0]) else f"{loc}: {msg}"
    return f"{loc or 'config'}: {msg} (got {e.get('input')!r})"


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set train.steps=50 --set data.keep=keep.txt`: values are parsed as YAML."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value (e.g. train.steps=100)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def validate(data: Any, source: str = "config") -> RecipeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a training config must be a mapping with sections model, data, train, ...")
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format(err)}") from None


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RecipeConfig:
    """Read a YAML or JSON training config, apply `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file {str(path)!r}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from None
    return validate(apply_overrides(data or {}, overrides or []), str(path))

"""The DeepSpeed configurations the ZeRO tests and their worker share."""

LR, CLIP = 3e-3, 0.5  # the gradient norm is ~0.8: clipped
CONFIGS = {  # name -> zero_optimization section
    "z1": {"stage": 1},
    "z2": {"stage": 2},
    "z3": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "z3-persist": {"stage": 3},  # default threshold: the tiny model's parameters all stay persistent
    # failed steps first (wrong micro-batch count, conflicting clip setting), then the normal run: the
    # failures must leave DeepSpeed's accumulation state clean (values and training as z2 / z3)
    "z2-recover": {"stage": 2},
    "z3-recover": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "z2-fused": {"stage": 2},  # DeepSpeed's FusedAdam (torch_adam false) instead of torch AdamW
    "z3-fast": {"stage": 3, "stage3_param_persistence_threshold": 0},  # Config(preset="fast")
    "z1-stream": {"stage": 1},  # Config(schedule="streaming")
    "z2-stream": {"stage": 2},
    "z3-stream": {"stage": 3, "stage3_param_persistence_threshold": 0},
    # DeepSpeed's bf16 mode (bf16 parameters and gradients, fp32 master weights): values against one float32
    # process by correlation, training against the plain bf16 run
    "z1-bf16": {"stage": 1},
    "z2-bf16": {"stage": 2},
    "z3-bf16": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
# shardshap.Config fields of the configurations not attributed with the default Config
ATTRIBUTION = {"z3-fast": {"preset": "fast"}, **{f"z{s}-stream": {"schedule": "streaming"} for s in (1, 2, 3)}}


def plain_twin(config: str) -> str:
    """The configuration whose plain DeepSpeed run this one's training must equal."""
    return config.removesuffix("-recover").removesuffix("-fast").removesuffix("-stream")

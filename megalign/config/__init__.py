"""Typed run configuration: dataclass sections that check themselves (``sections``), loaded from
YAML with dotted ``key.sub=value`` overrides (``loader``), and checked against the tokenizer and
the launch by the command that runs it (``checks``)."""

from megalign.config.checks import (
                                    check_batches,
                                    check_vocabulary,
                                    data_parallel_size,
                                    evaluation_batch_size,
                                    mask_token_id,
                                    padded_vocab_size,
                                    required_vocab_size,
                                    validate,
)
from megalign.config.loader import (
                                    CONFIG_DIR,
                                    config_from_dict,
                                    expand_config_dir,
                                    load_config,
                                    parse_override,
                                    parse_yaml,
                                    set_dotted,
                                    to_dict,
)
from megalign.config.sections import (
                                    AlignConfig,
                                    CheckpointConfig,
                                    Config,
                                    DataConfig,
                                    DebugConfig,
                                    DiffusionConfig,
                                    EvaluationConfig,
                                    Fp8Config,
                                    LoggingConfig,
                                    ModelConfig,
                                    OptimizerConfig,
                                    ParallelConfig,
                                    RecomputeConfig,
                                    ResilienceConfig,
                                    ScheduleConfig,
                                    Section,
                                    choices,
                                    parse_blend,
)

__all__ = [
    "AlignConfig", "CheckpointConfig", "Config", "DataConfig", "DebugConfig", "DiffusionConfig",
    "EvaluationConfig", "Fp8Config", "LoggingConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "RecomputeConfig", "ResilienceConfig", "ScheduleConfig", "Section",
    "CONFIG_DIR", "check_batches", "check_vocabulary", "choices", "config_from_dict",
    "data_parallel_size", "evaluation_batch_size", "expand_config_dir", "load_config",
    "mask_token_id", "padded_vocab_size",
    "parse_blend", "parse_override", "parse_yaml", "required_vocab_size", "set_dotted", "to_dict",
    "validate",
]

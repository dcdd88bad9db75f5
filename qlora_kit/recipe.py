"""A run's whole configuration: each module's config section, composed, loaded from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import load_config
from .data import DataConfig
from .loading import ModelConfig
from .lora import LoRAConfig
from .quantization import QuantConfig
from .training import TrainConfig


@dataclass
class RunConfig:
    """Everything a training run needs; written resolved into the run folder as config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe YAML and apply `section.key=value` overrides; all problems reported at once."""
    return load_config(RunConfig, path, overrides)

from __future__ import annotations

import pytest

from latentbatch.config import ModelConfig, TrainConfig, preset_config
from latentbatch.errors import ConfigError


def test_model_config_round_trips_through_dict() -> None:
    config = preset_config("compact", 3, 64)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["widths"] == [32, 64, 128]


def test_train_config_round_trips_through_dict() -> None:
    config = TrainConfig("digits", epochs=3, seed=7, loss="mse", limit=100)
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 2}, "channels must be 1"),
        ({"image_size": 30}, "multiple of 4"),
        ({"widths": ()}, "widths must be"),
        ({"latent_channels": 0}, "latent_channels"),
    ],
)
def test_model_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"loss": "l1"}, "unknown loss"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"limit": 1}, "limit"),
    ],
)
def test_train_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_unknown_preset_and_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(ConfigError, match=r"unknown keys \['depth'\]"):
        ModelConfig.from_dict({"depth": 3})


def test_configs_are_frozen() -> None:
    config = preset_config("seed")
    with pytest.raises(AttributeError):
        config.channels = 3  # type: ignore[misc]

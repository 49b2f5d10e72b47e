from __future__ import annotations

import pytest

from latentbatch.config import DEFAULT_LAMBDA, ModelConfig, TrainConfig, preset_config
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
        ({"rate_lambda": 0.0}, "lambda must be positive"),
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


def test_codec_preset_has_its_own_training_defaults_and_levels() -> None:
    codec = TrainConfig.for_preset("codec", "mnist5k")
    assert (codec.epochs, codec.batch_size, codec.learning_rate) == (40, 64, 2e-3)
    assert (codec.loss, codec.rate_lambda) == ("mse", DEFAULT_LAMBDA)
    chosen = TrainConfig.for_preset("codec", "digits", rate_lambda=0.02, epochs=None, seed=3)
    assert (chosen.rate_lambda, chosen.epochs, chosen.seed) == (0.02, 40, 3)
    assert TrainConfig.for_preset("seed") == TrainConfig()
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        TrainConfig.for_preset("huge")
    config = preset_config("codec")
    assert config.quantized and config.levels == 2 and config.latent_shape == (16, 7, 7)
    assert not preset_config("compact").quantized and preset_config("compact").levels == 2


@pytest.mark.parametrize(
    ("preset", "kwargs", "message"),
    [
        ("codec", {"rate_lambda": None}, "needs a lambda"),
        ("codec", {"loss": "bce"}, "distortion is MSE, not bce"),
        ("seed", {"rate_lambda": 0.01}, "seed preset has no rate to trade"),
    ],
)
def test_settings_that_do_not_fit_the_preset_are_refused(
    preset: str, kwargs: dict, message: str
) -> None:
    base = TrainConfig.for_preset(preset)
    train_config = TrainConfig.from_dict({**base.to_dict(), **kwargs})
    with pytest.raises(ConfigError, match=message):
        train_config.check_preset(preset_config(preset))

from pathlib import Path

import pytest

from fedloom.cli import default_config_text
from fedloom.config import ConfigError, RunConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_the_embedded_default_is_valid() -> None:
    import tomllib

    from fedloom.config import parse_config

    config = parse_config(tomllib.loads(default_config_text()))
    assert config.data.dataset == "breast_cancer"
    assert config.federation.rounds == 20


def test_values_are_typed(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
name = "x"
[federation]
rounds = 3
learning_rate = 1
[model]
kind = "mlp"
hidden = [200, 200]
""",
        )
    )
    assert isinstance(config, RunConfig)
    assert config.federation.learning_rate == 1.0
    assert isinstance(config.federation.learning_rate, float)
    assert config.model.hidden == [200, 200]
    assert config.data == RunConfig().data


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[federation]\nrounds = 3\nroundz = 4", "federation.roundz", "unknown key"),
        ("colour = 1", "colour", "unknown key"),
        ('[federation]\nrounds = "many"', "federation.rounds", "expected int, got str"),
        ("[federation]\nrounds = true", "federation.rounds", "expected int, got bool"),
        ("[federation]\nfraction_fit = 1.5", "federation.fraction_fit", "must be in (0, 1]"),
        ("[federation]\nrounds = 0", "federation.rounds", "must be at least 1"),
        (
            "[data]\nnum_clients = 4\n[federation]\nmin_fit_clients = 5",
            "federation.min_fit_clients",
            "5 exceeds data.num_clients = 4",
        ),
        ('[strategy]\nname = "fedsgd"', "strategy.name", "'fedsgd' is not one of"),
        ("[model]\nhidden = [10, 0]", "model.hidden", "at least 1"),
        ('[model]\nhidden = [10, "a"]', "model.hidden[1]", "expected int"),
        ("federation = 3", "federation", "expected a table"),
        ("[data]\nalpha = -1.0", "data.alpha", "must be > 0"),
        ('[data]\npartition = "natural"', "data.partition", "needs a dataset with owners"),
        ("[federation\n", "(syntax)", ""),
    ],
)
def test_bad_configs_fail_with_file_key_and_reason(
    tmp_path: Path, text: str, key: str, why: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.source == str(path)
    assert err.value.key == key
    assert why in err.value.why
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")

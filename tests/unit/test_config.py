"""Run config: pyproject defaults == dataclass defaults; errors name key, value and what is allowed."""

import tomllib
from pathlib import Path

import pytest

from splitmix.config import ConfigError, EvaluationConfig, FederationConfig, RunConfig, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_match_the_dataclass():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(run_config) == RunConfig()
    assert set(run_config) == set(RunConfig().to_run_config())


def test_overrides_parse_toml_values_and_bare_words():
    assert parse_overrides("num-rounds=3 lr=0.1 dataset=mnist partition='dirichlet'") == {
        "num-rounds": 3,
        "lr": 0.1,
        "dataset": "mnist",
        "partition": "dirichlet",
    }
    cfg = load_config(overrides="num-rounds=3 dataset=digits")
    assert cfg.federation.num_rounds == 3


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("nmu-rounds=3", ["unknown config key 'nmu-rounds'", "num-rounds"]),
        ("num-rounds=abc", ["'num-rounds'", "'abc'", "integer"]),
        ("num-rounds=0", ["'num-rounds'", "0", "[1, inf]"]),
        ("dataset=imagenet", ["'dataset'", "'imagenet'", "digits, mnist, cifar10, svhn"]),
        ("fraction-train=1.5", ["'fraction-train'", "1.5", "(0, 1]"]),
        ("budgets='16-8'", ["'budgets'", "16-8", "atom width"]),
        ("budgets='x-1'", ["'budgets'", "'x'"]),
        ("atom-width=0.3", ["'atom-width'", "0.3", "1/N"]),
        ("eval-lambdas='0.5,2'", ["'eval-lambdas'", "[0, 1]"]),
        ("min-train-clients=99", ["'min-train-clients'", "99", "num-clients"]),
        ("lr-schedule=step", ["'lr-schedule'", "'step'", "cosine, constant"]),
    ],
)
def test_invalid_values_fail_fast_naming_key_value_and_allowed(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_config_file_and_overrides_layer(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('num-rounds = 7\ndataset = "digits"\npartition = "dirichlet"\n')
    cfg = load_config(path, "num-rounds=2")
    assert (cfg.federation.num_rounds, cfg.data.partition) == (2, "dirichlet")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_shipped_configs_are_valid():
    from tools.experiment import load_experiment

    for path in sorted((ROOT / "configs").glob("*.toml")):
        if "methods" in tomllib.loads(path.read_text()):
            load_experiment(str(path))  # an experiment: every method × seed config validates
        else:
            load_config(path)


def test_cli_rejects_bad_config_with_exit_code_2(capsys):
    from splitmix.cli import main

    assert main(["simulate", "--run-config", "num-rounds=-1"]) == 2
    assert "'num-rounds'" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["lr=nan", "adv-lambda=inf", "fraction-train=nan"])
def test_non_finite_numbers_are_rejected(override):
    with pytest.raises(ConfigError, match="finite|range"):
        load_config(overrides=override)


def test_direct_construction_is_type_checked():
    with pytest.raises(ConfigError, match="'num-rounds'.*integer"):
        FederationConfig(num_rounds=2.5)


def test_numbers_typed_for_string_keys_are_taken_as_strings():
    assert load_config(overrides="eval-lambdas=0 budgets=8").evaluation.eval_lambdas == "0"
    with pytest.raises(ConfigError, match="must be a string"):
        EvaluationConfig(eval_lambdas=0)


def test_every_key_belongs_to_exactly_one_section_and_round_trips():
    from splitmix.config import all_sections, key_index

    index = key_index()  # raises when two sections declare one key
    assert set(index) == set(RunConfig().to_run_config())
    assert {section for section, _, _ in index.values()} == set(all_sections())
    cfg = load_config(overrides="sparse-method=dynamic sparse-updates-per-round=7 num-clients=9 vit-depth=3")
    assert cfg.techniques["dynamic"].updates_per_round == 7 and cfg.federation.num_clients == 9 and cfg.model.vit_depth == 3
    assert RunConfig.from_mapping(cfg.to_run_config()) == cfg


def test_technique_sections_validate_themselves_and_their_cross_checks():
    with pytest.raises(ConfigError, match="'sparse-method' = 'uvc'.*not a ViT"):
        load_config(overrides="sparse-method=uvc")
    with pytest.raises(ConfigError, match="'diversity-heads'.*needs a ViT"):
        load_config(overrides="diversity-heads=0.1")
    with pytest.raises(ConfigError, match="'sparse-method' = 'bogus' is not one of: none, static, dynamic"):
        load_config(overrides="sparse-method=bogus")
    with pytest.raises(ConfigError, match="'sparse-drop-fraction' = 2.0 is out of range"):
        load_config(overrides="sparse-drop-fraction=2.0")


def test_docs_configuration_table_is_generated_from_the_dataclasses():
    from splitmix.config import BEGIN_GENERATED, END_GENERATED, markdown_table

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert BEGIN_GENERATED in text and END_GENERATED in text
    generated = text.split(BEGIN_GENERATED, 1)[1].split(END_GENERATED, 1)[0]
    assert generated == markdown_table(), "run `make docs` (python -m splitmix.config --update-docs docs/configuration.md)"

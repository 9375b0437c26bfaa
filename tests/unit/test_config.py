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
        ("num-rounds=0", ["'num-rounds'", "0", "integer in [1, 100000]"]),
        ("num-rounds=100001", ["'num-rounds'", "100001", "integer in [1, 100000]"]),
        ("num-rounds=1e9", ["'num-rounds'", "1000000000.0", "TOML integer", "integer in [1, 100000]"]),
        ("num-clients=2.5", ["'num-clients'", "2.5", "TOML integer", "integer in [1, 1000000]"]),
        ("""num-clients='"3"'""", ["'num-clients'", "'3'", "TOML integer"]),
        ("batch-size=true", ["'batch-size'", "True", "TOML integer", "integer in [2, 65536]"]),
        ("budgets='8--4'", ["'budgets'", "'8--4'", "empty level", "NdM"]),
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


@pytest.mark.parametrize("override", ["num-rounds=-1", "num-rounds=1e9", "num-rounds=1000000000"])
def test_cli_rejects_bad_config_with_exit_code_2(capsys, override):
    from splitmix.cli import main

    # eval-lambdas without 0 fails in a later section: were the num-rounds check missing, no simulation could start either
    assert main(["simulate", "--run-config", f"{override} eval-lambdas='0.5'"]) == 2  # before Ray starts: the config is checked first
    err = capsys.readouterr().err
    assert "'num-rounds'" in err and "integer in [1, 100000]" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("override", ["lr=nan", "adv-lambda=inf", "fraction-train=nan"])
def test_non_finite_numbers_are_rejected(override):
    with pytest.raises(ConfigError, match="finite|range"):
        load_config(overrides=override)


def test_direct_construction_is_type_checked():
    with pytest.raises(ConfigError, match="'num-rounds'.*integer"):
        FederationConfig(num_rounds=2.5)
    with pytest.raises(ConfigError, match="'num-rounds' = 3.0 must be a TOML integer"):
        FederationConfig(num_rounds=3.0)


def _int_fields():
    from splitmix.config import key_index
    from splitmix.sections import type_name

    return [(key, f) for key, (_, _, f) in key_index().items() if type_name(f) == "int"]


@pytest.mark.parametrize("value", [1e9, 3.0, 2.5, "3", True, None])
def test_every_integer_key_takes_only_toml_integers(value):
    """One rule for all integer keys: a float (integral or not), a string, a bool is refused,
    naming the key, the value and the allowed range."""
    from splitmix.sections import allowed_text, check_value

    fields = _int_fields()
    assert len(fields) == 20  # 18 in the core sections, 2 in technique sections
    for key, f in fields:
        with pytest.raises(ConfigError) as err:
            check_value(f, value)
        assert f"config key '{key}' = {value!r} must be a TOML integer" in str(err.value)
        assert allowed_text(f) in str(err.value)
        check_value(f, f.default)  # while the default (an int) passes


def test_core_integer_keys_have_upper_bounds_that_catch_typos():
    from splitmix.config import CORE_SECTIONS
    from splitmix.sections import check_value, section_fields, type_name

    bounded = 0
    for cls in CORE_SECTIONS.values():
        for key, f in section_fields(cls):
            if type_name(f) != "int":
                continue
            hi = f.metadata["range"][1]
            assert hi is not None and f.default < hi, key
            check_value(f, hi)
            with pytest.raises(ConfigError, match=f"'{key}' = {hi + 1} is out of range"):
                check_value(f, hi + 1)
            bounded += 1
    assert bounded == 18


@pytest.mark.parametrize(
    "budgets,problem",
    [
        ("8--4", "empty level"),
        ("-8-4", "empty level"),
        ("8-4-", "empty level"),
        ("", "is empty"),
        ("8 -4", "level '8 '"),
        ("+8-4", "level '+8'"),
        ("8-2.5", "level '2.5'"),
        ("8-x", "level 'x'"),
        ("8-0", "width of 1/0"),
        ("8d9", "width of 9/8"),
    ],
)
def test_budgets_are_parsed_strictly(budgets, problem):
    with pytest.raises(ConfigError) as err:
        FederationConfig(budgets=budgets)
    message = str(err.value)
    assert message.startswith(f"config key 'budgets' = '{budgets}' ") and problem in message
    assert "N or NdM" not in message or problem.startswith("level")
    assert "'8-4-2-1'" in message and "\n" not in message  # the allowed form, on one line


def test_budget_levels_give_their_widths():
    from splitmix.profiles import parse_budgets

    assert parse_budgets("8-4-8d3-2") == [0.125, 0.25, 0.375, 0.5]
    assert parse_budgets("1") == [1.0]


def test_a_repeated_run_config_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="run-config key 'num-rounds' is given twice \\(num-rounds=3 and num-rounds=5\\)"):
        parse_overrides("num-rounds=3 lr=0.1 num-rounds=5")


def test_cli_refuses_a_key_repeated_across_run_config_options(capsys, tmp_path):
    from splitmix.cli import main

    # num-clients=0 would fail later: were the repeat missed, no simulation could start either
    assert main(["simulate", "--run-config", "num-rounds=3", "--run-config", "num-rounds=5 num-clients=0"]) == 2
    assert "run-config key 'num-rounds' is given twice" in capsys.readouterr().err
    # several options with different keys are one override string; a file layer below is no repeat
    (tmp_path / "run.toml").write_text("num-rounds = 7\n")
    cfg = load_config(tmp_path / "run.toml", " ".join(["num-rounds=2", "lr=0.1"]))
    assert (cfg.federation.num_rounds, cfg.training.lr) == (2, 0.1)


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

"""The client optimizer registry: names, torch parity, artifacts, state across rounds (issue 8)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from techniques import optimizers as optim
from techniques.l2o.tasks import MLPTask
from techniques.optimizers import (
    LEARNED,
    OPTIMIZERS,
    L2OSettings,
    default_artifacts_dir,
    ensure_default_artifacts,
    export_state,
    import_state,
    load_artifact,
    make_optimizer,
    missing_artifacts,
    persistent_keys,
)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny artifacts, shared by every test file of the session (the lock makes that safe)."""
    return ensure_default_artifacts(tmp_path_factory.getbasetemp() / "l2o-tiny", L2OSettings.tiny())


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, task: MLPTask, seed: int, n: int) -> None:
    stream = task.batches(seed)
    for _ in range(n):
        x, y = next(stream)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_names_and_unknown_name() -> None:
    assert OPTIMIZERS == ("sgd", "adam", "symbolic-l2o", "lstm-l2o", "amalgamated-l2o")
    assert set(LEARNED) < set(OPTIMIZERS)
    with pytest.raises(ValueError, match="allowed: sgd, adam, symbolic-l2o"):
        make_optimizer("lion", [torch.nn.Parameter(torch.zeros(2))], 0.1)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)),
        ("adam", lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=5e-4)),
    ],
)
def test_analytic_optimizers_match_torch(name: str, reference) -> None:
    task = MLPTask()
    a, b = task.model(0), task.model(0)
    _steps(a, make_optimizer(name, a.parameters(), 0.05, momentum=0.9, weight_decay=5e-4), task, 1, 3)
    _steps(b, reference(b.parameters()), task, 1, 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", LEARNED)
def test_learned_optimizers_reduce_heldout_loss(name: str, artifacts: Path) -> None:
    task = MLPTask(hidden=48, partition="heldout")  # not the meta-training width, data or seeds
    model = task.model(31337)
    before = task.full_loss(model)
    _steps(model, make_optimizer(name, model.named_parameters(), 0.01, momentum=0.9, weight_decay=0.0, artifacts=artifacts), task, 31337, 100)
    assert task.full_loss(model) < 0.3 * before


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_travels_across_rounds(name: str, artifacts: Path) -> None:
    """Exported with every key, the state resumes exactly; by default only persistent keys go."""
    task = MLPTask()
    model = task.model(2)
    opt = make_optimizer(name, model.named_parameters(), 0.01, momentum=0.9, artifacts=artifacts)
    _steps(model, opt, task, 0, 3)
    everything = export_state(opt, keys={k for st in opt.state.values() for k in st})
    default = export_state(opt)
    assert all(k.split("/", 1)[0] in dict(model.named_parameters()) for k in everything)
    assert {k.split("/", 1)[1] for k in default} <= set(persistent_keys(opt))
    if name in ("lstm-l2o", "amalgamated-l2o"):
        assert not any(k.endswith(("/h", "/c")) for k in default)  # LSTM memory is reset each round
        assert {k.split("/", 1)[1] for k in default} == {"step", "exp_avg", "exp_avg_sq"}
    clone = copy.deepcopy(model)
    resumed = make_optimizer(name, clone.named_parameters(), 0.01, momentum=0.9, artifacts=artifacts, state=everything)
    _steps(model, opt, task, 7, 2)
    _steps(clone, resumed, task, 7, 2)
    for pa, pb in zip(model.parameters(), clone.parameters()):
        assert torch.equal(pa, pb)
    partial = make_optimizer(name, copy.deepcopy(model).named_parameters(), 0.01, momentum=0.9, artifacts=artifacts)
    assert import_state(partial, default) == (len(list(model.parameters())) if default else 0)


def test_import_skips_changed_shapes() -> None:
    a = torch.nn.Linear(4, 3)
    opt = make_optimizer("adam", a.named_parameters(), 0.01)
    a(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = export_state(opt)
    b = torch.nn.Linear(5, 3)  # the weight no longer fits, the bias does
    assert import_state(make_optimizer("adam", b.named_parameters(), 0.01), state) == 1


def test_artifact_folder_and_cache(artifacts: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert missing_artifacts(artifacts) == []
    manifest = (artifacts / "manifest.json").read_text()
    assert '"formula"' in manifest and '"seconds"' in manifest
    stamp = (artifacts / "lstm.safetensors").stat().st_mtime_ns
    assert ensure_default_artifacts(artifacts, L2OSettings.tiny()) == artifacts  # complete: nothing retrained
    assert (artifacts / "lstm.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setenv(optim.ENV_DIR, str(tmp_path / "cache"))
    assert default_artifacts_dir() == tmp_path / "cache" / "default"
    assert missing_artifacts(tmp_path / "cache" / "default") == list(optim.FILES)
    with pytest.raises(FileNotFoundError, match="splitmix l2o train"):
        load_artifact("lstm-l2o", tmp_path / "empty")
    rule = load_artifact("symbolic-l2o", artifacts)
    assert rule.formula() in manifest


def test_no_pickle_on_the_load_path(artifacts: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(artifacts / "amalgamated.safetensors"), "pt") as fh:
        assert "config" in fh.metadata() and len(list(fh.keys())) > 0


def test_state_survives_a_flower_array_record() -> None:
    from flwr.app import ArrayRecord

    model = torch.nn.Linear(3, 2)
    opt = make_optimizer("adam", model.named_parameters(), 0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    back = ArrayRecord(torch_state_dict=export_state(opt)).to_torch_state_dict()
    again = make_optimizer("adam", model.named_parameters(), 0.01, state=back)
    assert torch.equal(again.state[model.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


def test_cli_evaluate_writes_curves(artifacts: Path, tmp_path: Path) -> None:
    import argparse
    import json

    from tools import l2o as l2o_cli

    parser = argparse.ArgumentParser(prog="splitmix")
    l2o_cli.add_l2o_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval"
    args = parser.parse_args(
        ["l2o", "evaluate", "--artifacts", str(artifacts), "--out", str(out), "--steps", "10", "--seeds", "1", "--every", "5", "--threads", "1"]
    )
    assert args.func(args) == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "curves.csv", "loss_curves.png"}
    results = json.loads((out / "results.json").read_text())["results"]
    assert {"sgd", "adam", *LEARNED, "teacher:rmsprop"} <= set(results)
    bad = parser.parse_args(["l2o", "evaluate", "--artifacts", str(tmp_path / "none"), "--out", str(out)])
    assert bad.func(bad) == 2


def test_learned_optimizer_state_is_kept_in_the_node_context_between_rounds():
    """The optimizer technique's hooks: a round stores the optimizer's state in the node's
    Context; the next round on the same units gets exactly that state back."""
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from techniques.optimizers import LearnedOptimizer, OptimizerSection

    technique = LearnedOptimizer(OptimizerSection(optimizer="adam"))
    context = SimpleNamespace(state=RecordDict())
    rnd = SimpleNamespace(units=["base1", "base2"], context=context, optimizer_state="unset")
    hooks = technique.client_round(rnd)
    hooks.before_training(rnd)
    assert rnd.optimizer_state is None  # a node's first round: nothing kept yet
    kept = {"w/exp_avg": torch.arange(4.0), "w/step": torch.tensor(3.0)}
    hooks.after_training(rnd, SimpleNamespace(optimizer_state=kept))
    again = SimpleNamespace(units=["base1", "base2"], context=context, optimizer_state=None)
    technique.client_round(again).before_training(again)
    assert set(again.optimizer_state) == set(kept)
    # the codec sends a 0-d tensor as 1-d: compare values at the kept shape
    assert all(torch.equal(again.optimizer_state[k].reshape(kept[k].shape), kept[k]) for k in kept)

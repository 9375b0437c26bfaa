"""The client optimizer registry: names, torch parity, artifacts, state across rounds (issue 8)."""

from __future__ import annotations

import copy
import json
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
        torch.testing.assert_close(pa, pb)


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
        torch.testing.assert_close(pa, pb)
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
    torch.testing.assert_close(again.state[model.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


def test_cli_evaluate_writes_curves(artifacts: Path, tmp_path: Path) -> None:
    import argparse
    import json

    from tools import l2o as l2o_cli

    parser = argparse.ArgumentParser(prog="splitmix")
    l2o_cli.add_l2o_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval"
    record_path = tmp_path / "record.json"
    argv = ["l2o", "evaluate", "--artifacts", str(artifacts), "--out", str(out), "--steps", "10", "--seeds", "2", "--every", "5"]
    args = parser.parse_args([*argv, "--tune-seeds", "1", "--threads", "1", "--results", str(record_path)])
    assert args.func(args) == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "curves.csv", "loss_curves.png"}
    payload = json.loads((out / "results.json").read_text())
    results = payload["results"]
    assert {"sgd", "adam", *LEARNED, "teacher:rmsprop"} <= set(results)
    assert not set(payload["seeds"]) & set(payload["tune_seeds"])  # rates chosen on other seeds than reported
    for label in ("sgd", "adam", "teacher:rmsprop"):  # each tuned rate is the best validation score of its grid
        grid = {float(k): v for k, v in results[label]["grid"].items()}
        assert results[label]["lr"] == pytest.approx(min(grid, key=grid.__getitem__))
        assert results[label]["at_edge"] == (results[label]["lr"] in (min(grid), max(grid)))
    record = json.loads(record_path.read_text())
    assert record["kind"] == "table" and len(record["rows"]) == len(results)
    assert all(len(row) == len(record["columns"]) for row in record["rows"])
    assert {"commit", "dirty", "versions", "wall_s", "command"} <= set(record["provenance"])
    overlap = parser.parse_args([*argv, "--tune-first-seed", "1000"])
    assert overlap.func(overlap) == 2
    bad = parser.parse_args(["l2o", "evaluate", "--artifacts", str(tmp_path / "none"), "--out", str(out)])
    assert bad.func(bad) == 2


def _round(technique, units: list[str], context, optimizer: str = "adam"):
    from types import SimpleNamespace

    task = SimpleNamespace(train=SimpleNamespace(optimizer=optimizer, l2o_sha256="", l2o_artifacts=""))
    return SimpleNamespace(units=units, context=context, task=task, optimizer_state="unset")


def test_optimizer_state_is_kept_per_base_and_restored_in_a_rotated_order():
    """Two bases trained as a stack [base1, base2] with Adam; the next round the client gets them
    as [base2, base1]: each base's slice of the resumed state is that base's own moments (the
    stack's rows move with their base), and the step goes on from the kept one."""
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from techniques.optimizers import LearnedOptimizer, OptimizerSection

    technique = LearnedOptimizer(OptimizerSection(optimizer="adam"))
    context = SimpleNamespace(state=RecordDict())
    first = _round(technique, ["base1", "base2"], context)
    technique.client_round(first).before_training(first)
    assert first.optimizer_state is None  # a node's first round: nothing kept yet
    stack = torch.nn.Linear(3, 4)  # a 2-stack: rows 0–1 are base1's, rows 2–3 base2's
    opt = make_optimizer("adam", stack.named_parameters(), 0.01)
    for _ in range(3):
        opt.zero_grad()
        stack(torch.randn(5, 3, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()
        opt.step()
    kept = export_state(opt)
    technique.client_round(first).after_training(first, SimpleNamespace(optimizer_state=kept))
    rotated = _round(technique, ["base2", "base1"], context)
    technique.client_round(rotated).before_training(rotated)
    restored = rotated.optimizer_state
    assert restored is not None, "nothing restored for a rotated set of the same bases"
    for key in ("weight/exp_avg", "weight/exp_avg_sq", "bias/exp_avg"):
        torch.testing.assert_close(restored[key][:2], kept[key][2:])  # base2 first now
        torch.testing.assert_close(restored[key][2:], kept[key][:2])
    torch.testing.assert_close(restored["weight/step"].reshape(()), kept["weight/step"].reshape(()))
    # a round with one kept base and one new: the new base's rows start from zero moments
    partial = _round(technique, ["base3", "base1"], context)
    technique.client_round(partial).before_training(partial)
    torch.testing.assert_close(partial.optimizer_state["weight/exp_avg"][:2], torch.zeros(2, 3))
    torch.testing.assert_close(partial.optimizer_state["weight/exp_avg"][2:], kept["weight/exp_avg"][:2])


def test_split_and_join_state_are_inverse_for_flat_learned_state():
    """A learned optimizer keeps one row per scalar (flattened, row-major): chunks of the flat
    vector are the bases' chunks of dim 0, so split → join in the same order is the identity."""
    from techniques.optimizers import join_state, split_state

    state = {"w/exp_avg": torch.arange(24.0), "w/step": torch.tensor(5.0), "b/exp_avg_sq": torch.arange(4.0).reshape(4, 1)}
    parts = split_state(state, ["base0", "base7"])
    torch.testing.assert_close(parts["base7"]["w/exp_avg"], torch.arange(12.0, 24.0))
    again = join_state(parts, ["base0", "base7"])
    assert again is not None and set(again) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(again[key].reshape(value.shape), value)
    with pytest.raises(ValueError, match="does not split into 3 units"):
        split_state({"w/exp_avg": torch.zeros(4)}, ["a", "b", "c"])


def test_clients_never_train_artifacts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A client without an artifact fails with one line naming the command; nothing is trained."""
    monkeypatch.setenv(optim.ENV_DIR, str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="splitmix l2o train"):
        make_optimizer("symbolic-l2o", [torch.nn.Parameter(torch.zeros(2))], 0.01)
    assert not (tmp_path / "cache" / "default" / "symbolic.json").exists()


def test_server_hashes_its_artifact_and_every_node_checks_it(artifacts: Path, tmp_path: Path) -> None:
    """The task carries the server's artifact digest; a node with the same files passes, a node
    with another rule or none fails its start-up check, and the server turns that into one line."""
    import shutil
    from dataclasses import replace

    from server.federation import _stop_on_node_check
    from splitmix.config import load_config
    from techniques.base import NODE_CHECK_FAILED, NodeCheckError
    from techniques.optimizers import LearnedOptimizer, OptimizerSection, artifact_digest

    run = load_config(overrides=f"num-clients=2 optimizer='symbolic-l2o' l2o-artifacts='{artifacts}'")
    task = run.client_task()
    assert task.train.l2o_sha256 == artifact_digest("symbolic-l2o", artifacts)
    technique = LearnedOptimizer(OptimizerSection(optimizer="symbolic-l2o", l2o_artifacts=str(artifacts)))
    technique.check_node(task)  # the server's own folder: the same digest
    other = tmp_path / "other"
    shutil.copytree(artifacts, other)
    rule = json.loads((other / "symbolic.json").read_text())
    rule["constants"][0] = float(rule["constants"][0]) * 2 + 1
    (other / "symbolic.json").write_text(json.dumps(rule))
    with pytest.raises(NodeCheckError, match="is not the server's") as info:
        technique.check_node(replace(task, train=replace(task.train, l2o_artifacts=str(other))))
    with pytest.raises(NodeCheckError, match="no artifact"):
        technique.check_node(replace(task, train=replace(task.train, l2o_artifacts=str(tmp_path / "none"))))
    reason = f"node 7: profile query failed: <class 'techniques.base.NodeCheckError'>:<'{info.value}'>"
    with pytest.raises(RuntimeError) as stop:
        _stop_on_node_check(["node 3: profile query failed: timeout", reason])
    message = str(stop.value)
    assert message.startswith(f"node 7: {NODE_CHECK_FAILED}: learned optimizer 'symbolic-l2o'") and "\n" not in message
    _stop_on_node_check(["node 3: profile query failed: timeout"])  # other failures do not stop the run
    # A simulation asks no profile: the node's first train message runs the check instead.
    from clients.app import check_node_once

    mismatched = replace(task, train=replace(task.train, l2o_artifacts=str(other)))
    with pytest.raises(NodeCheckError, match="is not the server's"):
        check_node_once(mismatched.to_json(), mismatched)
    train_failure = f"round 1: node 9 (partition 1) failed: <class 'techniques.base.NodeCheckError'>:<'{info.value}'>"
    with pytest.raises(RuntimeError) as stop:
        _stop_on_node_check([train_failure])
    assert str(stop.value).startswith(f"round 1: node 9 (partition 1): {NODE_CHECK_FAILED}: learned optimizer")


def test_simulate_without_the_servers_artifact_stops_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The server hashes its artifact before Ray starts: a missing one is one line, exit code 2."""
    from splitmix.cli import main

    code = main(["simulate", "--run-config", f"optimizer='symbolic-l2o' l2o-artifacts='{tmp_path}' num-clients=4 num-rounds=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "splitmix l2o train" in err[0], err

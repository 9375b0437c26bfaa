"""`splitmix prune`: structured lottery ticket of a served model — exact channel sparsity, sliced ==
masked, smaller model, rebuild from architecture.json + safetensors, CLI errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from models.blocks import routed
from models.cnn import DigitCNN
from models.cost import count_params
from models.slice_channels import kept_channels
from server.federation import run_federation
from splitmix import data as client_data
from splitmix.config import RunConfig, load_config
from techniques.pruning import init_masks, refill
from tools import prune
from tools.prune import PruneSettings, exact_refill, load_pruned, run_pruning


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores: oversubscribed OpenMP is 10× slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import InProcessGrid

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        overrides=f"num-clients=4 num-rounds=1 local-epochs=1 adv-fraction=0 pgd-steps=1 eval-pgd-steps=0 "
        f"eval-lambdas='0,1' out-dir='{out}' run-name=p"
    )
    return run_federation(InProcessGrid(4), cfg)


@pytest.fixture(scope="module")
def pruned(run_dir, tmp_path_factory):
    settings = PruneSettings(width=0.5, channel_sparsity=0.7, imp_rounds=2, epochs=1, timing_repeats=2)
    return run_pruning(run_dir, settings, out=tmp_path_factory.mktemp("pruned") / "w0.5")


def _test_x(run_dir, n=64):
    cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text())["run_config"])
    return client_data.test_data(cfg.data_config()).x[:n]


def test_exact_channel_sparsity_per_layer(pruned):
    card, s = pruned.card, 0.7
    channels = card["channel_sparsity"]["channels_per_base"]
    assert set(channels) == {"conv1", "conv2", "conv3", "fc1"}
    assert {name: c["dense"] for name, c in channels.items()} == {"conv1": 8, "conv2": 16, "conv3": 32, "fc1": 64}
    for name, c in channels.items():
        assert c["kept"] == max(1, round((1 - s) * c["dense"]))  # 2, 5, 10, 19 per base
        assert abs(card["channel_sparsity"]["achieved"][name] - s) <= 1.0 / c["dense"]  # within one channel
    # the masked ticket really has those channels zero, in every one of the 4 bases
    keep = kept_channels(pruned.masked, pruned.masks)
    for name, rows in keep.items():
        assert rows.view(4, -1).sum(dim=1).tolist() == [channels[name]["kept"]] * 4
        w = pruned.masked.get_parameter(f"{name}.weight").detach()
        assert bool((w.reshape(w.shape[0], -1)[~rows] == 0).all())
    # history: 2 IMP stages + the final one, which sits at the requested sparsity
    assert [h["kind"] for h in pruned.history] == ["imp", "imp", "final"]
    assert pruned.history[0]["channel_sparsity"] == 0.0 and pruned.history[1]["channel_sparsity"] > 0.0
    assert pruned.history[-1]["layers"] == card["channel_sparsity"]["achieved"]
    assert card["weight_sparsity"] == pytest.approx(card["weight_sparsity_sliced"])  # masked zeros = what slicing removed


def test_sliced_equals_masked_and_is_smaller(pruned, run_dir):
    x = _test_x(run_dir)
    with torch.no_grad():
        torch.testing.assert_close(pruned.sliced(x), pruned.masked.eval()(x), atol=1e-5, rtol=1e-5)
    card = pruned.card
    assert card["accuracy"]["masked"] == card["accuracy"]["sliced"]
    assert card["max_abs_logit_diff_masked_vs_sliced"] < 1e-5
    # the sliced model is exactly a DigitCNN with the kept channel counts
    kept = [card["channel_sparsity"]["channels_per_base"][n]["kept"] for n in ("conv1", "conv2", "conv3", "fc1")]
    reference = DigitCNN(width=1.0, num_bases=4, dual_bn=True, channels=tuple(kept[:3]), hidden=kept[3])
    assert card["params"]["sliced"] == count_params(reference) == count_params(pruned.sliced)
    assert card["params"]["dense"] == 60_872  # 4 bases of the 1/8-width CNN (README's table)
    s = 0.7  # conv/linear weights scale by ~(1-s)^2, BN and the ends by ~(1-s)
    assert (1 - s) ** 2 < card["params"]["ratio"] < (1 - s)
    assert (1 - s) ** 2 < card["macs"]["ratio"] < (1 - s)
    assert card["inference_cpu"]["eager"]["sliced_ms"] > 0 and card["inference_cpu"]["fused"]["speedup"] > 0


def test_load_pruned_reproduces_logits(pruned, run_dir):
    folder = pruned.folder
    for name in ("model.safetensors", "architecture.json", "model_card.json", "history.json", "history.csv"):
        assert (folder / name).is_file(), name
    arch = json.loads((folder / "architecture.json").read_text())
    assert arch["layers"]["conv2"]["out_per_base"] == 5 and arch["layers"]["fc1"]["in_per_base"] == 10 * 4
    state = load_file(str(folder / "model.safetensors"))
    assert state["conv2.weight"].shape == (4 * 5, 2, 3, 3)
    model = load_pruned(folder)
    x = _test_x(run_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pruned.sliced(x), atol=0, rtol=0)
        torch.testing.assert_close(model(x), pruned.masked.eval()(x), atol=1e-5, rtol=1e-5)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["width"] == 0.5 and card["bases"] == [0, 1, 2, 3] and card["channel_sparsity"]["requested"] == 0.7
    assert len((folder / "history.csv").read_text().splitlines()) == 1 + 3


def test_robust_best_bases_one_partition(run_dir, tmp_path):
    """λ > 0 fine-tunes both BN paths (PGD); the λ-mix route survives slicing and reloading."""
    settings = PruneSettings(width=0.25, channel_sparsity=0.5, robustness=0.5, select="best", partition=1, imp_rounds=1, epochs=1, timing_repeats=1)
    result = run_pruning(run_dir, settings, out=tmp_path / "robust")
    card = result.card
    cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text())["run_config"])
    assert card["fine_tune"]["examples"] == len(client_data.client_train_data(cfg.data_config(), 1))
    assert "partition 1" in card["fine_tune"]["data"] and "PGD" in card["fine_tune"]["loss"]
    assert len(card["bases"]) == 2 and card["robustness"] == 0.5
    assert all(c["kept"] == round(0.5 * c["dense"]) for c in card["channel_sparsity"]["channels_per_base"].values())
    model = load_pruned(result.folder)
    x = _test_x(run_dir, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.masked.eval()(x), atol=1e-5, rtol=1e-5)
        with routed(model, "clean"):
            clean = model(x)
        assert not torch.allclose(clean, model(x))  # λ = 0.5 is a real mix of the two paths


def test_exact_refill_restores_channels_by_trained_magnitude():
    torch.manual_seed(0)
    model = DigitCNN(width=0.125, num_bases=2)
    over = refill(model, init_masks(model), channel_sparsity=0.75)  # IMP went too far: 2 of 8 conv1 channels
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = exact_refill(model, over, 0.5, reference)
    before, after = kept_channels(model, over), kept_channels(model, masks)
    for name in before:
        assert after[name].view(2, -1).sum(dim=1).tolist() == [after[name].numel() // 4] * 2  # exactly half per base
        assert bool((after[name] | ~before[name]).all())  # every channel IMP kept is still kept
    rows = reference["conv1.weight"].abs().reshape(16, -1).sum(dim=1)[:8]  # base 0
    added = (after["conv1"] & ~before["conv1"])[:8]
    assert rows[added].min() >= rows[~after["conv1"][:8]].max()  # the re-added ones are the largest |w|


def test_architecture_round_trip_preresnet():
    """architecture.json rebuilds any sliced family, e.g. PreActResNet-18 (block-internal channels)."""
    from models.preresnet import PreActResNet18
    from models.slice_channels import slice_channels
    from techniques.pruning import apply_masks_
    from tools.prune import build_from_architecture, describe_architecture

    torch.manual_seed(0)
    model = PreActResNet18(width=1 / 16, num_bases=2, in_channels=3, dual_bn=True)
    masks = refill(model, init_masks(model), channel_sparsity=0.5)
    sliced = slice_channels(apply_masks_(model, masks), kept_channels(model, masks)).eval()
    build = {"name": "preresnet18", "width": 1 / 16, "num_bases": 2, "num_classes": 10, "in_channels": 3, "image_size": 32, "dual_bn": True}
    arch = json.loads(json.dumps(describe_architecture(sliced, build, 0.0)))
    assert arch["layers"]["layers.0.conv1"]["out_per_base"] == 2 and arch["norms"]["layers.0.bn2"]["num_features"] == 4
    rebuilt = build_from_architecture(arch)
    rebuilt.load_state_dict(sliced.state_dict(), strict=True)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), sliced(x), atol=0, rtol=0)
        torch.testing.assert_close(rebuilt(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_cli_prints_table_and_folder_last(run_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = prune.main(
        [str(run_dir), "--width", "0.125", "--channel-sparsity", "0.5", "--imp-rounds", "0", "--epochs", "1", "--repeats", "1", "--out", str(out)]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert stdout.strip().splitlines()[-1] == str(out.resolve())
    assert "sliced" in stdout and (out / "model_card.json").is_file()
    parser = argparse.ArgumentParser(prog="splitmix")
    prune.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prune", str(run_dir), "--width", "1", "--channel-sparsity", "0.5"])
    assert args.func is prune.cmd_prune and args.imp_rounds == 3 and args.epochs == 2 and args.select == "first"


@pytest.mark.parametrize(
    "extra,key",
    [
        (["--width", "0.3", "--channel-sparsity", "0.5"], "width 0.3 is not served"),
        (["--width", "0.5", "--channel-sparsity", "1.0"], "--channel-sparsity 1.0"),
        (["--width", "0.5", "--channel-sparsity", "-0.1"], "--channel-sparsity -0.1"),
        (["--width", "0.5", "--channel-sparsity", "0.5", "--partition", "4"], "--partition 4"),
        (["--width", "0.5", "--channel-sparsity", "0.5", "--robustness", "2"], "robustness 2"),
        (["--width", "0.5", "--channel-sparsity", "0.5", "--rate", "1"], "--rate 1"),
    ],
)
def test_bad_inputs_exit_2_naming_the_key(run_dir, capsys, extra, key):
    assert prune.main([str(run_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err


def test_unknown_run_and_unsupported_family_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    assert prune.main([str(tmp_path / "nope"), "--width", "1", "--channel-sparsity", "0.5"]) == 2
    assert "does not exist" in capsys.readouterr().err

    def no_graph(model):
        raise NotImplementedError(f"no channel dependency graph for {type(model).__name__}")

    monkeypatch.setattr(prune, "channel_graph", no_graph)
    assert prune.main([str(run_dir), "--width", "0.5", "--channel-sparsity", "0.5"]) == 2
    assert "model family 'cnn'" in capsys.readouterr().err

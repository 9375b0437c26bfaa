"""`splitmix prune`: structured lottery ticket of a served model — rewinding to the run's early
checkpoint, IMP's per-layer allocation kept at the requested global channel sparsity, sliced ==
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
from tools.prune import PruneSettings, exact_refill, imp_allocation, load_pruned, run_pruning


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
        overrides=f"num-clients=4 num-rounds=2 rewind-round=1 local-epochs=1 adv-fraction=0 pgd-steps=1 eval-pgd-steps=0 "
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


def test_global_channel_sparsity_with_imps_allocation(pruned):
    card, s = pruned.card, 0.7
    cs = card["channel_sparsity"]
    channels = cs["channels_per_base"]
    assert {name: c["dense"] for name, c in channels.items()} == {"conv1": 8, "conv2": 16, "conv3": 32, "fc1": 64}
    kept = {name: c["kept"] for name, c in channels.items()}
    assert sum(kept.values()) == round((1 - s) * 120) == 36  # global: 36 of 8 + 16 + 32 + 64 channels per base
    assert cs["global"] == pytest.approx(1 - 36 / 120)
    assert kept == imp_allocation(cs["imp_kept_per_base"], {n: c["dense"] for n, c in channels.items()}, s)  # IMP's shares, scaled
    assert len({kept[n] / channels[n]["dense"] for n in kept}) > 1  # and IMP's shares are not uniform here
    # the masked ticket really has those channels zero, in every one of the 4 bases
    keep = kept_channels(pruned.masked, pruned.masks)
    for name, rows in keep.items():
        assert rows.view(4, -1).sum(dim=1).tolist() == [kept[name]] * 4
        w = pruned.masked.get_parameter(f"{name}.weight").detach()
        assert bool((w.reshape(w.shape[0], -1)[~rows] == 0).all())
    # history: IMP round 2 trains round 1's masks from the rewind point, then the final ticket
    assert [h["kind"] for h in pruned.history] == ["imp", "final"]
    assert pruned.history[0]["channel_sparsity"] > 0.0
    assert pruned.history[-1]["layers"] == cs["achieved"]
    assert card["weight_sparsity"] == pytest.approx(card["weight_sparsity_sliced"])  # masked zeros = what slicing removed
    assert card["imp"]["rewind_round"] == 1 and "round 1 of 2" in card["imp"]["rewind"]


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
    assert card["params"]["ratio"] < 0.3 and card["macs"]["ratio"] < 0.5  # 36 of 120 channels per base kept
    assert card["inference_cpu"]["eager"]["sliced_ms"] > 0 and card["inference_cpu"]["fused"]["speedup"] > 0


def test_load_pruned_reproduces_logits(pruned, run_dir):
    folder = pruned.folder
    for name in ("model.safetensors", "architecture.json", "model_card.json", "history.json", "history.csv"):
        assert (folder / name).is_file(), name
    arch = json.loads((folder / "architecture.json").read_text())
    kept = {n: c["kept"] for n, c in pruned.card["channel_sparsity"]["channels_per_base"].items()}
    assert arch["layers"]["conv2"]["out_per_base"] == kept["conv2"] and arch["layers"]["fc1"]["in_per_base"] == kept["conv3"] * 4
    state = load_file(str(folder / "model.safetensors"))
    assert state["conv2.weight"].shape == (4 * kept["conv2"], kept["conv1"], 3, 3)
    model = load_pruned(folder)
    x = _test_x(run_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pruned.sliced(x), atol=0, rtol=0)
        torch.testing.assert_close(model(x), pruned.masked.eval()(x), atol=1e-5, rtol=1e-5)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["width"] == 0.5 and card["bases"] == [0, 1, 2, 3] and card["channel_sparsity"]["requested"] == 0.7
    assert len((folder / "history.csv").read_text().splitlines()) == 1 + 2


def test_robust_best_bases_one_partition(run_dir, tmp_path):
    """λ > 0 fine-tunes both BN paths (PGD); the λ-mix route survives slicing and reloading."""
    settings = PruneSettings(width=0.25, channel_sparsity=0.5, robustness=0.5, select="best", partition=1, imp_rounds=1, epochs=1, timing_repeats=1)
    result = run_pruning(run_dir, settings, out=tmp_path / "robust")
    card = result.card
    cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text())["run_config"])
    assert card["fine_tune"]["examples"] == len(client_data.client_train_data(cfg.data_config(), 1))
    assert "partition 1" in card["fine_tune"]["data"] and "PGD" in card["fine_tune"]["loss"]
    assert len(card["bases"]) == 2 and card["robustness"] == 0.5
    assert sum(c["kept"] for c in card["channel_sparsity"]["channels_per_base"].values()) == 60  # half of 8 + 16 + 32 + 64
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
    masks = exact_refill(model, over, {"conv1": 4, "conv2": 8, "conv3": 16, "fc1": 32}, reference)
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
        + ["--random-control"]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert stdout.strip().splitlines()[-1] == str(out.resolve())
    assert "sliced" in stdout and (out / "model_card.json").is_file()
    assert "random (same counts)" in stdout and "random (uniform)" in stdout
    card = json.loads((out / "model_card.json").read_text())
    # no IMP rounds: IMP's allocation is the dense one, so the ticket's counts are the uniform ones, 4-8-16-32
    assert card["random_control"]["same_counts"]["kept_per_base"] == card["random_control"]["uniform"]["kept_per_base"]
    assert list(card["random_control"]["uniform"]["kept_per_base"].values()) == [4, 8, 16, 32]
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


def test_rewind_file_is_the_served_state_after_rewind_round(run_dir, tmp_path):
    """rewind.safetensors of the 2-round run = model.safetensors of the same run stopped after
    round 1 (cosine lr starts at the same rate whatever num-rounds is)."""
    from conftest import InProcessGrid

    meta = json.loads((run_dir / "config.json").read_text())["run_config"]
    assert meta["rewind-round"] == 1
    cfg = load_config(
        overrides=f"num-clients=4 num-rounds=1 rewind-round=0 local-epochs=1 adv-fraction=0 pgd-steps=1 eval-pgd-steps=0 "
        f"eval-lambdas='0,1' out-dir='{tmp_path}' run-name=one"
    )
    one = run_federation(InProcessGrid(4), cfg)
    assert not (one / "rewind.safetensors").exists()  # rewind-round = 0: none
    rewind, after_one, final = (load_file(str(p)) for p in (run_dir / "rewind.safetensors", one / "model.safetensors", run_dir / "model.safetensors"))
    assert set(rewind) == set(after_one) == set(final)
    for key in rewind:
        torch.testing.assert_close(rewind[key], after_one[key], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(rewind["base0.conv2.weight"], final["base0.conv2.weight"])  # round 2 moved on


def test_ticket_is_rewound_to_the_early_checkpoint(run_dir, tmp_path):
    """With no fine-tuning (epochs 0) the ticket is its masks applied to the rewind point: every
    kept weight equals the round-1 weight of rewind.safetensors (stacked bases 0-3 of width 0.5),
    and not the trained one; BN statistics are round 1's too."""
    settings = PruneSettings(width=0.5, channel_sparsity=0.5, imp_rounds=2, epochs=0, timing_repeats=1)
    result = run_pruning(run_dir, settings, out=tmp_path / "rewound")
    early, final = load_file(str(run_dir / "rewind.safetensors")), load_file(str(run_dir / "model.safetensors"))
    for name in ("conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight"):
        mask = result.masks[name]
        ticket = result.masked.get_parameter(name).detach()
        stack = lambda state, n=name: torch.cat([state[f"base{b}.{n}"] for b in range(4)])  # noqa: E731
        assert torch.equal(ticket[mask], stack(early)[mask]), name
        assert bool((ticket[~mask] == 0).all()), name
        moved = (stack(early)[mask] - stack(final)[mask]).abs() > 1e-6
        assert float(moved.float().mean()) > 0.9, name  # the trained weights differ almost everywhere
    bn = "bn2.clean.running_mean"
    assert torch.equal(result.masked.state_dict()[bn], torch.cat([early[f"base{b}.{bn}"] for b in range(4)]))
    assert result.card["accuracy"]["masked"] == result.history[-1]["accuracy_before"]  # nothing trained after the rewind


def test_run_without_rewind_point_is_refused_unless_asked(run_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    (bare / "rewind.safetensors").unlink()
    assert prune.main([str(bare), "--width", "0.125", "--channel-sparsity", "0.5", "--imp-rounds", "1", "--epochs", "0", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no rewind.safetensors" in err and "--rewind final" in err
    out = tmp_path / "final"
    args = [str(bare), "--width", "0.125", "--channel-sparsity", "0.5", "--imp-rounds", "1", "--epochs", "0", "--repeats", "1"]
    assert prune.main([*args, "--rewind", "final", "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert "prune and fine-tune" in card["imp"]["rewind"] and card["imp"]["rewind_round"] == 2


def _fit(model, masks, data, epochs: int, seed: int) -> None:
    """Masked SGD on ``data`` (lr 0.05, momentum 0.9, batch 32), masks re-applied every step."""
    from torch.nn import functional as F

    from techniques.pruning import apply_masks_

    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for first in range(0, len(data) - 1, 32):
            idx = order[first : first + 32]
            optimizer.zero_grad()
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            optimizer.step()
            apply_masks_(model, masks)
    model.eval()


def test_found_ticket_beats_random_channels_when_the_parent_uses_some_channels_only():
    """The ticket's mechanism, IMP + refill picking channels by surviving magnitude, on a small
    trained DigitCNN (8-16-32-64 channels) that only uses the last half of every layer's channels
    (the first half held at zero while it trained: a parent with known useless channels). At
    global channel sparsity 0.75 (3-5-8-14 of 8-16-32-64 kept) IMP finds only used channels
    (zero weights rank lowest), so the ticket, rewound to the parent's epoch-1 weights and
    fine-tuned one epoch, stays near the parent; random channels at the same counts (or uniform,
    every layer at 0.75) mostly land on unused ones and, with the same fine-tuning, fall far
    behind. On the federated digits runs, whose channels are all in use, the found ticket does
    *not* beat random channels (results/structured-tickets.json)."""
    import copy

    from models.slice_channels import channel_masks
    from splitmix.data import ArrayData, client_train_data, test_data
    from techniques.pruning import apply_masks_, iterative_magnitude_pruning, rewind_
    from tools.prune import _dense_per_base, _kept_per_base, _producer_names, random_channel_masks

    cfg = load_config(overrides="num-clients=2").data_config()
    parts = [client_train_data(cfg, i) for i in range(2)]
    train, test = ArrayData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])), test_data(cfg)

    def accuracy(model) -> float:
        with torch.no_grad():
            return float((model.eval()(test.x).argmax(-1) == test.y).float().mean())

    torch.manual_seed(0)
    parent = DigitCNN(width=0.125, num_bases=1)
    used = {name: torch.arange(n) >= n // 2 for name, n in {"conv1": 8, "conv2": 16, "conv3": 32, "fc1": 64}.items()}
    used_masks = channel_masks(parent, used)
    apply_masks_(parent, used_masks)
    _fit(parent, used_masks, train, 1, seed=0)
    early = copy.deepcopy(parent.state_dict())  # the rewind point
    _fit(parent, used_masks, train, 4, seed=1)
    acc_parent = accuracy(parent)
    assert acc_parent > 0.9

    s = 0.75
    ticket = copy.deepcopy(parent)
    imp = iterative_magnitude_pruning(
        ticket, lambda m, k: _fit(m, k, train, 1, seed=7), rounds=2, rate=1 - (1 - s) ** 0.5, rewind_state=early,
        structure="refill", names=_producer_names(ticket), final_train=False, trained=True,
    )  # fmt: skip
    dense = _dense_per_base(ticket)
    kept = imp_allocation(_kept_per_base(ticket, imp.masks), dense, s)
    assert sum(kept.values()) == 30  # round(0.25 · 120)
    masks = exact_refill(ticket, imp.masks, kept, dict(parent.state_dict()))
    assert all(bool((rows <= used[name]).all()) for name, rows in kept_channels(ticket, masks).items())  # used channels only
    rewind_(ticket, early, masks)
    _fit(ticket, masks, train, 1, seed=3)
    acc_ticket = accuracy(ticket)
    assert acc_parent - acc_ticket < 0.15
    uniform = imp_allocation(dense, dense, s)  # 2-4-8-16: every layer at 0.75
    for seed in range(3):
        for counts in (kept, uniform):
            control = copy.deepcopy(parent)
            control_masks = random_channel_masks(control, counts, seed)
            rewind_(control, early, control_masks)
            _fit(control, control_masks, train, 1, seed=3)
            assert accuracy(control) < acc_ticket - 0.05, (seed, counts)

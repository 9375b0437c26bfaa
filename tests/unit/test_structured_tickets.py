"""Structured lottery tickets: IMP sparsity and rewinding, refill, greedy row grouping (mask only), physical slicing."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from models.blocks import routed
from models.cnn import DigitCNN
from models.preresnet import PreActResNet18
from models.slice_channels import channel_graph, kept_channels, slice_channels
from techniques.pruning import (
    apply_masks_,
    global_magnitude_prune,
    greedy_row_grouping,
    init_masks,
    iterative_magnitude_pruning,
    prunable_names,
    refill,
    sparsity_report,
)


def _randomise_bn_(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so a removed channel's BN output is not zero."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def _cnn(k: int = 1, dual: bool = False, seed: int = 0) -> DigitCNN:
    torch.manual_seed(seed)
    model = DigitCNN(width=0.125, num_bases=k, dual_bn=dual)  # 8-16-32 channels, 64 hidden
    _randomise_bn_(model)
    return model


def _train_fn(model: torch.nn.Module, masks: dict) -> None:
    """A few masked SGD steps on random data (stands in for any training loop)."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        apply_masks_(model, masks)


def test_imp_exact_sparsity_and_rewinding() -> None:
    model = _cnn()
    _train_fn(model, init_masks(model))  # an early checkpoint, not the initialisation
    checkpoint = {n: t.clone() for n, t in model.state_dict().items()}
    names = prunable_names(model)
    assert "fc2.weight" not in names and not any("bn" in n for n in names)
    total = sum(model.get_parameter(n).numel() for n in names)
    seen_zeros: list[int] = []

    def train_and_count(m: torch.nn.Module, masks: dict) -> None:
        seen_zeros.append(sum(int((m.get_parameter(n) == 0).sum()) for n in names))
        _train_fn(m, masks)

    result = iterative_magnitude_pruning(model, train_and_count, rounds=3, rate=0.2, rewind_state=checkpoint, final_train=False)
    seen_zeros.append(sum(int((model.get_parameter(n) == 0).sum()) for n in names))
    remaining, expected = total, [0]
    for _ in range(3):
        remaining -= round(0.2 * remaining)
        expected.append(total - remaining)
    assert seen_zeros == expected
    assert [h["zeros"] for h in result.history] == expected[1:]
    for name, tensor in model.state_dict().items():  # survivors (and BN) back at the checkpoint
        mask = result.masks.get(name)
        if mask is None:
            assert torch.equal(tensor, checkpoint[name]), name
        else:
            assert torch.equal(tensor[mask], checkpoint[name][mask]) and bool((tensor[~mask] == 0).all()), name


def test_per_base_pruning_keeps_equal_counts() -> None:
    model = _cnn(k=4)
    masks = global_magnitude_prune(model, init_masks(model), 0.3)
    per_base = [sum(int(m.chunk(4)[b].sum()) for m in masks.values()) for b in range(4)]
    assert len(set(per_base)) == 1


@pytest.mark.parametrize("k", [1, 4])
def test_refill_gives_whole_zero_channels(k: int) -> None:
    model = _cnn(k=k)
    unstructured = global_magnitude_prune(model, init_masks(model), 0.5)
    masks = refill(model, unstructured)
    apply_masks_(model, masks)
    keep = kept_channels(model, masks)
    # conv1 has no upstream removal: its count is round(density · out) per base, and the kept
    # channels are the ones with the most survivors.
    out1 = model.conv1.out_channels // k
    density = float(unstructured["conv1.weight"].sum()) / unstructured["conv1.weight"].numel()
    counts = unstructured["conv1.weight"].reshape(k, out1, -1).sum(dim=2)
    for b in range(k):
        kept_b = keep["conv1"].view(k, -1)[b]
        assert int(kept_b.sum()) == round(density * out1)
        assert counts[b][kept_b].min() >= counts[b][~kept_b].max()
    for node in channel_graph(model):
        w = model.get_parameter(f"{node.producer}.weight").detach()
        rows = w.reshape(w.shape[0], -1)
        removed = ~keep[node.producer]
        assert bool((rows[removed] == 0).all())  # whole zero channels
        assert len(set(keep[node.producer].view(k, -1).sum(dim=1).tolist())) == 1  # same count per base
        mask = masks[f"{node.producer}.weight"].reshape(w.shape[0], -1)
        assert bool((mask[~removed].sum(dim=1) == mask[~removed].sum(dim=1)[0]).all())  # kept rows dense
    assert bool(masks["fc2.weight"].reshape(k * 10, -1).any(dim=1).all())  # class outputs never removed


def test_refill_to_channel_sparsity_counts() -> None:
    model = _cnn(k=4)
    masks = refill(model, init_masks(model), channel_sparsity=0.5)
    report = sparsity_report(model, masks)
    assert report["layers"]["conv2.weight"]["channels_per_base"] == [8] * 4
    assert report["layers"]["fc1.weight"]["channels_per_base"] == [32] * 4


def test_greedy_row_grouping_keeps_sparsity_in_dense_blocks() -> None:
    model = _cnn(k=2)
    masks = global_magnitude_prune(model, init_masks(model), 0.6)
    grouped, report = greedy_row_grouping(model, masks, rows_per_group=4)
    for name, layer in report.layers.items():
        mask, old = grouped[name], masks[name]
        out = mask.shape[0] // 2
        for b, blocks in enumerate(layer.blocks):
            mb = mask[b * out : (b + 1) * out].reshape(out, -1)
            target = int(old[b * out : (b + 1) * out].sum())
            assert 0 <= target - int(mb.sum()) < 4  # requested sparsity, short by < one unit
            covered = torch.zeros_like(mb)
            rows_seen = torch.cat([r for r, _ in blocks])
            assert sorted(rows_seen.tolist()) == list(range(out))  # row groups partition the rows
            for rows, cols in blocks:
                assert bool(mb[rows][:, cols].all())  # each block is dense
                covered[rows.unsqueeze(1), cols.unsqueeze(0)] = True
            assert torch.equal(covered, mb)  # and nothing is kept outside the blocks
    assert report.summary()["retained"] > 0.5


@pytest.mark.parametrize("k,dual", [(1, False), (4, True)])
def test_sliced_model_equals_masked_model(k: int, dual: bool) -> None:
    model = _cnn(k=k, dual=dual)
    masks = refill(model, global_magnitude_prune(model, init_masks(model), 0.6))
    apply_masks_(model, masks)
    sliced = slice_channels(model, kept_channels(model, masks))
    x = torch.randn(12, 1, 8, 8)
    routes = ["clean", "adv", 0.3] if dual else ["clean"]
    model.eval(), sliced.eval()
    with torch.no_grad():
        for route in routes:
            with routed(model, route), routed(sliced, route):
                torch.testing.assert_close(sliced.forward_bases(x), model.forward_bases(x), atol=1e-5, rtol=1e-5)
        model.train(), sliced.train()  # batch statistics: a removed channel is constant, still unread
        torch.testing.assert_close(sliced(x), model(x), atol=1e-5, rtol=1e-5)
    weights = sum(m.weight.numel() for m in sliced.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() >= 2)
    assert weights == sum(int(m.sum()) for m in masks.values())  # sliced size = masked structure
    assert sliced.conv2.out_channels < model.conv2.out_channels


def test_removed_channels_are_gone_after_bn() -> None:
    """Changing a removed channel's BN (its constant output) leaves the masked model unchanged."""
    model = _cnn(k=2, dual=True).eval()
    masks = refill(model, init_masks(model), channel_sparsity=0.5)
    apply_masks_(model, masks)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        removed = ~kept_channels(model, masks)["conv2"]
        for bn in (model.bn2.clean, model.bn2.adv):
            bn.bias[removed] += 5.0
            bn.running_mean[removed] -= 3.0
        torch.testing.assert_close(model(x), before)


def test_preresnet_block_channels_slice() -> None:
    torch.manual_seed(0)
    model = PreActResNet18(width=1 / 16, num_bases=2, in_channels=3, dual_bn=True)
    _randomise_bn_(model)
    masks = refill(model, global_magnitude_prune(model, init_masks(model), 0.5))
    apply_masks_(model, masks)
    sliced = slice_channels(model, kept_channels(model, masks)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert sliced.layers[0].conv1.out_channels < model.layers[0].conv1.out_channels


def test_slicing_refuses_inexact_inputs() -> None:
    model = _cnn(k=2)
    keep = {"conv2": torch.tensor([True] * 10 + [False] * 6 + [True] * 12 + [False] * 4)}
    with pytest.raises(ValueError, match="same non-zero count"):
        slice_channels(model, keep)
    keep = {"conv2": torch.tensor(([True] * 8 + [False] * 8) * 2)}
    with pytest.raises(ValueError, match="still reads"):  # conv3 columns were not masked
        slice_channels(model, keep)
    with pytest.raises(NotImplementedError, match="DigitCNN"):
        channel_graph(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_imp_with_refill_stays_channel_structured() -> None:
    model = _cnn(k=2)
    result = iterative_magnitude_pruning(model, _train_fn, rounds=2, rate=0.2, structure="refill", final_train=False)
    layers = result.history[-1]["layers"]
    assert layers["conv2.weight"]["channel_sparsity"] > result.history[0]["layers"]["conv2.weight"]["channel_sparsity"] > 0
    sliced = slice_channels(model, kept_channels(model, result.masks)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_imp_on_a_trained_model_prunes_it_before_any_training() -> None:
    """``trained=True`` (a finished federated run): round 1 prunes the given weights, so training
    happens in rounds 2.. only, each time from the rewind point."""
    model = _cnn()
    early = {n: t.clone() for n, t in model.state_dict().items()}
    _train_fn(model, init_masks(model))  # the run trained on from the early checkpoint
    trained = {n: t.clone() for n, t in model.state_dict().items()}
    calls: list[bool] = []

    def record(m: torch.nn.Module, masks: dict) -> None:
        calls.append(torch.equal(m.conv2.weight[masks["conv2.weight"]], early["conv2.weight"][masks["conv2.weight"]]))

    iterative_magnitude_pruning(model, record, rounds=3, rate=0.2, rewind_state=early, final_train=False, trained=True)
    assert calls == [True, True]  # rounds 2 and 3 train, from the early weights
    model.load_state_dict(trained)
    one = iterative_magnitude_pruning(model, record, rounds=1, rate=0.2, rewind_state=early, final_train=False, trained=True)
    assert calls == [True, True]  # one round: no training at all
    model.load_state_dict(trained)
    expected = global_magnitude_prune(model, init_masks(model), 0.2)  # round 1 ranks the trained weights
    assert all(torch.equal(one.masks[n], expected[n]) for n in expected)


def test_final_refill_keeps_imps_per_layer_allocation() -> None:
    """IMP left conv1/conv2/conv3/fc1 with 2/8/8/32 of 8/16/32/64 channels (unequal: 75/50/75/50 %
    removed). At the matching global sparsity 1 − 50/120 the final ticket keeps exactly those
    channels; a uniform refill would keep round(50/120 · dense) = 3/7/13/27 per layer."""
    from models.slice_channels import channel_masks
    from tools.prune import exact_refill, imp_allocation

    model = _cnn(k=2)
    imp_rows = {
        "conv1": torch.tensor([0, 0, 0, 0, 0, 0, 1, 1] * 2, dtype=torch.bool),  # the last 2 of 8, both bases
        "conv2": torch.tensor([1, 0] * 8 * 2, dtype=torch.bool),
        "conv3": torch.tensor(([1] * 8 + [0] * 24) * 2, dtype=torch.bool),
        "fc1": torch.tensor(([0] * 32 + [1] * 32) * 2, dtype=torch.bool),
    }
    imp_masks = channel_masks(model, imp_rows)
    dense = {"conv1": 8, "conv2": 16, "conv3": 32, "fc1": 64}
    imp_kept = {"conv1": 2, "conv2": 8, "conv3": 8, "fc1": 32}
    kept = imp_allocation(imp_kept, dense, 1 - 50 / 120)
    assert kept == imp_kept
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    final = kept_channels(model, exact_refill(model, imp_masks, kept, reference))
    for name, rows in imp_rows.items():
        assert torch.equal(final[name], rows), name  # the very channels IMP kept
    # a looser target scales IMP's shares by 60/50 (largest remainder, ties to the earlier layer):
    # 2.4, 9.6, 9.6, 38.4 → 2, 9, 9, 38 (58) → +1 conv2, +1 conv3 → 60
    assert imp_allocation(imp_kept, dense, 0.5) == {"conv1": 2, "conv2": 10, "conv3": 10, "fc1": 38}
    # a tighter one by 30/50: 1.2, 4.8, 4.8, 19.2 → 1, 4, 4, 19 (28) → +1 conv2, +1 conv3 → 30
    assert imp_allocation(imp_kept, dense, 0.75) == {"conv1": 1, "conv2": 5, "conv3": 5, "fc1": 19}
    grown = kept_channels(model, exact_refill(model, imp_masks, imp_allocation(imp_kept, dense, 0.5), reference))
    for name, rows in imp_rows.items():
        assert bool((grown[name] | ~rows).all()), name  # growing a layer keeps IMP's channels

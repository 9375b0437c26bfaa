"""Sparse adversarial training building blocks: exact mask counts, Robust Bird stopping, Flying
Bird drop-and-regrow, the sparse upload codec and entry-wise sparse aggregation (all tiny)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from models.cnn import DigitCNN
from splitmix.protocol.codec import record_bytes, to_record, unpack
from splitmix.protocol.sparse_codec import (
    DENSE_PACK,
    IDX_SUFFIX,
    VAL_SUFFIX,
    decode_indices,
    decode_sparse,
    decode_sparse_entries,
    encode_index_list,
    encode_indices,
    encode_sparse,
    sparse_from_record,
    to_sparse_record,
)
from strategies.aggregation import aggregate, aggregate_tensors
from strategies.base import TensorSpec
from techniques import sparsity as sp


def _model(num_bases: int = 1) -> DigitCNN:
    torch.manual_seed(0)
    return DigitCNN(width=0.125, num_bases=num_bases, dual_bn=True)


# ---------------------------------------------------------------------------- masks


def test_prunable_parameters_are_conv_and_linear_weights():
    names = list(sp.prunable_parameters(_model()))
    assert names == ["conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight"]
    assert "conv1.weight" not in sp.prunable_parameters(_model(), exclude=["conv1.weight"])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.97, 1.0])
def test_global_magnitude_mask_keeps_exact_count(sparsity):
    model = _model()
    params = sp.prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    masks = sp.global_magnitude_mask(model, sparsity)
    assert sum(sp.kept_counts(masks).values()) == round((1 - sparsity) * total)
    if 0 < sparsity < 1:  # every kept |w| ≥ every dropped |w|
        kept = torch.cat([params[n].detach().abs()[m] for n, m in masks.items()])
        dropped = torch.cat([params[n].detach().abs()[~m] for n, m in masks.items()])
        assert kept.min() >= dropped.max()


def test_global_mask_ties_and_per_base_counts():
    params = {"a": torch.ones(2, 3), "b": torch.ones(4)}  # all tied: earlier tensor, lower index win
    masks = sp.global_magnitude_mask(params, 0.5)  # keeps 5 of 10
    assert masks["a"].view(-1).tolist() == [True] * 5 + [False] and not masks["b"].any()
    model = _model(num_bases=3)
    masks = sp.global_magnitude_mask(model, 0.9, num_bases=3)
    per_base = sum(p.numel() for p in sp.prunable_parameters(model).values()) // 3
    for i in range(3):
        kept = sum(int(m.chunk(3, dim=0)[i].sum()) for m in masks.values())
        assert kept == round(0.1 * per_base)


def test_random_mask_exact_total_and_layer_densities():
    model = _model()
    for method in ("igq", "erk", "uniform"):
        masks = sp.random_mask(model, 0.8, method, torch.Generator().manual_seed(1))
        total = sum(m.numel() for m in masks.values())
        assert sum(sp.kept_counts(masks).values()) == round(0.2 * total)
    dens = sp.layer_densities({"small": (4, 4), "big": (64, 64)}, 0.2, "igq")
    assert dens["small"] > dens["big"]
    assert (dens["small"] * 16 + dens["big"] * 4096) / 4112 == pytest.approx(0.2, rel=1e-9)


def test_apply_mask_and_optimizer_state():
    model = _model()
    masks = sp.global_magnitude_mask(model, 0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    sp.remask_(model, masks, optimizer)
    params = sp.prunable_parameters(model)
    for name, mask in masks.items():
        assert not params[name][~mask].any()
        assert not optimizer.state[params[name]]["momentum_buffer"][~mask].any()
    sp.mask_gradients_(model, masks)
    assert not params["conv2.weight"].grad[~masks["conv2.weight"]].any()


def test_masks_round_trip_through_bytes_and_context_state():
    masks = sp.random_mask(_model(), 0.9, generator=torch.Generator().manual_seed(0))
    state = RecordDict({"sparsity": sp.masks_to_config(masks)})  # as in Flower's Context.state
    back = sp.masks_from_config(state["sparsity"])
    assert list(back) == list(masks) and all(torch.equal(back[n], masks[n]) for n in masks)
    blob = sp.masks_to_bytes(masks)
    with pytest.raises(ValueError):
        sp.masks_from_bytes(blob[:-1])
    with pytest.raises(ValueError):
        sp.masks_from_bytes(b"XXXX" + blob[4:])


def test_split_and_stack_base_masks():
    masks = sp.global_magnitude_mask(_model(num_bases=2), 0.5, num_bases=2)
    per_base = sp.split_base_masks(masks, [5, 2])
    assert "base5.conv1.weight" in per_base and "base2.fc2.weight" in per_base
    again = sp.stack_base_masks(per_base, [5, 2], masks)
    assert all(torch.equal(again[n], masks[n]) for n in masks)


def test_hamming_distance():
    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([True, False, True, False])}
    assert sp.hamming_distance(a, a) == 0.0
    assert sp.hamming_distance(a, b) == 0.5


# ---------------------------------------------------------------------------- Robust Bird


def test_robust_bird_stops_when_mask_stops_changing():
    model = _model()
    search = sp.RobustBirdSearch(sparsity=0.8, threshold=0.08, window=5)
    results = [search.check(model) for _ in range(5)]  # fixed weights: distance 0 once 5 masks exist
    assert results == [False] * 4 + [True]
    assert search.distances == [0.0] * 4
    assert search.mask is not None and sp.mask_density(search.mask) == pytest.approx(0.2, abs=1e-3)
    restored = sp.RobustBirdSearch.from_config(search.to_config())
    assert restored.check(model) and all(torch.equal(restored.mask[n], search.mask[n]) for n in search.mask)


def test_robust_bird_keeps_searching_while_mask_moves():
    params = {"w": torch.arange(100, dtype=torch.float32)}
    search = sp.RobustBirdSearch(sparsity=0.5, threshold=0.08, window=2)
    assert not search.check(params)
    params["w"] = params["w"].flip(0)  # mask flips completely: distance 1
    assert not search.check(params) and search.distances == [1.0]
    assert search.check(params)  # unchanged since the last check: frozen


# ---------------------------------------------------------------------------- Flying Bird


def test_cosine_decay_values():
    assert sp.cosine_fraction(0, 0.5, 100) == pytest.approx(0.5)
    assert sp.cosine_fraction(50, 0.5, 100) == pytest.approx(0.25)
    assert sp.cosine_fraction(25, 0.5, 100) == pytest.approx(0.25 * (1 + math.cos(math.pi / 4)))
    assert sp.cosine_fraction(100, 0.5, 100) == pytest.approx(0.0)
    assert sp.cosine_fraction(200, 0.5, 100, minimum=0.005) == pytest.approx(0.005)
    fb = sp.FlyingBird(masks={}, end_step=1000, update_every=100, late_update_every=150)
    assert fb.due(100) and not fb.due(150) and fb.due(600) and not fb.due(700) and fb.due(750)


def test_regrow_picks_largest_gradient_positions():
    w = torch.tensor([[0.9, -0.1, 0.5, 0.0, 0.0, 0.0, 0.0, 0.7]])
    mask = w != 0  # active: 0, 1, 2, 7
    grad = torch.tensor([[0.0, 0.0, 0.0, 0.2, 3.0, -5.0, 0.1, 0.0]])
    params = {"w": w.clone()}
    fb = sp.FlyingBird(masks={"w": mask}, end_step=10**9, drop_fraction=0.5)
    new = fb.update(params, grads={"w": grad})["w"][0]
    # drops the 2 smallest |w| (positions 1, 2), regrows the 2 largest |grad| (5, then 4)
    assert new.tolist() == [True, False, False, False, True, True, False, True]
    assert params["w"][0].tolist() == pytest.approx([0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7])


def test_drop_and_regrow_keeps_each_layer_count():
    model = _model(num_bases=2)
    masks = sp.random_mask(model, 0.8, generator=torch.Generator().manual_seed(0), num_bases=2)
    counts = {n: [int(c.sum()) for c in m.chunk(2, dim=0)] for n, m in masks.items()}
    sp.apply_mask_(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fb = sp.FlyingBird(masks=masks, end_step=24, update_every=3, drop_fraction=0.5, num_bases=2)
    changed = 0
    for _ in range(12):
        optimizer.zero_grad()
        model(torch.randn(4, 1, 8, 8)).square().mean().backward()
        optimizer.step()
        sp.remask_(model, fb.masks, optimizer)
        before = {n: m.clone() for n, m in fb.masks.items()}
        if fb.step(model, optimizer=optimizer):
            changed += sp.hamming_distance(before, fb.masks) > 0
    assert fb.updates == 4 and changed == 4
    for name, mask in fb.masks.items():
        assert [int(c.sum()) for c in mask.chunk(2, dim=0)] == counts[name]
        assert not sp.prunable_parameters(model)[name][~mask].any()
    restored = sp.FlyingBird.from_config(fb.to_config())
    assert restored.steps == 12 and all(torch.equal(restored.masks[n], fb.masks[n]) for n in fb.masks)


def test_flying_bird_plus_adapts_amounts():
    def kept_after_update(gaps, losses):
        w = torch.arange(1.0, 1001.0)
        params = {"w": w.clone()}
        fbp = sp.FlyingBirdPlus(masks={"w": w > 500}, end_step=10**9, drop_fraction=0.2, window=4)
        for gap, loss in zip(gaps, losses):
            fbp.observe(0.5 + gap, 0.5, loss)
        return int(fbp.update(params, grads={"w": torch.rand(1000)})["w"].sum())

    # 500 active, α = 0.2: Flying Bird drops and regrows n = 100
    flat, rising, falling = [0.1] * 5, [0.1, 0.2, 0.3, 0.4, 0.5], [2.0, 1.9, 1.8, 1.7, 1.6]
    assert kept_after_update(flat, falling) == 500
    assert kept_after_update(rising, falling) == 500 - 40  # extra drop ceil(0.2·0.4·500)
    assert kept_after_update(flat, [1.0, 1.1, 1.2, 1.3, 1.4]) == 505  # regrow int(1.05·100)
    assert kept_after_update(flat, [1.0] * 5) == 505  # a flat loss counts (changes ≥ 0)
    assert kept_after_update(rising, [1.0, 1.1, 1.2, 1.3, 1.4]) == 500 - 140 + 105
    assert kept_after_update(flat[:1], [1.0]) == 500  # one observation: no trend yet


def test_flops_fraction_scales_with_density():
    model = _model()
    half = {n: torch.arange(p.numel()).view(p.shape) % 2 == 0 for n, p in sp.prunable_parameters(model).items()}
    dense = {n: torch.ones_like(m) for n, m in half.items()}
    assert sp.flops_fraction(model, dense, (1, 8, 8)) == pytest.approx(1.0)
    assert sp.flops_fraction(model, half, (1, 8, 8)) == pytest.approx(0.5, abs=2e-3)
    # one dense weight gradient every ΔT steps: ((ΔT−1)·3S + 2S + D) / (3·D·ΔT)
    s = sp.flops_fraction(model, half, (1, 8, 8))
    assert sp.flops_fraction(model, half, (1, 8, 8), update_every=10) == pytest.approx((9 * 3 * s + 2 * s + 1) / 30)


# ---------------------------------------------------------------------------- sparse codec


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_codec_round_trips_bitwise(sparsity, dtype):
    gen = torch.Generator().manual_seed(3)
    tensor = torch.randn(7, 5, 3, generator=gen).to(dtype)
    tensor.view(-1)[0] = -0.0
    mask = torch.rand(tensor.shape, generator=gen) >= sparsity
    if sparsity == 0.0:
        mask[:] = True
    idx, val = encode_sparse(tensor, mask)
    dense, back_mask = decode_sparse(idx, val, tuple(tensor.shape), dtype)
    assert torch.equal(back_mask, mask) and dense.dtype == dtype
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(dense[mask].view(bits), tensor[mask].view(bits))  # bitwise, −0.0 included
    assert not dense[~mask].view(bits).any()  # +0.0 off the mask
    indices, values = decode_sparse_entries(idx, val, tuple(tensor.shape), dtype)
    assert torch.equal(indices, torch.nonzero(mask.view(-1)).view(-1))


def test_index_format_choice():
    dense_mask = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.5
    sparse_mask = torch.zeros(1000, dtype=torch.bool)
    sparse_mask[[3, 400, 999]] = True
    assert encode_indices(dense_mask)[0] == 0  # bitmap: 125 bytes < 500
    blob = encode_indices(sparse_mask)
    assert blob[0] == 2 and len(blob) == 1 + 3 * 2  # gaps up to 599: uint16
    assert decode_indices(blob, 1000).tolist() == [3, 400, 999]
    assert decode_indices(encode_indices(torch.zeros(0, dtype=torch.bool)), 0).size == 0
    assert encode_indices(torch.zeros(5000, dtype=torch.bool)) == bytes([1])  # nothing kept: one byte
    assert encode_indices(torch.ones(100, dtype=torch.bool))[0] == 0  # all kept: 13-byte bitmap


def test_sparse_codec_rejects_corrupt_input():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[1, 5, 50]] = True
    delta = encode_indices(mask)
    assert delta[0] == 1
    with pytest.raises(ValueError, match="out of range"):
        decode_indices(delta, 40)
    with pytest.raises(ValueError, match="strictly increasing"):
        decode_indices(bytes([1, 1, 4, 0]), 100)  # repeated index
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_index_list(np.array([5, 1, 50]), 100)  # unsorted
    with pytest.raises(ValueError, match="out of range"):
        encode_index_list(np.array([1, 100]), 100)
    with pytest.raises(ValueError):
        decode_indices(bytes([0]) + b"\x00" * 3, 100)  # bitmap of wrong length
    with pytest.raises(ValueError, match="padding"):
        decode_indices(bytes([0, 0xFF]), 4)
    with pytest.raises(ValueError, match="unknown"):
        decode_indices(bytes([9, 1]), 100)
    with pytest.raises(ValueError):
        decode_indices(b"", 100)
    with pytest.raises(ValueError):
        decode_indices(bytes([2, 1, 0, 3]), 100)  # uint16 payload of odd length
    with pytest.raises(ValueError, match="values"):
        decode_sparse(delta, np.zeros(2, np.float32), (100,), torch.float32)
    with pytest.raises(ValueError):
        decode_sparse(delta, np.zeros(3, np.float64), (100,), torch.float32)


def test_sparse_record_round_trip_and_validation():
    model = _model()
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if "num_batches" not in k}
    masks = sp.global_magnitude_mask(model, 0.9)
    sp.apply_mask_(tensors, masks)
    record = to_sparse_record(tensors, masks)
    entries = unpack(record)
    assert "conv2.weight" + IDX_SUFFIX in entries and "conv2.weight" not in entries
    assert DENSE_PACK in entries and "bn1.clean.bias" not in entries  # unmasked float32 tensors: one entry
    expected = {k: TensorSpec(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
    decoded = sparse_from_record(record, expected)
    for key, tensor in tensors.items():
        mask, values = decoded[key]
        assert torch.equal(values, tensor)
        assert (mask is None) == (key not in masks) and (mask is None or torch.equal(mask, masks[key]))
    bad = to_record({k: v for k, v in entries.items() if k != "conv2.weight" + VAL_SUFFIX})
    with pytest.raises(ValueError, match="conv2.weight"):
        sparse_from_record(bad, expected)
    bad = to_record({**entries, "conv2.weight" + VAL_SUFFIX: np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="conv2.weight"):
        sparse_from_record(bad, expected)
    bad = to_record({**entries, "conv2.weight": tensors["conv2.weight"]})
    with pytest.raises(ValueError, match="conv2.weight"):  # dense and sparse at once
        sparse_from_record(bad, expected)
    bf16 = {"w": torch.randn(6, 5).to(torch.bfloat16)}
    bf16_mask = {"w": bf16["w"].float().abs() > 0.5}
    bf16_record = to_sparse_record(bf16, bf16_mask)
    assert unpack(bf16_record)["w" + VAL_SUFFIX].dtype == np.uint16  # bit pattern
    mask, values = sparse_from_record(bf16_record, {"w": TensorSpec((6, 5), "bfloat16")})["w"]
    assert torch.equal(mask, bf16_mask["w"]) and torch.equal(
        values.view(torch.int16), torch.where(mask, bf16["w"], torch.zeros_like(bf16["w"])).view(torch.int16)
    )
    nan = dict(tensors)
    nan["fc1.weight"] = tensors["fc1.weight"].clone()
    nan["fc1.weight"][masks["fc1.weight"]] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparse_from_record(to_sparse_record(nan, masks), expected)


@pytest.mark.parametrize("sparsity, minimum_ratio", [(0.9, 5.0), (0.8, 3.0)])
def test_upload_bytes_ratio(sparsity, minimum_ratio):
    """Prunable weights of a width-1 CNN (899k weights), random masks, packed-record index
    included: measured 7.99× at 90 % (uint8 delta indices) and 4.32× at 80 % (bitmap)."""
    torch.manual_seed(0)
    weights = {n: p.detach() for n, p in sp.prunable_parameters(DigitCNN(width=1.0)).items()}
    masks = sp.random_mask(weights, sparsity, "uniform", torch.Generator().manual_seed(0))
    sparse = record_bytes(to_sparse_record(weights, masks))
    dense = record_bytes(to_record(weights))
    ratio = dense / sparse
    print(f"sparsity {sparsity}: dense {dense} B, sparse {sparse} B, ratio {ratio:.2f}x")
    assert ratio >= minimum_ratio


# ---------------------------------------------------------------------------- sparse aggregation


def test_sparse_aggregation_matches_hand_computation():
    previous = {"w": torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]), "b": torch.tensor([1.0, 2.0]), "u": torch.tensor([7.0])}
    m1 = torch.tensor([True, True, False, False, False])
    m2 = torch.tensor([False, True, True, False, False])
    c1 = ({"w": (m1, torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0])), "b": torch.tensor([3.0, 4.0])}, 1.0)
    c2 = ({"w": (m2, torch.tensor([0.0, 8.0, 6.0, 99.0, 0.0])), "b": (None, torch.tensor([6.0, 8.0]))}, 3.0)
    c3 = ({"w": (m1 | m2, torch.tensor([4.0, 4.0, 4.0, 0.0, 0.0]))}, 2.0)
    out = aggregate_tensors(previous, [c1, c2, c3])
    # entry 0: clients 1, 3 → (1·1 + 2·4)/3 = 3; entry 1: all → (1·2 + 3·8 + 2·4)/6 = 34/6;
    # entry 2: clients 2, 3 → (3·6 + 2·4)/5 = 5.2; entries 3, 4: nobody (client 2's 99 is off its mask)
    assert out["w"].tolist() == pytest.approx([3.0, 34 / 6, 5.2, 40.0, 50.0])
    assert out["b"].tolist() == pytest.approx([(3 + 18) / 4, (4 + 24) / 4])  # dense: both clients
    assert out["u"] is previous["u"] and out["w"].dtype == torch.float32


def test_sparse_aggregation_record_matches_dense_weighted_average():
    gen = torch.Generator().manual_seed(0)
    tensors = [{"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)} for _ in range(3)]
    previous = to_record({"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.ones(2)})
    contributions = [(t, w) for t, w in zip(tensors, [1.0, 2.0, 5.0])]
    dense = aggregate(previous, contributions)
    # the same tensors as sparse entries whose masks hold everything: the entry-wise path
    as_sparse = [({k: (torch.ones(v.shape, dtype=torch.bool), v) for k, v in t.items()}, w) for t, w in contributions]
    sparse = aggregate(previous, as_sparse)
    assert record_bytes(dense) == record_bytes(sparse) and dense["packed"].data == sparse["packed"].data
    assert unpack(sparse)["c"].tolist() == [1.0, 1.0]  # nobody sent it: its previous value

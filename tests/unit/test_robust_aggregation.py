"""The aggregation kernel's reducers: hand-computed values, dtypes, sparse entries, nested
slices, and an attack where 20 % of the clients send sign-flipped ×10 updates."""

import pytest
import torch

from splitmix.protocol.codec import to_record, unpack
from strategies.aggregation import (
    AGGREGATORS,
    aggregate,
    aggregate_tensors,
    coordinate_median,
    leading_slice,
    trimmed_mean,
)


def scalars(*values):
    return [torch.tensor(float(v)) for v in values]


def test_aggregators_are_named():
    assert AGGREGATORS == ("mean", "median", "trimmed-mean")


def test_median_by_hand():
    assert coordinate_median(scalars(1, 2, 100)).item() == 2.0
    assert coordinate_median(scalars(100, 1, 2)).item() == 2.0  # order does not matter
    assert coordinate_median(scalars(1, 2, 3, 100)).item() == 2.5  # even: mean of the middle two
    assert coordinate_median(scalars(7)).item() == 7.0
    assert coordinate_median(scalars(7, 9)).item() == 8.0
    per_coordinate = coordinate_median([torch.tensor([1.0, 5.0, -1.0]), torch.tensor([2.0, 6.0, -3.0]), torch.tensor([100.0, -7.0, -2.0])])
    assert per_coordinate.tolist() == [2.0, 5.0, -2.0]


def test_trimmed_mean_by_hand():
    # β = 0.2 on 5 values: floor(0.2·5) = 1 dropped from each end → mean(2, 3, 4) = 3
    assert trimmed_mean(scalars(1, 2, 3, 4, 100), trim_fraction=0.2).item() == 3.0
    assert trimmed_mean(scalars(-50, 2, 3, 4, 100), trim_fraction=0.2).item() == 3.0
    # β = 0.2 on 10 values: sorted −1000, 1, …, 8, 1000; 2 dropped from each end → mean(2..7) = 4.5
    assert trimmed_mean(scalars(1, 2, 3, 4, 5, 6, 7, 8, -1000, 1000), trim_fraction=0.2).item() == 4.5
    # β·n < 1 trims nothing: the plain (unweighted) mean
    assert trimmed_mean(scalars(1, 2, 3, 4, 100), trim_fraction=0.1).item() == 22.0
    assert trimmed_mean(scalars(1, 2, 100), trim_fraction=0.2).item() == pytest.approx(103 / 3)
    assert trimmed_mean(scalars(4), trim_fraction=0.4).item() == 4.0
    # β = 0 is the mean; a β close to 0.5 keeps just the middle (the median for odd n)
    assert trimmed_mean(scalars(1, 2, 100), trim_fraction=0.0).item() == pytest.approx(103 / 3)
    assert trimmed_mean(scalars(1, 2, 100), trim_fraction=0.49).item() == 2.0
    # 0.29·100 is 28.999… in floating point: still 29 trimmed from each end
    values = scalars(*range(100))
    assert trimmed_mean(values, trim_fraction=0.29).item() == pytest.approx(sum(range(29, 71)) / 42)


def test_trimmed_mean_weights_weight_the_kept_values_only():
    # trims 1 from each end (by count): kept 2 (w 1), 3 (w 3), 4 (w 1) → (2 + 9 + 4) / 5
    weighted = trimmed_mean(scalars(1, 2, 3, 4, 100), weights=[1, 1, 3, 1, 1000], trim_fraction=0.2)
    assert weighted.item() == pytest.approx(3.0)
    weighted = trimmed_mean(scalars(1, 2, 3, 4, 100), weights=[5, 1, 1, 3, 5], trim_fraction=0.2)
    assert weighted.item() == pytest.approx((2 + 3 + 12) / 5)
    with pytest.raises(ValueError, match="positive"):
        trimmed_mean(scalars(1, 2), weights=[1, 0])
    with pytest.raises(ValueError, match="2 weights for 3"):
        trimmed_mean(scalars(1, 2, 3), weights=[1, 1])


def test_bad_arguments_are_named():
    for beta in (-0.1, 0.5, 0.7, float("nan")):
        with pytest.raises(ValueError, match=r"trim fraction must be in \[0, 0.5\)"):
            trimmed_mean(scalars(1, 2), trim_fraction=beta)
    with pytest.raises(ValueError, match="different shapes"):
        coordinate_median([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match="no tensors"):
        coordinate_median([])
    with pytest.raises(ValueError, match="unknown aggregation 'krum'; allowed: mean, median, trimmed-mean"):
        aggregate_tensors(None, [({"a": torch.zeros(1)}, 1.0)], "krum")


def test_integer_and_bool_tensors():
    counts = [torch.tensor([10, 3]), torch.tensor([20, 4]), torch.tensor([1000, 5]), torch.tensor([30, 6])]
    median = coordinate_median(counts)
    assert median.dtype == torch.int64 and median.tolist() == [20, 4]  # the lower median: a sent value
    trimmed = trimmed_mean(counts, trim_fraction=0.25)  # 1 from each end: mean(20, 30) = 25, mean(4, 5) = 4.5 → 4
    assert trimmed.dtype == torch.int64 and trimmed.tolist() == [25, 4]
    votes = [torch.tensor([True, False]), torch.tensor([True, True]), torch.tensor([False, False])]
    assert coordinate_median(votes).tolist() == [True, False]  # majority
    half = torch.tensor([1.0, 2.0], dtype=torch.float16)
    assert coordinate_median([half, half * 3]).dtype == torch.float16
    # through aggregate: each tensor keeps its dtype (the previous state's)
    contributions = [({"w": torch.tensor([1.0]), "n": torch.tensor([c])}, 1.0) for c in (5, 7, 100)]
    out = aggregate_tensors({"w": torch.zeros(1), "n": torch.zeros(1, dtype=torch.int64)}, contributions, "median")
    assert out["n"].dtype == torch.int64 and out["n"].tolist() == [7]
    assert out["w"].dtype == torch.float32


def test_mean_is_the_float64_example_weighted_mean_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    previous = {"a": torch.zeros(3, 4), "b": torch.zeros(5), "untouched": torch.ones(2)}
    contributions = [
        ({"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}, 10.0),
        ({"a": torch.randn(3, 4, generator=gen)}, 30.0),
        ({"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}, 5.0),
    ]
    record = to_record(previous)
    # the per-tensor mean Split-Mix always had: float64 sums in contribution order, one division
    sums = torch.zeros(3, 4, dtype=torch.float64)
    torch._foreach_add_([sums], [contributions[0][0]["a"]], alpha=10.0)
    torch._foreach_add_([sums], [contributions[1][0]["a"]], alpha=30.0)
    torch._foreach_add_([sums], [contributions[2][0]["a"]], alpha=5.0)
    expected_a = (sums / 45.0).to(torch.float32)
    via_record = aggregate(record, contributions, "mean")
    via_dict = aggregate_tensors(previous, contributions, "mean")
    unpacked = unpack(via_record)
    assert torch.equal(torch.from_numpy(unpacked["a"].copy()), expected_a)
    for key in previous:
        torch.testing.assert_close(via_dict[key], torch.from_numpy(unpacked[key].copy()), rtol=0, atol=0)
    assert unpacked["untouched"].tolist() == [1.0, 1.0]
    # each tensor over the contributions that hold it: 'b' only over the first and third
    b = (10 * contributions[0][0]["b"].double() + 5 * contributions[2][0]["b"].double()) / 15
    torch.testing.assert_close(via_dict["b"], b.float())
    assert via_dict["untouched"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_rules_per_tensor_over_its_holders(name):
    previous = {"base0.w": torch.zeros(2), "base1.w": torch.full((2,), 9.0), "base2.w": torch.full((3,), -1.0)}
    record = to_record(previous)
    contributions = [
        ({"base0.w": torch.tensor([1.0, 10.0]), "base1.w": torch.tensor([0.0, 0.0])}, 100.0),
        ({"base0.w": torch.tensor([2.0, 20.0])}, 1.0),
        ({"base0.w": torch.tensor([3.0, -500.0]), "base1.w": torch.tensor([4.0, 8.0])}, 1.0),
    ]
    out = aggregate(record, contributions, name, trim_fraction=0.34)  # k = 1 of 3, 0 of 2
    got = {k: torch.from_numpy(v.copy()) for k, v in unpack(out).items()}
    assert got["base0.w"].tolist() == [2.0, 10.0]  # median of 3 = the 1-trimmed mean of 3
    assert got["base1.w"].tolist() == [2.0, 4.0]  # two holders: their (unweighted) mean
    assert got["base2.w"].tolist() == [-1.0, -1.0, -1.0]  # nobody sent it: its previous value
    assert aggregate_tensors(previous, contributions, name, trim_fraction=0.34)["base1.w"].tolist() == [2.0, 4.0]
    with pytest.raises(KeyError, match="nope"):
        aggregate(record, [({"nope": torch.zeros(1)}, 1.0)], name)


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_sparse_entries_over_the_clients_whose_mask_holds_them(name):
    previous = {"w": torch.tensor([7.0, 7.0, 7.0, 7.0])}
    masks = [torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False]), None]
    values = [torch.tensor([1.0, 2.0, 99.0, 99.0]), torch.tensor([3.0, 99.0, 5.0, 99.0]), torch.tensor([100.0, 4.0, 6.0, 0.0])]
    contributions = [({"w": (m, v) if m is not None else v}, 1.0) for m, v in zip(masks, values)]
    out = aggregate_tensors(previous, contributions, name, trim_fraction=0.34)["w"]
    # entry 0: {1, 3, 100}; entry 1: {2, 4}; entry 2: {5, 6}; entry 3: {0} (dense client only)
    assert out.tolist() == [3.0, 3.0, 5.5, 0.0]
    nobody = aggregate_tensors(previous, [({"w": (torch.tensor([True, False, False, False]), values[0])}, 1.0)], name)["w"]
    assert nobody.tolist() == [1.0, 7.0, 7.0, 7.0]  # entries nobody holds keep their previous value
    record = aggregate(to_record(previous), contributions, name, trim_fraction=0.34)
    assert unpack(record)["w"].tolist() == [3.0, 3.0, 5.5, 0.0]
    with pytest.raises(ValueError, match="previous"):
        aggregate_tensors(None, contributions, name)  # sparse entries need the previous state


def _nested_slices():
    """A 3×3 tensor; slices (leading blocks) of 1×1 … 2×3, one sparse. Row 2 nobody holds."""
    previous = {"w": torch.full((3, 3), -1.0)}
    contributions = [
        ({"w": torch.tensor([[1.0]])}, 10.0),
        ({"w": torch.tensor([[2.0, 20.0]])}, 1.0),
        # sparse: its (0, 1) entry (30) is off its mask and must not count
        ({"w": (torch.tensor([[True, False], [True, True]]), torch.tensor([[100.0, 30.0], [5.0, 6.0]]))}, 1.0),
        ({"w": torch.tensor([[4.0, 70.0, 9.0], [7.0, 8.0, 11.0]])}, 1000.0),
        ({"w": torch.tensor([[-50.0]])}, 1.0),
    ]
    return previous, contributions


@pytest.mark.parametrize(
    "name, expected",
    [
        # (0, 0): {1, 2, 100, 4, −50} → 2; (0, 1): {20, 70} → 45; (0, 2): {9}; (1, 0): {5, 7};
        # (1, 1): {6, 8}; (1, 2): {11}; row 2: nobody → −1
        ("median", [[2.0, 45.0, 9.0], [6.0, 7.0, 11.0], [-1.0, -1.0, -1.0]]),
        # β = 0.2: 5 holders → 1 dropped from each end: mean(1, 2, 4) = 7/3; fewer than 5 → none
        ("trimmed-mean", [[7 / 3, 45.0, 9.0], [6.0, 7.0, 11.0], [-1.0, -1.0, -1.0]]),
        # example-weighted, each entry over the clients whose slice (and mask) holds it
        ("mean", [[(10 + 2 + 100 + 4000 - 50) / 1013, (20 + 70_000) / 1001, 9.0], [(5 + 7000) / 1001, (6 + 8000) / 1001, 11.0], [-1.0, -1.0, -1.0]]),
    ],
)
def test_reducers_on_nested_slices_by_hand(name, expected):
    previous, contributions = _nested_slices()
    out = aggregate_tensors(previous, contributions, name, trim_fraction=0.2, placement=leading_slice)["w"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected))
    record = aggregate(to_record(previous), contributions, name, trim_fraction=0.2, placement=leading_slice)
    torch.testing.assert_close(torch.from_numpy(unpack(record)["w"].copy()), torch.tensor(expected))
    with pytest.raises(ValueError, match="does not match"):  # whole-tensor placement: no slices
        aggregate_tensors(previous, contributions, name)
    with pytest.raises(ValueError, match="does not fit"):
        aggregate_tensors(previous, [({"w": torch.zeros(4, 1)}, 1.0)], name, placement=leading_slice)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_entries_off_the_mask_have_no_effect(name):
    """Fails if any reducer reads values off a sparse mask: they are huge here."""
    previous = {"w": torch.zeros(4)}
    dense = [({"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, 1.0), ({"w": torch.tensor([3.0, 4.0, 5.0, 6.0])}, 1.0)]
    junk = torch.tensor([5.0, 1e6, 7.0, 1e6])
    masked = dense + [({"w": (torch.tensor([True, False, True, False]), junk)}, 1.0)]
    out = aggregate_tensors(previous, masked, name, trim_fraction=0.34)["w"]
    # entries 0, 2: three holders {1, 3, 5}, {3, 5, 7}; entries 1, 3: two holders {2, 4}, {4, 6}
    assert out.tolist() == [3.0, 3.0, 5.0, 5.0]
    ignored = aggregate_tensors(previous, dense + [({"w": junk}, 1.0)], name, trim_fraction=0.34)["w"]
    assert ignored[1] != out[1] and ignored[3] != out[3]  # the mask is what makes the difference


def _attack(num_clients: int, attackers: int, scale: float, seed: int = 0):
    """Honest clients: reference + common update + noise; attackers: reference + scale × their
    honest update (sign-flipped and amplified for scale = −10)."""
    gen = torch.Generator().manual_seed(seed)
    reference = torch.randn(4096, generator=gen)
    update = 0.1 * torch.randn(4096, generator=gen)
    honest = [update + 0.02 * torch.randn(4096, generator=gen) for _ in range(num_clients)]
    sent = [reference + (scale * u if i < attackers else u) for i, u in enumerate(honest)]
    honest_mean = reference + torch.stack(honest[attackers:]).mean(0)
    contributions = [({"w": t}, 50.0) for t in sent]
    return contributions, reference, update, honest_mean


def test_attack_twenty_percent_sign_flipped_times_ten():
    contributions, reference, update, honest_mean = _attack(num_clients=10, attackers=2, scale=-10.0)
    previous = {"w": reference}

    def error(name: str, beta: float = 0.2) -> float:
        got = aggregate_tensors(previous, contributions, name, trim_fraction=beta)["w"]
        return float((got - honest_mean).norm() / update.norm())

    mean_err, median_err, trimmed_err = error("mean"), error("median"), error("trimmed-mean")
    # plain mean: 0.8·u − 0.2·10·u = −1.2·u instead of u → error ≈ 2.2 update norms
    assert 2.1 < mean_err < 2.3
    # median: shifted by at most a couple of honest order statistics (noise 0.02 vs update 0.1)
    assert median_err < 0.15
    # β = 0.2 trims both attackers (and 2 honest values at the other end)
    assert trimmed_err < 0.15
    # too little trimming for 20 % attackers: β = 0.1 drops one attacker, the other stays
    assert error("trimmed-mean", 0.1) > 1.0
    # the update direction survives: cosine with the honest update
    for name in ("median", "trimmed-mean"):
        step = aggregate_tensors(previous, contributions, name, trim_fraction=0.2)["w"] - reference
        assert torch.nn.functional.cosine_similarity(step, update, dim=0) > 0.95
    step = aggregate_tensors(previous, contributions, "mean")["w"] - reference
    assert torch.nn.functional.cosine_similarity(step, update, dim=0) < -0.95


def test_attack_errors_recorded():
    """The numbers behind the attack test (10 and 20 % attackers, ×−10 and ×−1)."""
    rows = {}
    for attackers in (1, 2):
        for scale in (-10.0, -1.0):
            contributions, reference, update, honest_mean = _attack(10, attackers, scale, seed=1)
            for name in AGGREGATORS:
                got = aggregate_tensors({"w": reference}, contributions, name, trim_fraction=0.2)["w"]
                rows[(attackers, scale, name)] = float((got - honest_mean).norm() / update.norm())
    # plain mean with k of 10 attackers at scale s: (1 − k/10)·u + (k/10)·s·u → |k/10·(s − 1)|
    assert rows[(1, -10.0, "mean")] == pytest.approx(1.1, abs=0.05)
    assert rows[(2, -10.0, "mean")] == pytest.approx(2.2, abs=0.05)
    assert rows[(2, -1.0, "mean")] == pytest.approx(0.4, abs=0.05)
    for attackers in (1, 2):
        for scale in (-10.0, -1.0):
            assert rows[(attackers, scale, "median")] < 0.15
            assert rows[(attackers, scale, "trimmed-mean")] < 0.15

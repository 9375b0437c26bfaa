"""Effect tests of the sparse client techniques (arXiv 2202.09844, 2203.14328): each asserts the
observable effect its paper claims, so replacing the mechanism by a no-op makes it fail
(docs/testing.md lists which no-op each one catches)."""

from __future__ import annotations

import math

import pytest
import torch

from clients.recipe import train_bases
from models.splitmix import SplitMixSpec
from splitmix.config import load_config
from splitmix.data import ArrayData
from techniques.base import RoundHooks, ServerContext
from techniques.sparsity import FlyingBirdPlus, cosine_fraction, keep_count, prunable_parameters

STATIC = "sparse-method=static sparsity=0.8"


def _data(n: int, seed: int = 0) -> ArrayData:
    gen = torch.Generator().manual_seed(seed)
    return ArrayData(torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def _density(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


# --------------------------------------------------------------------------- Robust Bird
def test_robust_bird_checks_once_per_round_and_freezes_only_at_the_official_window(technique_round):
    """Weights that do not change give the same mask at every check, so the search stops as soon
    as the window is full: the 5th round the client trains the unit (the newest mask vs each of
    the 4 before it), never earlier; the round's metrics count the freeze."""
    model = SplitMixSpec().build(2)
    state = None
    for server_round in range(1, 7):
        hooks, rnd, state = technique_round(STATIC, model, ["base0", "base1"], server_round=server_round, state=state)
        expected_mask = server_round > 5
        assert (hooks.masks["base0"].mask is not None) == expected_mask  # searching (dense) until round 5's check
        hooks.after_training(rnd, None)
        metrics = rnd.metrics
        assert metrics["sum:sparse-frozen"] == (2 if server_round == 5 else 0)
        assert metrics["sum:sparse-searching"] == (2 if server_round < 5 else 0)
        assert metrics["sum:sparse-freeze-checks"] == (10 if server_round == 5 else 0)  # 2 units × 5 checks
    assert abs(rnd.metrics["density"] - 0.2) < 1e-3 and rnd.metrics["mean:density.base1"] == pytest.approx(0.2, abs=1e-3)


def test_robust_bird_keeps_searching_while_the_global_weights_move_the_mask(technique_round):
    """Between rounds the node receives new weights; masks that differ by more than the threshold
    from some mask in the window keep the unit dense."""
    model = SplitMixSpec().build(1)
    state = None
    for server_round in range(1, 8):
        torch.manual_seed(server_round)  # fresh weights each round: masks overlap only by chance
        model = SplitMixSpec().build(1)
        hooks, rnd, state = technique_round(STATIC, model, ["base0"], server_round=server_round, state=state)
        hooks.after_training(rnd, None)
        assert rnd.metrics["sum:sparse-frozen"] == 0 and hooks.masks["base0"].mask is None


@pytest.mark.parametrize("adversarial_search", [False, True])
def test_robust_bird_searches_with_clean_training_then_trains_adversarially(technique_round, adversarial_search):
    """An adversarial client: no PGD loss while its unit searches (the official clean stage 1),
    the adversarial loss from the round after the mask froze; ``sparse-search-adversarial``
    keeps the adversarial loss during the search."""
    overrides = f"{STATIC} local-epochs=1 batch-size=16 pgd-steps=1 sparse-search-adversarial={str(adversarial_search).lower()}"
    model = SplitMixSpec().build(1)
    data = _data(32)
    state = None
    adv_losses = []
    for server_round in range(1, 7):
        hooks, rnd, state = technique_round(overrides, model, ["base0"], data=data, adversarial=True, server_round=server_round, state=state)
        result = train_bases(model, data, rnd.task.train, lr=0.0, adversarial=True, seed=0, hooks=[hooks])  # lr 0: the mask is stable
        hooks.after_training(rnd, result)
        adv_losses.append(result.adv_loss)
    searching, frozen = adv_losses[:5], adv_losses[5:]
    assert all(loss > 0 for loss in frozen)
    if adversarial_search:
        assert all(loss > 0 for loss in searching)
    else:
        assert searching == [0.0] * 5


# --------------------------------------------------------------------------- Flying Bird
class _MaskRecorder(RoundHooks):
    def __init__(self, sparse_hooks) -> None:
        self.sparse_hooks, self.history = sparse_hooks, []

    def after_step(self, optimizer) -> None:
        self.history.append({n: m.clone() for n, m in self.sparse_hooks.masks["base0"].mask.items()})


def test_flying_bird_drops_and_regrows_inside_the_round_and_trains_the_regrown_weights(technique_round):
    """160 examples, batch 32, one epoch: R = 5 steps; one update per round falls after step
    ⌊5/2⌋ = 2, so the regrown weights (which start at zero) take 3 steps before the upload."""
    model = SplitMixSpec().build(1)
    data = _data(160)
    hooks, rnd, _ = technique_round("sparse-method=dynamic sparsity=0.8 local-epochs=1 batch-size=32 num-rounds=4", model, ["base0"], data=data)
    start = {n: m.clone() for n, m in hooks.masks["base0"].mask.items()}
    recorder = _MaskRecorder(hooks)
    result = train_bases(model, data, rnd.task.train, lr=0.05, adversarial=False, seed=0, hooks=[hooks, recorder])
    hooks.after_training(rnd, result)
    assert result.steps == 5
    changed = [any(not torch.equal(before[n], after[n]) for n in start) for before, after in zip([start, *recorder.history], recorder.history)]
    assert changed == [False, True, False, False, False]  # one topology update, after step 2
    final = recorder.history[-1]
    assert all(int(final[n].sum()) == int(start[n].sum()) for n in start)  # each layer keeps its count
    params = dict(model.named_parameters())
    grown = {n: final[n] & ~start[n] for n in start}
    assert sum(int(g.sum()) for g in grown.values()) > 0
    trained = sum(int((params[n].detach()[g] != 0).sum()) for n, g in grown.items())
    assert trained == sum(int(g.sum()) for g in grown.values())  # every regrown weight moved off zero
    for name, mask in final.items():
        assert torch.equal(rnd.masks[f"base0.{name}"], mask)  # the upload follows the new mask
    assert hooks.masks["base0"].bird.steps == 5 and hooks.masks["base0"].bird.updates == 1


# --------------------------------------------------------------------------- Flying Bird+
PLUS = "sparse-method=dynamic-plus sparsity=0.8 local-epochs=1 batch-size=32 num-rounds=4"


def test_flying_bird_plus_holds_out_a_share_of_at_least_ten_examples(technique_round):
    """29 examples, holdout 0.2: round(5.8) = 6 < 10, so 10 are held out and 19 train; 100
    examples: 20 held out."""
    hooks, rnd, _ = technique_round(PLUS, SplitMixSpec().build(1), ["base0"], data=_data(29))
    assert len(rnd.data) == 19 and len(hooks.technique.held_out) == 10
    hooks, rnd, _ = technique_round(f"{PLUS} sparse-holdout=0.2", SplitMixSpec().build(1), ["base0"], data=_data(100))
    assert len(rnd.data) == 80 and len(hooks.technique.held_out) == 20


def test_flying_bird_plus_prunes_more_when_the_robust_gap_keeps_growing(technique_round):
    """With a rising robust generalisation gap on record, the round's update drops
    ⌈α·active⌉ + ⌈α·0.4·active⌉ per layer and regrows ⌈α·active⌉: density falls below the target,
    and the client reports it for its unit."""
    model = SplitMixSpec().build(1)
    data = _data(200)  # 160 train (R = 5 steps), 40 held out
    hooks, rnd, state = technique_round(PLUS, model, ["base0"], data=data, server_round=1)
    bird = hooks.masks["base0"].bird
    bird.gaps, bird.losses = [0.0, 0.1, 0.2], [1.0, 0.9, 0.8]  # gap rose in every change, loss fell
    start = {n: int(m.sum()) for n, m in bird.masks.items()}
    result = train_bases(model, rnd.data, rnd.task.train, lr=0.05, adversarial=False, seed=0, hooks=[hooks])
    hooks.after_training(rnd, result)
    alpha = cosine_fraction(2, 0.5, bird.end_step)  # the update follows local step 2 of round 1
    expected = {n: a - math.ceil(alpha * 0.4 * a - 1e-9) for n, a in start.items()}
    assert {n: int(m.sum()) for n, m in bird.masks.items()} == expected
    assert bird.prune_updates == 1 and bird.grow_updates == 0
    density = sum(expected.values()) / sum(m.numel() for m in bird.masks.values())
    assert density < 0.2 - 0.01 and rnd.metrics["mean:density.base0"] == pytest.approx(density)
    assert len(FlyingBirdPlus.from_config(state.config_records["sparse.base0"]).gaps) == 4  # this round observed too


def test_flying_bird_plus_serves_each_unit_at_the_density_its_clients_reached():
    """The served model prunes each unit to the mean density its clients last reported (row
    ``density.<unit>``), not to the fixed target; a unit nobody reported stays at the target."""
    run = load_config(overrides="sparse-method=dynamic-plus sparsity=0.8")
    (technique,) = [t for t in run.active_techniques() if t.name == "dynamic-plus"]
    method = run.make_method()
    state = method.initial_state(0)
    prunable = set(prunable_parameters(method.single_unit_model()))
    rows = [{"round": 1, "density.base0": 0.15, "density.base1": 0.3}, {"round": 2, "density.base0": 0.1}]
    served = technique.served_state(state, ServerContext(run, method, prunable, rows=rows))
    for base, density in {0: 0.1, 1: 0.3, 2: 0.2}.items():
        keys = [f"base{base}.{n}" for n in prunable]
        total = sum(served[k].numel() for k in keys)
        assert sum(int((served[k] != 0).sum()) for k in keys) == keep_count(total, 1.0 - density)


# --------------------------------------------------------------------------- random pruning
def test_random_pruning_rescale_keeps_the_forward_signal_scale_at_init():
    """What the 1/sqrt(1 − p) rescale buys in the federated method: a pruned layer's output on the
    same inputs has the dense layer's scale (std ratio ≈ 1), while without it the ratio is
    sqrt(1 − p) = 0.5 at p = 0.75."""
    method = load_config(overrides="sparse-method=random sparsity=0.75").make_method()
    state = method.initial_state(0)
    prunable = set(prunable_parameters(method.single_unit_model()))
    x = torch.randn(512, state["base0.fc1.weight"].shape[1], generator=torch.Generator().manual_seed(0))

    def ratio(rescale: bool) -> float:
        run = load_config(overrides=f"sparse-method=random sparsity=0.75 sparse-rescale={str(rescale).lower()}")
        (technique,) = [t for t in run.active_techniques() if t.name == "random"]
        pruned = technique.initial_state(state, ServerContext(run, method, prunable))
        return float((x @ pruned["base0.fc1.weight"].T).std() / (x @ state["base0.fc1.weight"].T).std())

    assert ratio(True) == pytest.approx(1.0, abs=0.05)
    assert ratio(False) == pytest.approx(0.5, abs=0.03)


def test_unit_density_metrics_are_forwarded_into_the_round_row():
    """``mean:`` client metrics are averaged over the replies carrying them, ``sum:`` summed."""
    from flwr.app import MetricRecord

    from strategies.base import forwarded_metrics

    replies = [
        MetricRecord({"mean:density.base0": 0.2, "sum:sparse-frozen": 2}),
        MetricRecord({"mean:density.base0": 0.1, "mean:density.base1": 0.3, "sum:sparse-frozen": 1}),
        MetricRecord({"loss": 1.0}),
    ]
    assert forwarded_metrics(replies) == pytest.approx({"density.base0": 0.15, "density.base1": 0.3, "sparse-frozen": 3.0})

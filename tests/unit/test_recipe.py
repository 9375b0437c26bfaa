"""Local recipe: PGD stays in the ε-ball and raises the loss; training lowers the loss; profiles."""

import pytest
import torch

from clients.recipe import LocalTrainConfig, per_base_loss, train_bases
from models.splitmix import SplitMixSpec
from splitmix.adversarial import PGDConfig, pgd_linf
from splitmix.data import DataConfig, client_train_data
from splitmix.profiles import adversarial_clients, budget_of_client, make_profile, parse_budgets


def test_pgd_stays_in_the_ball_and_increases_the_loss():
    torch.manual_seed(0)
    model = SplitMixSpec().build(2).eval()
    data = client_train_data(DataConfig(num_partitions=5), 0)
    x, y = data.x[:64], data.y[:64]
    cfg = PGDConfig(eps=0.1, alpha=0.03, steps=5)
    loss = lambda z: torch.nn.functional.cross_entropy(model(z), y)
    x_adv = pgd_linf(loss, x, cfg, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert loss(x_adv).item() > loss(x).item()


def test_per_base_loss_is_sum_of_each_base_loss():
    logits = torch.randn(5, 3, 10)
    y = torch.randint(0, 10, (5,))
    expected = sum(torch.nn.functional.cross_entropy(logits[:, j], y) for j in range(3))
    torch.testing.assert_close(per_base_loss(logits, y), expected)


@pytest.mark.parametrize("adversarial", [False, True])
def test_local_training_lowers_the_loss(adversarial):
    torch.manual_seed(0)
    model = SplitMixSpec().build(2)
    data = client_train_data(DataConfig(num_partitions=4), 1)
    cfg = LocalTrainConfig(epochs=1, batch_size=32, pgd=PGDConfig(eps=0.1, alpha=0.04, steps=3))
    first = train_bases(model, data, cfg, lr=0.05, adversarial=adversarial, seed=0)
    for _ in range(3):
        last = train_bases(model, data, cfg, lr=0.05, adversarial=adversarial, seed=1)
    assert last.loss < 0.7 * first.loss
    assert first.num_examples == len(data) and first.steps == -(-len(data) // 32)
    assert (first.adv_loss > 0) == adversarial


def test_non_adversarial_training_leaves_the_adversarial_bn_untouched():
    model = SplitMixSpec().build(1)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adv." in k}
    train_bases(model, client_train_data(DataConfig(num_partitions=4), 0), LocalTrainConfig(epochs=1), 0.05, False, 0)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_budget_levels_and_profiles():
    assert parse_budgets("8-4-2-1") == [0.125, 0.25, 0.5, 1.0]
    assert parse_budgets("8-4-8d3-2") == [0.125, 0.25, 0.375, 0.5]
    widths = parse_budgets("8-4-2-1")
    # 50 clients: equal contiguous quarters from the smallest budget up (authors' int(4*i/N)).
    assert [budget_of_client(i, 50, widths) for i in (0, 12, 13, 24, 25, 37, 38, 49)] == [0.125, 0.125, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    assert adversarial_clients(50, 0.5, seed=0).sum() == 25
    profile = make_profile(3, 50, "8-4-2-1", 0.0, 0, {"budget": "2", "adversarial": True})
    assert profile.budget == 0.5 and profile.adversarial and SplitMixSpec().bases_for_budget(profile.budget) == 4
    with pytest.raises(ValueError, match="budget"):
        make_profile(3, 50, "8-4-2-1", 0.0, 0, {"budget": 2.0})

"""Models: stacking equals separate bases, mixing is the mean of logits, dual BN routing, costs."""

import pytest
import torch

from models import create_model, list_models
from models.blocks import DualBatchNorm, set_route
from models.cost import count_macs, count_params
from models.splitmix import (
    SplitMixSpec,
    build_mixture,
    init_global_state,
    split_stacked_state,
    stack_base_states,
)


def test_registry_lists_families_and_rejects_unknown():
    assert {"cnn", "preresnet18"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match="width"):
        create_model("cnn", width=0)


@pytest.mark.parametrize("image_size,channels", [(8, 1), (28, 1), (32, 3)])
def test_cnn_runs_on_all_digit_sizes(image_size, channels):
    model = create_model("cnn", width=0.25, in_channels=channels, image_size=image_size, num_bases=3)
    out = model.forward_bases(torch.rand(4, channels, image_size, image_size))
    assert out.shape == (4, 3, 10)


def test_preresnet18_param_count_matches_reference():
    # Reference (research/splitmix.md §6): width 1 ≈ 11.17 M params; 8 bases at 1/8 ≈ 1.41 M.
    full = create_model("preresnet18", width=1.0, in_channels=3, image_size=32)
    bases = create_model("preresnet18", width=0.125, num_bases=8, in_channels=3, image_size=32)
    assert abs(count_params(full) / 1e6 - 11.17) < 0.01
    assert abs(count_params(bases) / 1e6 - 1.41) < 0.01
    assert bases.forward_bases(torch.rand(2, 3, 32, 32)).shape == (2, 8, 10)


def test_stacked_bases_equal_separately_built_bases():
    spec = SplitMixSpec(dual_bn=True)
    state = init_global_state(spec, seed=3)
    x = torch.rand(6, 1, 8, 8)
    stacked = build_mixture(spec, state, [1, 4, 6]).forward_bases(x)
    for j, base in enumerate([1, 4, 6]):
        alone = build_mixture(spec, state, [base]).forward_bases(x)[:, 0]
        torch.testing.assert_close(stacked[:, j], alone, rtol=1e-5, atol=1e-6)


def test_mixing_k_bases_is_mean_of_their_logits():
    spec = SplitMixSpec()
    state = init_global_state(spec, seed=0)
    x = torch.rand(5, 1, 8, 8)
    mix = build_mixture(spec, state, [0, 2, 5])
    singles = torch.stack([build_mixture(spec, state, [b])(x) for b in (0, 2, 5)])
    torch.testing.assert_close(mix(x), singles.mean(0), rtol=1e-5, atol=1e-6)


def test_split_and_stack_round_trip():
    model = create_model("cnn", width=0.125, num_bases=4, dual_bn=True)
    bases = split_stacked_state(model.state_dict(), 4)
    assert len(bases) == 4 and bases[0]["conv1.weight"].shape == (8, 1, 3, 3)
    restacked = stack_base_states(bases)
    for name, tensor in restacked.items():
        torch.testing.assert_close(tensor, model.state_dict()[name])


def test_dual_bn_routes_batches_to_their_own_statistics():
    bn = DualBatchNorm(3)
    bn.train()
    clean = torch.randn(64, 3, 4, 4) + 5.0
    adv = torch.randn(64, 3, 4, 4) - 5.0
    bn.route = "clean"
    bn(clean)
    bn.route = "adv"
    bn(adv)
    # Each BN saw only its own batch: running means moved towards +5 and -5 respectively.
    assert torch.allclose(bn.clean.running_mean, torch.full((3,), 0.1 * clean.mean().item()), atol=0.05)
    assert torch.allclose(bn.adv.running_mean, torch.full((3,), 0.1 * adv.mean().item()), atol=0.05)
    assert (bn.clean.running_mean > 0.4).all() and (bn.adv.running_mean < -0.4).all()


def test_dual_bn_lambda_mixes_the_two_paths():
    bn = DualBatchNorm(2)
    bn.clean.running_mean.fill_(1.0)
    bn.adv.running_mean.fill_(-1.0)
    bn.eval()
    x = torch.randn(4, 2, 3, 3)
    with torch.no_grad():
        set_route(bn, 0.0)
        clean = bn(x)
        set_route(bn, 1.0)
        adv = bn(x)
        set_route(bn, 0.3)
        mixed = bn(x)
    torch.testing.assert_close(mixed, 0.7 * clean + 0.3 * adv)
    assert not torch.allclose(clean, adv)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_route(bn, 1.5)


def test_split_mix_costs_grow_linearly_with_bases():
    spec = SplitMixSpec()
    one = spec.build(1)
    eight = spec.build(8)
    assert count_params(eight) == 8 * count_params(one)
    assert count_macs(eight, (1, 8, 8)) == 8 * count_macs(one, (1, 8, 8))
    # conv1 of one base on an 8×8 image: 64 positions × 8 filters × 9 taps.
    assert count_macs(one, (1, 8, 8)) > 64 * 8 * 9


def test_width_must_be_multiple_of_atom():
    spec = SplitMixSpec(atom_width=0.125)
    assert spec.bases_for_width(0.5) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        spec.bases_for_width(0.3)
    with pytest.raises(ValueError, match="1/N"):
        SplitMixSpec(atom_width=0.3)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_folded_inference_model_computes_the_same_function(lam):
    from models.fuse import fuse_for_inference

    spec = SplitMixSpec()
    model = build_mixture(spec, init_global_state(spec, seed=0), [0, 3, 5], lam)
    for bn in model.modules():  # non-trivial statistics and affine parameters
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-1, 1)
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, (DualBatchNorm, torch.nn.BatchNorm2d)) for m in fused.modules())
    x = torch.rand(9, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_digit_cnn_is_the_papers_digit_model():
    """Table 6 of the Split-Mix paper (research/splitmix.md §6): DigitModel on 3×28×28 has
    14.219 M params at width 1 and 0.224 M per 1/8-width base; stacking 8 bases = 8 × one base,
    and a stacked base computes what the same base alone computes."""
    full = create_model("digit-cnn", width=1.0, in_channels=3, image_size=28)
    base = create_model("digit-cnn", width=0.125, in_channels=3, image_size=28)
    bases = create_model("digit-cnn", width=0.125, num_bases=8, in_channels=3, image_size=28)
    assert round(count_params(full) / 1e6, 3) == 14.219
    assert round(count_params(base) / 1e6, 3) == 0.224
    assert count_params(bases) == 8 * count_params(base)
    torch.manual_seed(0)
    stacked = create_model("digit-cnn", width=0.125, num_bases=2, image_size=8).eval()
    single = create_model("digit-cnn", width=0.125, image_size=8).eval()
    single.load_state_dict({k: v.chunk(2, 0)[1] if v.dim() else v for k, v in stacked.state_dict().items()})
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(stacked.forward_bases(x)[:, 1], single.forward_bases(x)[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        create_model("digit-cnn", image_size=30)

"""ViT bases: stacking equals separate bases, width scaling, dual-LN routing, AttnScale/FeatScale,
the T0 MAC count, Split-Mix state round-trips and one adversarial training step."""

import pytest
import torch

import models.vit as vit  # registers "vit", "vit_attnscale", "vit_featscale"
from clients.recipe import LocalTrainConfig, per_base_loss, train_bases
from models import create_model
from models.blocks import recompute_bn_stats, routed, set_route
from models.cost import count_macs, count_params
from models.fuse import fuse_for_inference
from models.slicing import slice_state
from models.splitmix import (
    SplitMixSpec,
    build_mixture,
    init_global_state,
    is_adversarial_tensor,
    load_stacked,
    split_stacked_state,
    stack_base_states,
)
from splitmix.adversarial import PGDConfig
from splitmix.data import ArrayData, load_split


def _vit_params(dim: int, hidden: int, depth: int, tokens: int, patch_in: int, classes: int, dual: bool) -> int:
    """Hand count: patch conv + CLS + positions + blocks (2 LN, qkv, proj, fc1, fc2) + LN + head."""
    ln = 2 * dim * (2 if dual else 1)
    block = 2 * ln + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    return patch_in * dim + dim + dim + tokens * dim + depth * block + ln + dim * classes + classes


def test_registry_has_vit_families():
    from models import list_models

    assert {"vit", "vit_attnscale", "vit_featscale"} <= set(list_models())


@pytest.mark.parametrize("image_size,channels,patch", [(8, 1, 2), (8, 1, 4), (28, 1, None), (32, 3, None)])
def test_forward_shapes_on_all_input_sizes(image_size, channels, patch):
    model = create_model("vit", width=0.125, num_bases=3, in_channels=channels, image_size=image_size, patch_size=patch, dual_bn=True)
    assert model.forward_bases(torch.rand(2, channels, image_size, image_size)).shape == (2, 3, 10)
    per_base = torch.rand(2, 3, channels, image_size, image_size)  # per-base (PGD) inputs
    assert model.forward_bases(per_base).shape == (2, 3, 10)
    assert model(torch.rand(2, channels, image_size, image_size)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        create_model("vit", image_size=image_size, patch_size=3)


def test_stacked_bases_equal_separately_built_bases():
    spec = SplitMixSpec(arch="vit_attnscale", dual_bn=True)
    state = init_global_state(spec, seed=3)
    for key in state:  # non-zero head/AttnScale/adv-LN tensors so every per-base path is exercised
        if key.endswith(("head.weight", "omega", "adv.weight")):
            state[key] = torch.randn_like(state[key]) * 0.5 + (1.0 if key.endswith("adv.weight") else 0.0)
    x = torch.rand(5, 1, 8, 8)
    for lam in (0.0, 0.3):
        stacked = build_mixture(spec, state, [1, 4, 6], robustness=lam).forward_bases(x)
        for j, base in enumerate([1, 4, 6]):
            alone = build_mixture(spec, state, [base], robustness=lam).forward_bases(x)[:, 0]
            torch.testing.assert_close(stacked[:, j], alone, rtol=1e-5, atol=1e-5)


def test_split_stack_round_trip_and_adversarial_names():
    model = create_model("vit_featscale", width=0.125, num_bases=4, dual_bn=True, attn_scale=True)
    bases = split_stacked_state(model.state_dict(), 4)
    single = create_model("vit_featscale", width=0.125, num_bases=1, dual_bn=True, attn_scale=True).state_dict()
    assert {n: tuple(t.shape) for n, t in bases[0].items()} == {n: tuple(t.shape) for n, t in single.items()}
    for name, tensor in stack_base_states(bases).items():
        torch.testing.assert_close(tensor, model.state_dict()[name])
    with torch.no_grad():
        model.head.weight.normal_()  # the classifier starts at zero; make the outputs differ
    bases = split_stacked_state(model.state_dict(), 4)
    fresh = load_stacked(create_model("vit_featscale", width=0.125, num_bases=4, dual_bn=True, attn_scale=True), bases)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(fresh.forward_bases(x), model.forward_bases(x))
    adversarial = {n for n in single if is_adversarial_tensor(n)}
    assert adversarial == {n for n in single if ".adv." in f".{n}"} and len(adversarial) == 4 * 4 + 2  # 2 LN × 4 blocks + final, ×(w, b)
    assert all(n.endswith(("adv.weight", "adv.bias")) for n in adversarial)


def test_width_scaling_param_and_mac_counts():
    # Default: width 1 is D 256 = 32 heads × 8, MLP 512; r = 1/8 keeps head dim 8 → 4 heads, D 32 (T0).
    base = create_model("vit", width=0.125)
    assert (base.embed_dim, base.num_heads) == (32, 4)
    assert count_params(base) == _vit_params(32, 64, 4, 17, 4, 10, dual=False) == 35_306
    full = create_model("vit", width=1.0, dual_bn=True)
    bases = create_model("vit", width=0.125, num_bases=8, dual_bn=True)
    assert count_params(full) == _vit_params(256, 512, 4, 17, 4, 10, dual=True)
    assert count_params(bases) == 8 * _vit_params(32, 64, 4, 17, 4, 10, dual=True)
    assert count_macs(bases, (1, 8, 8)) == 8 * 633_408
    assert count_params(bases) / count_params(full) < 0.14  # about 1/8, like the CNN
    assert create_model("vit", width=0.03).num_heads == 1  # at least one head


def test_t0_mac_count_is_exact():
    # research/vit.md T0: 8×8×1, patch 2, D 32, 4 heads, MLP 64, 4 blocks, 10 classes.
    t0 = create_model("vit", width=1.0, embed_dim=32, num_heads=4, mlp_ratio=2.0, depth=4, patch_size=2)
    assert count_macs(t0, (1, 8, 8)) == 633_408
    # AttnScale/FeatScale add only element-wise work; explicit attention counts the same matmuls.
    scaled = create_model("vit", width=1.0, embed_dim=32, num_heads=4, attn_scale=True, feat_scale=True)
    assert count_macs(scaled, (1, 8, 8)) == 633_408
    for m in scaled.modules():
        if isinstance(m, vit.Attention):
            m.record = True
    assert count_macs(scaled, (1, 8, 8)) == 633_408


def test_dual_layer_norm_routing_mixes_the_two_paths():
    torch.manual_seed(0)
    model = create_model("vit", width=0.125, num_bases=2, dual_bn=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adv." in f".{name}":
                p.add_(torch.randn_like(p) * 0.3)
    norm = model.blocks[0].norm1
    assert isinstance(norm, vit.DualLayerNorm)
    x = torch.randn(2, 3, 17, 32)
    with routed(model, "clean"):
        clean = norm(x)
    with routed(model, "adv"):
        adv = norm(x)
    assert norm.route == "clean"  # routed restored it
    set_route(model, 0.3)
    torch.testing.assert_close(norm(x), 0.7 * clean + 0.3 * adv)
    assert all(m.route == 0.3 for m in model.modules() if isinstance(m, vit.DualLayerNorm))


def test_attnscale_fused_equals_explicit_and_zero_is_plain_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 17, 8) for _ in range(3))
    omega = torch.randn(4, 1, 1)
    fused = vit.attnscale_fused(q, k, v, omega)
    explicit, attn = vit.attnscale_explicit(q, k, v, omega)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 17))  # rows of Â still sum to 1
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(vit.attnscale_fused(q, k, v, torch.zeros(4, 1, 1)), plain, rtol=1e-6, atol=1e-6)
    dc, _ = vit.attnscale_explicit(q, k, v, -torch.ones(4, 1, 1))  # ω = −1: only the DC part left
    torch.testing.assert_close(dc, v.mean(-2, keepdim=True).expand_as(dc), rtol=1e-5, atol=1e-6)

    # Module level: ω = 0 equals the plain model; fused and recorded (explicit) paths agree.
    torch.manual_seed(1)
    plain_model = create_model("vit", width=0.125, num_bases=2)
    scaled_model = create_model("vit_attnscale", width=0.125, num_bases=2)
    with torch.no_grad():
        plain_model.head.weight.normal_()
    scaled_model.load_state_dict(plain_model.state_dict(), strict=False)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(scaled_model.forward_bases(x), plain_model.forward_bases(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        for blk in scaled_model.blocks:
            blk.attn.omega.normal_()
    maps = vit.attention_maps(scaled_model, x)
    assert len(maps) == 4 and maps[0].shape == (3, 2, 4, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 2, 4, 17))
    fused_out = scaled_model.forward_bases(x)
    for m in scaled_model.modules():
        if isinstance(m, vit.Attention):
            m.record = True
    torch.testing.assert_close(scaled_model.forward_bases(x), fused_out, rtol=1e-5, atol=1e-5)


def test_featscale_zero_is_identity_and_is_applied_once():
    torch.manual_seed(0)
    fs = vit.FeatScale(8, num_bases=2)
    z = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(fs(z), z)
    a, b = torch.randn(16), torch.randn(16)
    with torch.no_grad():
        fs.dc.copy_(a)
        fs.hf.copy_(b)
    dc = z.mean(dim=2, keepdim=True)
    expected = z + a.view(2, 1, 1, 8) * dc + b.view(2, 1, 1, 8) * (z - dc)
    torch.testing.assert_close(fs(z), expected)  # once: not z + 2·(s_dc·DC + s_hf·HC)
    with torch.no_grad():
        fs.hf.fill_(-1.0)
    out = fs(z)
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))  # s_hf = −1: all tokens equal

    # In a block (MLP zeroed): x + FeatScale(attn(LN(x))), with the scales hit exactly once.
    model = create_model("vit_featscale", width=0.125, num_bases=2)
    blk = model.blocks[0]
    with torch.no_grad():
        blk.mlp.fc2.weight.zero_()
        blk.mlp.fc2.bias.zero_()
        blk.featscale.dc.normal_()
        blk.featscale.hf.normal_()
    x = torch.randn(2, 3, 17, 32)
    branch = blk.attn(blk.norm1(x))
    mean = branch.mean(dim=2, keepdim=True)
    s_dc, s_hf = blk.featscale.dc.view(2, 1, 1, 32), blk.featscale.hf.view(2, 1, 1, 32)
    torch.testing.assert_close(blk(x), x + branch + s_dc * mean + s_hf * (branch - mean))


def test_oversmoothing_helpers():
    model = create_model("vit", width=0.125, num_bases=2, depth=3)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        sims = vit.patch_similarity(model, x)
        per_base = vit.patch_similarity(model, x, per_base=True)
        hc = vit.high_frequency_ratio(model, x)
    assert sims.shape == (3,) and per_base.shape == (3, 2) and hc.shape == (3,)
    torch.testing.assert_close(sims, per_base.mean(dim=1))
    # Reference: ‖X − mean‖_F / ‖X‖_F by brute force for the last block, per base and image.
    last = model.block_outputs(x)[-1].detach()  # (k, B, N, D)
    centred = last - last.mean(dim=2, keepdim=True)
    ratio = centred.flatten(2).norm(dim=-1) / last.flatten(2).norm(dim=-1)
    torch.testing.assert_close(hc[-1], ratio.mean(), rtol=1e-5, atol=1e-6)
    # Reference: pairwise cosine by brute force for the last block, base 0.
    tokens = torch.nn.functional.normalize(model.block_outputs(x)[-1][0, :, 1:], dim=-1).detach()
    cos = tokens @ tokens.transpose(1, 2)
    n = cos.shape[-1]
    brute = ((cos.sum((1, 2)) - n) / (n * (n - 1))).mean()
    torch.testing.assert_close(per_base[-1, 0], brute, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, scale", [("vit_attnscale", "omega"), ("vit_featscale", "hf")])
def test_high_frequency_scale_changes_patch_similarity(family, scale):
    """Effect test: ω = 2 (AttnScale) or s_hf = 2 (FeatScale) amplifies the high-frequency part, so
    the last block's patch tokens are less alike than at 0; −0.9 damps it, so they are more alike.
    Measured on digits at init: 1 − similarity 0.018 at 0, 0.032 / 0.029 at 2."""
    x = load_split("digits", "", True).x[:32]
    dissimilarity = {}
    for value in (0.0, 2.0, -0.9):
        torch.manual_seed(0)
        model = create_model(family, width=0.125, num_bases=1, depth=3).eval()
        params = [p for name, p in model.named_parameters() if name.endswith(scale)]
        assert len(params) == 3  # one per block
        with torch.no_grad():
            for p in params:
                p.fill_(value)
            dissimilarity[value] = 1.0 - float(vit.patch_similarity(model, x)[-1])
    assert dissimilarity[2.0] > 1.3 * dissimilarity[0.0], dissimilarity
    assert dissimilarity[-0.9] < 0.95 * dissimilarity[0.0], dissimilarity


def test_heterofl_leading_slices_fit_and_keep_whole_heads():
    full = create_model("vit", width=1.0).state_dict()
    narrow = create_model("vit", width=0.25)
    shapes = {k: tuple(v.shape) for k, v in narrow.state_dict().items()}
    narrow.load_state_dict(slice_state(full, shapes), strict=True)
    # head-major qkv rows: the narrow model's head 0 q/k/v are the full model's head 0 q/k/v
    d = 8
    torch.testing.assert_close(narrow.blocks[0].attn.qkv.weight[: 3 * d], full["blocks.0.attn.qkv.weight"][: 3 * d, : narrow.embed_dim])


def test_framework_norm_helpers_accept_vit():
    # BN-only helpers must be harmless on a LayerNorm model: static BN, BN re-estimation, folding.
    spec = SplitMixSpec(arch="vit", dual_bn=True, track_stats=False)
    model = spec.build(2)
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.rand(6, 1, 8, 8)
    recompute_bn_stats(model, x)
    set_route(model, 0.5)
    torch.testing.assert_close(fuse_for_inference(model)(x), model(x))


def test_adversarial_training_step_reduces_loss():
    torch.manual_seed(0)
    model = create_model("vit", width=0.125, num_bases=2, dual_bn=True, depth=1)
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    adv_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".adv." in f".{n}"}
    with torch.no_grad(), routed(model, "clean"):
        before = per_base_loss(model.forward_bases(x), y).item()
    # no weight decay: every change of a parameter below comes from its gradient
    cfg = LocalTrainConfig(epochs=6, batch_size=16, weight_decay=0.0, pgd=PGDConfig(eps=0.05, alpha=0.02, steps=2))
    result = train_bases(model, ArrayData(x, y), cfg, lr=0.05, adversarial=True, seed=0)
    with torch.no_grad(), routed(model, "clean"):
        after = per_base_loss(model.forward_bases(x), y).item()
    assert result.steps == 6 and result.adv_loss > 0
    assert after < before
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], t) for n, t in adv_before.items())  # the adv LN path trained

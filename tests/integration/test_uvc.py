"""UVC (techniques/uvc_search.py, models/vit_sliced.py, tools/compress.py): exact T0 MAC counts (analytic == flop counter),
exact mask counts, sliced == masked, skipped block == identity, budgets met after slicing,
client masks, and `compress_run` end to end on a tiny ViT run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from models.cost import count_macs
from models.vit_sliced import SlicedViT, ViTGeometry, dense_selection, slice_vit
from techniques.uvc_search import (
    UVCConfig,
    UVCSearch,
    gated_forward,
    group_scores,
    kd_loss,
    least_sum,
    magnitude_selection,
    masked_copy,
    project_to_budget,
    resource_macs,
    select_by_counts,
    selection_from_masks,
    selection_masks,
    uvc_masks,
    uvc_search,
)

T0 = dict(width=1.0, embed_dim=32, num_heads=4, mlp_ratio=2.0, depth=4, patch_size=2)
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores
    yield
    torch.set_num_threads(threads)


def _t0(num_bases: int = 1, seed: int = 0, **extra) -> torch.nn.Module:
    """T0 with every zero-initialised tensor randomised, so each path carries signal."""
    torch.manual_seed(seed)
    model = create_model("vit", num_bases=num_bases, **T0, **extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("head.weight", "omega", ".dc", ".hf")) or ".adv." in f".{name}":
                p.normal_(0.0, 0.3)
    return model.eval()


def _counts(k: int, seed: int, skip: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    s0 = torch.randint(0, 4, (k, 4), generator=gen)
    r = torch.randint(0, 8, (k, 4, 4), generator=gen)
    s1 = torch.randint(0, 64, (k, 4), generator=gen)
    blocks = torch.rand(k, 4, generator=gen) >= skip
    return s0, r, s1, blocks


# ---------------------------------------------------------------------------------------------
# resource function


def test_dense_resource_is_t0_and_matches_flop_counter():
    model = _t0()
    geom = ViTGeometry.from_model(model)
    zeros = torch.zeros(1, 4)
    analytic = resource_macs(geom, zeros, torch.zeros(1, 4, 4), zeros, torch.ones(1, 4, 4))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    assert geom.dense_macs() == int(analytic) == 633_408 == counter.get_total_flops() // 2 == count_macs(model, SHAPE)
    assert dense_selection(geom).macs(geom) == 633_408


@pytest.mark.parametrize(
    "heads,neurons,vdims_removed,skip_last,expected",
    [(3, 32, 0, False, 406_016), (3, 32, 0, True, 305_104), (4, 64, 1, False, 611_376)],
)
def test_vit_md_ratios_are_exact_on_the_sliced_model(heads, neurons, vdims_removed, skip_last, expected):
    """research/vit.md §1.5: analytic == FlopCounterMode on the physically sliced model, exactly."""
    model = _t0()
    geom = ViTGeometry.from_model(model)
    blocks = torch.ones(1, 4, dtype=torch.bool)
    blocks[0, 3] = not skip_last
    sel = select_by_counts(
        group_scores(model), torch.full((1, 4), 4 - heads), torch.full((1, 4, 4), vdims_removed), torch.full((1, 4), 64 - neurons), blocks
    )
    assert sel.macs(geom) == expected == count_macs(slice_vit(model, sel), SHAPE)
    s0 = torch.full((1, 4), 4.0 - heads, requires_grad=True)
    analytic = resource_macs(
        geom, s0, torch.full((1, 4, 4), float(vdims_removed)), torch.full((1, 4), 64.0 - neurons), sel.heads.double(), blocks.double()
    )
    assert int(analytic) == expected
    analytic.backward()
    kept = blocks[0]
    assert bool((s0.grad[0, kept] < 0).all()) and bool((s0.grad[0, ~kept] == 0).all())  # a skipped block costs nothing


# ---------------------------------------------------------------------------------------------
# masks, slicing, skipping


def test_masks_keep_exactly_the_asked_counts():
    model = _t0(num_bases=2)
    s0, r, s1, blocks = _counts(2, seed=1)
    scores = group_scores(model)
    sel = select_by_counts(scores, s0, r, s1, blocks)
    masks = selection_masks(model, sel)
    for b in range(2):
        for l in range(4):
            p = f"blocks.{l}."
            pruned = ~sel.heads[b, l]
            assert int(pruned.sum()) == s0[b, l]
            # the removed heads are the lowest-scored ones
            if pruned.any():
                assert scores.heads[b, l][pruned].max() <= scores.heads[b, l][~pruned].min()
            vdims = int(masks[p + "attn.proj.weight"].view(2, 32, 32)[b].any(0).sum())
            kept_r = int((r[b, l] * sel.heads[b, l]).sum())
            neurons = int(masks[p + "mlp.fc1.bias"].view(2, 64)[b].sum())
            if blocks[b, l]:
                assert vdims == 32 - 8 * int(s0[b, l]) - kept_r
                assert neurons == 64 - int(s1[b, l])
                assert int(masks[p + "mlp.fc2.weight"].view(2, 32, 64)[b].any(0).sum()) == neurons
                assert int(masks[p + "mlp.fc1.weight"].view(2, 64, 32)[b].any(1).sum()) == neurons
                qkv_rows = int(masks[p + "attn.qkv.weight"].view(2, 96, 32)[b].any(1).sum())
                assert qkv_rows == 2 * 8 * (4 - int(s0[b, l])) + vdims
            else:
                assert vdims == neurons == 0 and not masks[p + "attn.proj.bias"].view(2, 32)[b].any()
    back = selection_from_masks(model, masks)
    for name in ("blocks", "heads", "neurons"):
        expect = getattr(sel, name) & (sel.blocks if name == "blocks" else sel.blocks.unsqueeze(-1))
        assert torch.equal(getattr(back, name), expect)


@pytest.mark.parametrize("extra", [{}, {"dual_bn": True, "attn_scale": True, "feat_scale": True}])
def test_sliced_equals_masked_and_reloads(extra):
    from models.blocks import set_route

    model = _t0(num_bases=3, seed=2, **extra)
    if extra:
        set_route(model, 0.3)
    sel = select_by_counts(group_scores(model), *_counts(3, seed=3, skip=0.25))
    assert not sel.blocks.all() and sel.blocks.any()
    masked, sliced = masked_copy(model, sel).eval(), slice_vit(model, sel).eval()
    if extra:
        set_route(sliced, 0.3)
    x = torch.rand(6, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(sliced.forward_bases(x), masked.forward_bases(x), atol=1e-5, rtol=1e-5)
        per_base = x.unsqueeze(1).expand(-1, 3, -1, -1, -1)
        torch.testing.assert_close(sliced.forward_bases(per_base), masked.forward_bases(per_base), atol=1e-5, rtol=1e-5)
    assert count_macs(sliced, SHAPE) == sel.macs(ViTGeometry.from_model(model))
    rebuilt = SlicedViT(json.loads(json.dumps(sliced.architecture)))
    rebuilt.load_state_dict(sliced.state_dict(), strict=True)
    if extra:
        set_route(rebuilt, 0.3)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), sliced(x))


def test_skipped_block_is_identity_and_hard_gates_are_exact():
    model = _t0(num_bases=2, dual_bn=True, attn_scale=True, feat_scale=True)
    geom = ViTGeometry.from_model(model)
    sel = dense_selection(geom)
    sel.blocks[:, 1] = False
    masked = masked_copy(model, sel)
    tokens = model.embed(torch.rand(3, *SHAPE)).detach()
    with torch.no_grad():
        assert torch.equal(masked.blocks[1](tokens), tokens)
        assert not torch.equal(masked.blocks[0](tokens), tokens)
        x = torch.rand(4, *SHAPE)
        keep = torch.tensor([0.0, 1.0]).repeat(2, 4, 1)
        assert torch.equal(gated_forward(model, x, None, keep), model.forward_bases(x))  # 1·Block + 0·X is exact
        skip = keep.clone()
        skip[:, 1] = torch.tensor([1.0, 0.0])
        torch.testing.assert_close(gated_forward(model, x, None, skip), masked.forward_bases(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# pieces of the search


def test_least_sum_kd_loss_and_prox():
    psi, grad = least_sum(torch.tensor([5.0, 1.0, 4.0, 2.0]), torch.tensor(2))
    assert float(psi) == pytest.approx(3.0) and float(grad) == pytest.approx(4.0)
    psi, _ = least_sum(torch.tensor([5.0, 1.0, 4.0, 2.0]), torch.tensor(0))
    assert float(psi) == pytest.approx(0.0, abs=1e-12)
    s, y = torch.randn(5, 2, 10), torch.randint(0, 10, (5,))
    assert torch.allclose(kd_loss(s, s, y, alpha=0.1), 0.9 * kd_loss(s, s, y, alpha=0.0), atol=1e-6)
    # prox: y = p = 0 leaves W unchanged; otherwise only the removed groups shrink, by 1/(1 + 2ηy)
    model = _t0()
    search = UVCSearch(model, UVCConfig(flops_ratio=0.5), total_steps=10)
    sel = select_by_counts(group_scores(model), torch.ones(1, 4), torch.zeros(1, 4, 4), torch.full((1, 4), 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    search.y.zero_()
    search.p.zero_()
    search._prox(sel, lr=0.1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    search.y.fill_(2.0)
    search._prox(sel, lr=0.1)
    w, w0 = model.blocks[0].mlp.fc2.weight.detach(), before["blocks.0.mlp.fc2.weight"]
    gone = ~sel.neurons[0, 0]
    torch.testing.assert_close(w[:, gone], w0[:, gone] / 1.4)
    assert torch.equal(w[:, ~gone], w0[:, ~gone])


def _labelled(model: torch.nn.Module, n: int = 128, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs labelled by ``model`` itself (what distillation from the dense model sees)."""
    x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(-1)


def test_primal_dual_brings_the_learned_ratio_to_the_budget():
    """Effect test: the search alone (no projection) lands within 5 % of B; without the primal-dual
    step the counts never move and the ratio stays at 1."""
    model = _t0(num_bases=2, seed=6)
    x, y = _labelled(model)
    search = uvc_search(model, x, y, UVCConfig(flops_ratio=0.5), steps=40, seed=0)
    assert search.ratio() == pytest.approx(0.5, abs=0.025)
    assert search.z > 1.0  # the dual rose while R > B
    assert search.selection().macs(search.geom) == pytest.approx(0.5 * search.dense, rel=0.05)


def test_damping_keeps_the_search_from_overshooting_a_low_budget():
    """Effect test: at B = 0.3 undamped steps drop heads in similar blocks at once and the lagging z
    carries R to ~0.16; the damped search approaches B and stays within 5 % of it."""
    model = _t0(num_bases=2, seed=6)
    x, y = _labelled(model)
    ratios: list[float] = []
    search = uvc_search(model, x, y, UVCConfig(flops_ratio=0.3), steps=40, seed=0, on_step=lambda info: ratios.append(info["ratio_hard"]))
    assert search.ratio() == pytest.approx(0.3, abs=0.015)
    assert min(ratios) >= 0.3 * 0.95


def test_gates_learn_to_skip_the_block_that_is_cheap_to_skip():
    """Effect test: with the counts frozen, B = 0.8 needs one of 4 blocks gone; block 1 computes
    (almost) the identity, so skipping it costs the distillation loss nothing, while the others
    carry the output. The gates skip block 1 and keep the rest."""
    model = _t0(seed=0)
    with torch.no_grad():
        for l, block in enumerate(model.blocks):
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.weight.mul_(1e-3 if l == 1 else 4.0)
                if l == 1:
                    linear.bias.zero_()
    x, y = _labelled(model, n=256)
    search = uvc_search(model, x, y, UVCConfig(flops_ratio=0.8, s_lr=0.0, s_travel=0.0), steps=150, seed=0)
    margin = (search.gates[0, :, 1] - search.gates[0, :, 0]).detach()
    assert margin[1] < -1.0 and bool((margin[[0, 2, 3]] > 0).all()), margin
    assert search.kept_blocks().tolist() == [[True, False, True, True]]


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_projection_and_magnitude_meet_the_budget_after_slicing(ratio):
    model = _t0(num_bases=2, seed=4)
    geom = ViTGeometry.from_model(model)
    dense = count_macs(model, SHAPE)
    sel = project_to_budget(geom, dense_selection(geom), group_scores(model), ratio * dense, fill=True)
    measured = count_macs(slice_vit(model, sel), SHAPE)
    assert measured == sel.macs(geom) <= ratio * dense
    assert measured >= ratio * dense - 2 * geom.tokens * geom.dim  # filled up to within one neuron
    mag = magnitude_selection(model, ratio)
    assert count_macs(slice_vit(model, mag), SHAPE) <= ratio * dense
    heads, neurons = mag.heads.sum(-1), mag.neurons.sum(-1)
    assert (heads == heads[0, 0]).all() and (neurons == neurons[0, 0]).all()  # uniform over blocks and bases


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_client_masks_realise_a_sliceable_model_within_budget(ratio):
    model = _t0(num_bases=2, seed=5)
    reference = {n: t.clone() for n, t in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, *SHAPE, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    masks = uvc_masks(model, x, y, ratio, steps=6, seed=0)
    assert all(torch.equal(t, reference[n]) for n, t in model.state_dict().items())  # the model is not touched
    state = model.state_dict()
    assert all(m.dtype == torch.bool and m.shape == state[n].shape for n, m in masks.items())
    sel = selection_from_masks(model, masks)
    masked = masked_copy(model, sel)
    with torch.no_grad():  # the returned masks are exactly the selection's masks
        for n, p in masked.named_parameters():
            expect = state[n] * masks[n] if n in masks else state[n]
            assert torch.equal(p, expect)
    sliced = slice_vit(model, sel).eval()
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), masked.eval()(x), atol=1e-5, rtol=1e-5)
    assert count_macs(sliced, SHAPE) <= ratio * count_macs(model, SHAPE)


# ---------------------------------------------------------------------------------------------
# compress_run on a tiny ViT run


def _tiny_run(tmp_path_factory, model: str):
    from conftest import InProcessGrid

    from server.federation import run_federation
    from splitmix.config import load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        overrides=f"model={model} num-clients=2 num-rounds=1 local-epochs=1 adv-fraction=0 pgd-steps=1 "
        f"eval-pgd-steps=0 eval-lambdas='0' budgets='8-1' out-dir='{out}' run-name={model}"
    )
    return run_federation(InProcessGrid(2), cfg)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory, "vit")


@pytest.mark.slow
def test_compress_run_writes_a_loadable_model_within_budget(vit_run, tmp_path):
    from splitmix.config import RunConfig
    from splitmix.data import test_data
    from tools.compress import compress_run, load_compressed

    out = tmp_path / "uvc"
    card = compress_run(vit_run, 0.25, 0.5, out=out, search_epochs=1, finetune_epochs=1, seed=0, report=None, progress=False, random_control=True)
    for name in ("model.safetensors", "architecture.json", "model_card.json", "history.json"):
        assert (out / name).is_file(), name
    assert card["width"] == 0.25 and card["bases"] == [0, 1] and card["model"] == "vit"
    assert card["macs"]["dense"] == 2 * 633_408
    assert card["macs"]["compressed"] <= 0.5 * card["macs"]["dense"] and card["flops_ratio"]["measured"] <= 0.5
    assert card["baseline"]["macs_ratio"] <= 0.5
    assert card["baseline"]["finetune_epochs"] == 2  # search + fine-tune epochs: UVC's weight training, matched
    assert card["flops_ratio"]["after_projection"] == pytest.approx(card["flops_ratio"]["measured"])
    assert card["flops_ratio"]["learned_within_tolerance"] == (abs(card["flops_ratio"]["learned_before_projection"] - 0.5) <= 0.025)
    assert card["max_abs_logit_diff_masked_vs_sliced"] < 1e-4
    assert card["accuracy"]["masked"] == card["accuracy"]["compressed"]
    history = json.loads((out / "history.json").read_text())
    assert [h["stage"] for h in history] == ["search", "finetune"] + ["baseline-finetune"] * 2 + ["random-finetune"] * 2  # 1 + 1 epochs
    random = card["random_control"]  # the magnitude arm's counts, other groups, the same epochs
    assert random["finetune_epochs"] == 2 and random["macs"] == card["baseline"]["macs"]
    assert random["kept"]["heads_kept"] == card["baseline"]["kept"]["heads_kept"]
    model = load_compressed(out)
    assert count_macs(model, SHAPE) == card["macs"]["compressed"]
    cfg = RunConfig.from_mapping(json.loads((vit_run / "config.json").read_text())["run_config"])
    test = test_data(cfg.data_config())
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(-1) == test.y).float().mean())
        exported = torch.export.load(str(out / "model.pt2")).module()  # servable without this project's code
        assert torch.allclose(exported(test.x[:5]), model(test.x[:5]), atol=1e-5)
    assert accuracy == pytest.approx(card["accuracy"]["compressed"])


def test_compress_rejects_non_vit_runs_and_bad_inputs(vit_run, tmp_path_factory, capsys):
    from tools import compress

    cnn_run = _tiny_run(tmp_path_factory, "cnn")
    with pytest.raises(ValueError, match="model 'cnn'"):
        compress.compress_run(cnn_run, 0.125, 0.5, report=None, progress=False)
    assert compress.main([str(vit_run), "--width", "0.25", "--flops-ratio", "1.5"]) == 2
    assert "--flops-ratio 1.5" in capsys.readouterr().err
    assert compress.main([str(vit_run), "--width", "0.3", "--flops-ratio", "0.5"]) == 2
    assert "width 0.3 is not served" in capsys.readouterr().err
    for ratio in ("0.1", "0.02"):  # below one head + one neuron per block: one line, before any training
        assert compress.main([str(vit_run), "--width", "0.25", "--flops-ratio", ratio, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --flops-ratio {ratio} is out of range") and "allowed: [0.1497, 1]" in err[0]
    parser = argparse.ArgumentParser(prog="splitmix")
    compress.add_compress_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compress", str(vit_run), "--width", "0.25", "--flops-ratio", "0.5"])
    assert args.func is compress.cmd_compress and args.search_epochs == 10 and args.finetune_epochs == 10


def test_compress_refuses_every_block_skipped_or_chance_accuracy():
    from tools.compress import CompressError, _refuse_degenerate

    geom = ViTGeometry.from_model(_t0(num_bases=2))
    sel = dense_selection(geom)
    _refuse_degenerate(sel, 0.5, 0.6, 10, 360, 0.5)  # a usable result passes
    _refuse_degenerate(sel, 0.12, 0.12, 10, 360, 0.5)  # a dense model at chance has nothing to lose
    sel.blocks[1] = False
    with pytest.raises(CompressError, match=r"skips every block of base\(s\) \[1\]"):
        _refuse_degenerate(sel, 0.5, 0.6, 10, 360, 0.02)
    with pytest.raises(CompressError, match="at chance"):
        _refuse_degenerate(dense_selection(geom), 0.12, 0.6, 10, 360, 0.02)  # 0.1 + 2·sqrt(0.09/360) = 0.1316

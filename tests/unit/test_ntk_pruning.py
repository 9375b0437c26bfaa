"""Random pruning at init and the empirical NTK (arXiv 2203.14328): masks, kernels, the study."""

import argparse
import copy
import json
import math

import pytest
import torch
from torch import nn

from models import create_model
from techniques.random_init import apply_masks_, random_prune_, weight_jacobian
from tools import ntk_study
from tools.ntk import NTKMLP, empirical_ntk
from tools.ntk_study import NTKStudyConfig, compute_table, make_inputs


def test_random_prune_keeps_the_right_fraction_and_rescales_exactly():
    layer = nn.Linear(1000, 1000)
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    p = 0.3
    masks = random_prune_(layer, p, rescale=True, generator=torch.Generator().manual_seed(0))
    keep = masks["weight"]
    assert set(masks) == {"weight"} and keep.dtype == torch.bool
    # 10^6 Bernoulli(0.7) draws: std of the kept fraction ≈ 4.6e-4.
    assert abs(keep.float().mean().item() - (1 - p)) < 0.003
    assert torch.equal(layer.bias, before_b)
    assert torch.all(layer.weight[~keep] == 0)
    torch.testing.assert_close(layer.weight[keep], before_w[keep] / math.sqrt(1 - p), rtol=1e-6, atol=0)


def test_random_prune_without_rescale_and_seeding():
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    b.load_state_dict(a.state_dict())
    before = a.weight.detach().clone()
    ma = random_prune_(a, 0.5, generator=torch.Generator().manual_seed(3))
    mb = random_prune_(b, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ma["weight"], mb["weight"]) and torch.equal(a.weight, b.weight)
    assert torch.equal(a.weight[ma["weight"]], before[ma["weight"]])  # kept weights unchanged
    with torch.no_grad():
        a.weight.add_(1.0)
    apply_masks_(a, ma)
    assert torch.all(a.weight[~ma["weight"]] == 0)
    with pytest.raises(ValueError, match="pruning probability"):
        random_prune_(a, 1.0)


def test_random_prune_on_a_repo_model_leaves_norms_and_biases_dense():
    model = create_model("cnn", width=0.25, num_bases=2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    masks = random_prune_(model, 0.5, generator=torch.Generator().manual_seed(0), skip=["fc2"])
    assert set(masks) == {"conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight"}
    for name, param in model.named_parameters():
        if name in masks:
            assert 0.4 < masks[name].float().mean().item() < 0.6
        else:  # biases, BN affine parameters, the skipped read-out
            assert torch.equal(param, before[name]), name
    assert model.forward_bases(torch.rand(2, 1, 28, 28)).shape == (2, 2, 10)


def test_empirical_ntk_matches_an_explicit_jacobian():
    torch.manual_seed(0)
    model = NTKMLP(5, 7, depth=2, out_dim=2, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 5)
    rows = []
    for i in range(4):
        for o in range(2):
            grads = torch.autograd.grad(model(x[i : i + 1])[0, o], list(model.parameters()))
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows)
    torch.testing.assert_close(empirical_ntk(model, x), jac @ jac.T, rtol=1e-5, atol=1e-5)


def test_pruned_ntk_is_the_ntk_of_the_masked_reparametrisation():
    """K of the pruned net = kernel of θ ↦ f(s·M⊙θ): removed weights get no gradient."""
    dense = NTKMLP(6, 16, depth=2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 6)
    for rescale in (False, True):
        net = copy.deepcopy(dense)
        masks = random_prune_(net, 0.6, rescale, torch.Generator().manual_seed(1))
        jw = weight_jacobian(masks, 0.6, rescale)
        theta = {k: v.detach() for k, v in dense.named_parameters()}

        def f(params, xi, *, jw=jw):
            w = {k: v * jw[k] if k in jw else v for k, v in params.items()}
            return torch.func.functional_call(dense, w, (xi.unsqueeze(0),)).reshape(-1)

        jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(theta, x)
        flat = torch.cat([j.reshape(5, -1) for j in jac.values()], dim=1)
        torch.testing.assert_close(empirical_ntk(net, x, jw), flat @ flat.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_p0_pruned_ntk_equals_dense(rescale):
    dense = NTKMLP(8, 128, depth=2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(12, 8)
    pruned = copy.deepcopy(dense)
    masks = random_prune_(pruned, 0.0, rescale, torch.Generator().manual_seed(0))
    assert all(bool(m.all()) for m in masks.values())
    k_dense, k_pruned = empirical_ntk(dense, x), empirical_ntk(pruned, x, weight_jacobian(masks, 0.0, rescale))
    assert k_pruned.shape == (12, 12)
    torch.testing.assert_close(k_pruned, k_dense, rtol=1e-6, atol=1e-6)


def test_rescaled_error_falls_with_width_and_unrescaled_scale_is_one_minus_p_per_layer():
    cfg = NTKStudyConfig(widths=(64, 1024), ps=(0.5,), seeds=2)
    narrow, wide = compute_table(cfg)
    assert cfg.pruned_layers == 2
    # Measured (seed 0..4): ratio wide/narrow 0.26–0.36; per-layer factor at 1024 within 0.021 of 0.5.
    assert wide["err_rescaled"] < 0.6 * narrow["err_rescaled"], (narrow, wide)
    assert wide["err_rescaled"] < 0.2
    assert abs(wide["per_layer_factor"] - 0.5) < 0.05
    assert abs(wide["scale_pruned"] - 0.5**2) < 0.04
    assert abs(wide["err_pruned"] - (1 - 0.5**2)) < 0.05
    assert abs(wide["scale_rescaled"] - 1.0) < 0.1
    # w.r.t. the stored weights (what the federated `random` clients train) each pruned layer's
    # term shrinks by 1 − p = 0.5 and the dense input layer's does not: the scale lies strictly
    # between 0.5 and 1 at every width (measured 0.63), and the error does not shrink with width.
    assert 0.55 < wide["scale_stored"] < 0.75 and 0.55 < narrow["scale_stored"] < 0.75
    assert wide["err_stored"] > 0.3 and wide["err_stored"] > 0.8 * narrow["err_stored"]


def test_study_writes_its_files_and_cli_prints_the_folder(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ntk_study.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "ntk"
    args = parser.parse_args(["ntk", "--widths", "16,32", "--ps", "0.5", "--seeds", "1", "--num-inputs", "4", "--input-dim", "3", "--out", str(out)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    meta = json.loads((out / "results.json").read_text())
    assert meta["config"]["widths"] == [16, 32] and len(meta["rows"]) == 2
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"width", "p", "err_rescaled", "err_pruned", "scale_pruned"} <= set(header)
    assert (out / "ntk_error.png").read_bytes()[:4] == b"\x89PNG"
    bad = parser.parse_args(["ntk", "--ps", "1.0", "--out", str(tmp_path / "bad")])
    assert bad.func(bad) == 2


def test_inputs_are_on_the_sphere_and_config_validates():
    x = make_inputs(NTKStudyConfig(num_inputs=5, input_dim=9))
    torch.testing.assert_close(x.norm(dim=1), torch.full((5,), 3.0))
    with pytest.raises(ValueError, match="widths"):
        NTKStudyConfig(widths=(0,))
    assert NTKStudyConfig(prune_input=True).pruned_layers == 3


def test_study_at_p0_reports_zero_error_and_unit_scale():
    (row,) = compute_table(NTKStudyConfig(widths=(32,), ps=(0.0,), seeds=2, num_inputs=6, prune_input=True))
    assert row["err_rescaled"] < 1e-6 and row["err_pruned"] < 1e-6
    assert abs(row["scale_pruned"] - 1) < 1e-6 and abs(row["scale_rescaled"] - 1) < 1e-6

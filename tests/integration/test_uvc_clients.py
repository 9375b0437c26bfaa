"""UVC as a client-local technique: ViT clients under a FLOPs budget train and upload only what
their UVC search keeps (``sparse-method = "uvc"``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VIT  # the shared tiny ViT (the `tiny_vit` fixture)

from models.vit_sliced import ViTGeometry
from splitmix.config import load_config
from splitmix.data import ArrayData
from techniques.uvc_search import selection_from_masks, uvc_masks


def test_uvc_client_masks_meet_the_flops_budget_per_round(monkeypatch, technique_round):
    import techniques.uvc

    monkeypatch.setattr(techniques.uvc, "SEARCH_STEPS", 5)
    spec = load_config(overrides=TINY_VIT).spec()
    torch.manual_seed(0)
    model = spec.build(2)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    expected = uvc_masks(model, x, y, 0.5, steps=5, seed=0)  # what the client's search finds (model unchanged)
    geom = ViTGeometry.from_model(model)
    assert selection_from_masks(model, expected).macs(geom) <= 0.5 * geom.dense_macs()
    overrides = "model=vit vit-depth=2 vit-dim=128 vit-heads=16 sparse-method=uvc uvc-flops-ratio=0.5"
    sparse, rnd, state = technique_round(overrides, model, ["base0", "base5"], ArrayData(x, y))
    sparse.steps, sparse.flops_used = 4, 4 * sparse._step_share  # as if 4 masked training steps ran
    sparse.after_training(rnd, None)
    masks, metrics = rnd.masks, rnd.metrics
    # the round's FLOPs count the search: 5 dense steps at batch 64 + the teacher's pass over 64 examples
    search = techniques.uvc.search_cost(5, 64, 64, rnd.task.train.batch_size)
    assert search == pytest.approx((5 * 64 + 64 / 3) / rnd.task.train.batch_size)
    assert metrics["flops-fraction"] == pytest.approx(sparse._step_share + search / 4)
    assert metrics["flops-fraction"] > 1.0 > sparse._step_share  # more than dense training, reported as such
    assert {k.split(".")[0] for k in masks} == {"base0", "base5"}
    assert 0.0 < metrics["density"] < 1.0
    for j, unit in enumerate(("base0", "base5")):  # each unit trains under its chunk of the search's weight masks
        for name, m in sparse.masks[unit].mask.items():
            want = expected[name].chunk(2, 0)[j] if name in expected else torch.ones_like(m)
            assert torch.equal(m, want), name
    # the masks are applied to the weights the client trains
    for name, p in sparse.params.items():
        assert torch.all(p.detach()[~sparse.stacked[name]] == 0)


@pytest.mark.slow
def test_uvc_clients_train_vit_bases_through_the_simulation(tmp_path):
    from server.simulation import simulate

    cfg = load_config(
        overrides={
            **TINY_VIT,
            "num-clients": 6,
            "num-rounds": 3,
            "local-epochs": 3,
            "lr": 0.1,
            "adv-fraction": 0.0,
            "eval-pgd-steps": 0,
            "sparse-method": "uvc",
            "uvc-flops-ratio": 0.5,
            "out-dir": str(tmp_path),
            "run-name": "uvc",
        }
    )
    run = simulate(cfg)
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["valid"] == 6 and r["rejected"] == 0 for r in rows)
    assert 3.0 < summary["sparse"]["train_flops_fraction"] < 5.0  # measured 3.96: ~0.5 masked training + ~3.5 the search
    assert summary["widths"]["1.0"]["accuracy"] > 0.3  # chance 0.1; measured 0.52


def test_flops_fraction_above_one_is_accepted_density_above_one_is_not():
    from types import SimpleNamespace

    from flwr.app import MetricRecord, RecordDict

    from strategies.base import ReplyRejected, reply_num_examples

    def reply(**extra: float) -> SimpleNamespace:
        return SimpleNamespace(content=RecordDict({"metrics": MetricRecord({"num-examples": 8, "loss": 1.0, "train-time": 0.1, **extra})}))

    assert reply_num_examples(reply(**{"flops-fraction": 3.2, "density": 0.5})) == 8  # a search costs more than dense training
    for value in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ReplyRejected, match="'flops-fraction'.*finite number >= 0"):
            reply_num_examples(reply(**{"flops-fraction": value}))
    with pytest.raises(ReplyRejected, match="'density' = 1.5 is not a fraction"):
        reply_num_examples(reply(density=1.5))

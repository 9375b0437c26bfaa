"""ViT bases in the framework: topology config, Split-Mix simulation, diversity loss in the client
recipe, the over-smoothing record, and ``splitmix search-topology`` feeding ``simulate``."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from conftest import TINY_VIT  # the shared tiny ViT (the `tiny_vit` fixture)

from clients.recipe import LocalTrainConfig, train_bases
from models.splitmix import load_stacked, split_stacked_state
from splitmix.cli import main as cli_main
from splitmix.config import ConfigError, load_config
from splitmix.data import ArrayData, load_split
from splitmix.protocol.task import ClientTask
from techniques.diversity import Diversity, DiversityConfig, DiversitySection, diversity_terms, patch_cosine_diversity, stacked_vit_diversity


def test_vit_topology_keys_build_every_base():
    cfg = load_config(overrides={**TINY_VIT, "vit-patch": 4, "vit-mlp-ratio": 4.0})
    base = cfg.spec().build(1)
    assert (base.embed_dim, base.num_heads, len(base.blocks), base.patch_size) == (16, 2, 2, 4)
    assert base.blocks[0].mlp.fc1.out_per_base == 64
    full = cfg.spec().build_width(1.0)
    assert (full.embed_dim, full.num_heads) == (128, 16)
    assert load_config(overrides={"model": "cnn"}).spec().model_options == ""  # other families get no ViT keywords


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"model": "vit", "vit-dim": 100, "vit-heads": 16}, "vit-dim"),
        ({"model": "vit", "vit-heads": 12, "vit-dim": 96}, "vit-heads"),  # 12 heads × 0.125 = 1.5 heads per base
        ({"model": "vit", "vit-patch": 3}, "vit-patch"),
        ({"model": "cnn", "diversity-heads": 0.1}, "diversity-heads"),
        ({"model": "vit", "diversity-condition": -1.0}, "diversity-condition"),
    ],
)
def test_invalid_vit_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=overrides)


def test_client_task_carries_the_diversity_config():
    cfg = load_config(overrides={**TINY_VIT, "diversity-patch-cosine": 0.5, "diversity-condition": 1e-4})
    task = cfg.client_task()
    back = ClientTask.from_json(task.to_json())
    assert "diversity" in back.active
    assert back.section("diversity").terms() == DiversityConfig(patch_cosine=0.5, weight_condition=1e-4)
    assert back.spec == task.spec and back.spec.options()["depth"] == 2


def _stack(k: int, seed: int = 0):
    torch.manual_seed(seed)
    return load_config(overrides=TINY_VIT).spec().build(k)


def test_vit_diversity_of_stacked_bases_is_the_sum_over_bases():
    """Each base's terms computed on its own single-base model, weighted and summed by hand."""
    cfg = DiversityConfig(patch_cosine=0.3, patch_contrastive=0.2, attention_heads=0.1, weight_condition=1e-3)
    spec = load_config(overrides=TINY_VIT).spec()
    stacked = _stack(2).eval()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    logits, loss = stacked_vit_diversity(cfg, stacked, x)
    assert torch.allclose(logits, stacked.forward_bases(x), atol=1e-6)
    expected = 0.0
    for state in split_stacked_state(stacked.state_dict(), 2):
        single = load_stacked(spec.build(1), [state]).eval()
        _, first, last, attn = single.forward_with_tokens(x, record_attention=True)
        terms = diversity_terms(cfg, [first[0], last[0]], [attn[0]], single.qkv_matrices())
        expected += sum(getattr(cfg, name) * float(value.detach()) for name, value in terms.items())
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_vit_qkv_matrices_are_the_query_key_value_projections():
    model = _stack(1).eval()
    x = torch.rand(3, 1, 8, 8)
    tokens = model.blocks[0].norm1(model.embed(x))[0]  # (B, N, D)
    w = model.qkv_matrices()[0]  # (3D, D): W_q, W_k, W_v
    d = model.embed_dim
    q = tokens @ w[:d].T
    qkv = model.blocks[0].attn.qkv(tokens.unsqueeze(0))[0]  # rows interleave (head, q/k/v, head dim)
    h, hd = model.num_heads, d // model.num_heads
    q_ref = qkv.view(3, -1, h, 3, hd)[..., 0, :].reshape(3, -1, d) - model.blocks[0].attn.qkv.bias.view(h, 3, hd)[:, 0].reshape(d)
    assert torch.allclose(q, q_ref, atol=1e-5)


def test_vit_diversity_regularizer_lowers_patch_similarity_in_local_training():
    """The same local training with and without the patch-cosine term (weight 1): the regularised
    model's last-layer patch tokens are less alike."""
    train_split = load_split("digits", "", True)
    data = ArrayData(train_split.x[:128], train_split.y[:128])
    sims = {}
    for weight in (0.0, 1.0):
        model = _stack(1, seed=3)
        train = LocalTrainConfig(epochs=4, batch_size=16)
        hooks = [Diversity(DiversitySection(patch_cosine=weight)).client_round(None)] if weight else []
        result = train_bases(model, data, train, lr=0.05, adversarial=False, seed=0, hooks=hooks)
        assert (result.diversity_loss > 0) == (weight > 0)
        with torch.no_grad():
            _, _, last, _ = model.eval().forward_with_tokens(data.x)
            sims[weight] = float(patch_cosine_diversity(last[0]))
    assert sims[0.0] > 0.9 and sims[1.0] < 0.2, sims  # measured: 0.98 vs 0.02


@pytest.mark.slow
def test_vit_bases_train_through_the_splitmix_simulation(tmp_path):
    from server.simulation import simulate
    from server.store import load_weights

    cfg = load_config(
        overrides={
            **TINY_VIT,
            "num-clients": 6,
            "num-rounds": 4,
            "local-epochs": 3,
            "lr": 0.1,
            "adv-fraction": 0.0,
            "eval-pgd-steps": 0,
            "out-dir": str(tmp_path),
            "run-name": "vit",
        }
    )
    run = simulate(cfg)
    summary = json.loads((run / "summary.json").read_text())
    accuracy = {w: row["accuracy"] for w, row in summary["widths"].items()}
    assert accuracy["1.0"] > 0.5, accuracy  # chance is 0.1
    assert min(accuracy.values()) > 0.2, accuracy
    profile = summary["oversmoothing"]
    assert len(profile["patch_similarity"]) == len(profile["high_frequency_ratio"]) == 2
    # patch tokens after each block are neither collapsed nor orthogonal, and the last block is
    # smoother than the first (over-smoothing grows with depth)
    sims = profile["patch_similarity"]
    assert 0.05 < sims[0] < sims[1] < 0.999, sims
    weights = load_weights(run / "model.safetensors")
    assert weights["base7.blocks.1.attn.qkv.weight"].shape == (48, 16)  # base: 2 heads × 8 dims, 2 blocks
    assert not any(".blocks.2." in k for k in weights)
    assert json.loads((run / "config.json").read_text())["spec"]["model_options"]


def test_search_topology_is_deterministic_and_feeds_simulate(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('model = "vit"\nvit-depth = 2\nvit-dim = 128\nvit-heads = 16\natom-width = 0.25\nbudgets = "4-2-1"\nnum-rounds = 3\n')
    argv = ["search-topology", "--config", str(config), "--patch", "2,4", "--heads", "1,2", "--mlp-ratio", "2"]
    argv += ["--repeats", "1", "--points", "16", "--scale", "2"]
    kendall = ["--kendall", "2", "--kendall-steps", "3", "--kendall-seeds", "1", "--results", str(tmp_path / "kendall.json")]
    assert cli_main([*argv, *kendall, "--out", str(tmp_path / "a")]) == 0
    assert cli_main([*argv, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / f / "search.json").read_text()) for f in "ab")
    assert [r["topology"] for r in a["ranked"]] == [r["topology"] for r in b["ranked"]]
    assert [r["length_distortion"] for r in a["ranked"]] == [r["length_distortion"] for r in b["ranked"]]
    # shapes at the config's base size: dim 128 × 0.25 = 32, depth 2
    assert len(a["ranked"]) == 4 and {(r["dim"], r["depth"]) for r in a["ranked"]} == {(32, 2)}
    assert [r["rank_sum"] for r in a["ranked"]] == sorted(r["rank_sum"] for r in a["ranked"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "b")
    # the written run config keeps the file's keys (atom width included) and reproduces the chosen topology in every base
    run_config = tomllib.loads((tmp_path / "a" / "topology.toml").read_text())
    assert (run_config["atom-width"], run_config["num-rounds"], run_config["model"]) == (0.25, 3, "vit")
    cfg = load_config(tmp_path / "a" / "topology.toml")
    chosen = a["chosen"]
    base = cfg.spec().build(1)
    assert (base.embed_dim, base.num_heads, len(base.blocks), base.patch_size) == (chosen["dim"], chosen["heads"], chosen["depth"], chosen["patch"])
    seed = next(r for r in a["ranked"] if r["topology"] == a["seed_topology"])
    assert chosen["depth"] * chosen["dim"] ** 2 > seed["depth"] * seed["dim"] ** 2  # scaled up (× 2 in parameters)
    record = json.loads((tmp_path / "kendall.json").read_text())
    assert record["kind"] == "table" and len(record["rows"]) == 4 and len(record["columns"]) == 3
    assert record["provenance"]["command"].startswith("splitmix search-topology") and "commit" in record["provenance"]
    assert [row[0] for row in record["rows"]] == ["length distortion", "−NTK κ", "−rank sum", "parameters"]


def test_search_topology_refuses_an_empty_grid(tmp_path, capsys):
    assert cli_main(["search-topology", "--patch", "3", "--out", str(tmp_path / "x")]) == 2
    assert "grid is empty" in capsys.readouterr().err


def test_vit_experiment_comparison_reports_patch_similarity(tmp_path):
    """Over-smoothing rows and plot in an experiment's comparison (mean over seeds, per block)."""
    from safetensors.torch import save_file

    from tools.experiment import Experiment, write_comparison

    experiment = Experiment(name="os", methods=["vit", "attnscale"], seeds=[0, 1])
    sims = {"vit": ([0.5, 0.9], [0.7, 0.95]), "attnscale": ([0.4, 0.6], [0.4, 0.8])}
    for method, per_seed in sims.items():
        for seed, similarity in enumerate(per_seed):
            run = tmp_path / "runs" / f"{method}-seed{seed}"
            run.mkdir(parents=True)
            summary = {
                "widths": {"1.0": {"accuracy": 0.8, "robust_accuracy": None, "params": 10, "macs": 20}},
                "oversmoothing": {"patch_similarity": similarity},
            }
            (run / "summary.json").write_text(json.dumps(summary))
            (run / "metrics.jsonl").write_text(json.dumps({"bytes-up": 1, "bytes-down": 2}) + "\n")
            save_file({"w": torch.zeros(2)}, str(run / "model.safetensors"))
    comparison = write_comparison(tmp_path, experiment)
    assert comparison["vit"]["patch_similarity"] == pytest.approx([0.6, 0.925])
    assert comparison["attnscale"]["patch_similarity"] == pytest.approx([0.4, 0.7])
    table = (tmp_path / "comparison.md").read_text()
    assert "| patch similarity, last block | 0.925 | 0.700 |" in table
    assert (tmp_path / "patch_similarity.png").stat().st_size > 1000


def test_vit_fedbn_keeps_layer_norms_local():
    """FedBN with ViT bases: every LayerNorm (both dual paths, the final norm) stays on the client."""
    from models.blocks import norm_state_keys

    spec = load_config(overrides=TINY_VIT).spec()
    keys = norm_state_keys(spec.build_width(1.0))
    assert "blocks.0.norm1.clean.weight" in keys and "blocks.1.norm2.adv.bias" in keys and "norm.clean.weight" in keys
    assert len(keys) == (2 * 2 + 1) * 2 * 2  # (2 blocks × 2 norms + final) × 2 paths × (weight, bias)
    assert not any("attn" in k or "mlp" in k for k in keys)

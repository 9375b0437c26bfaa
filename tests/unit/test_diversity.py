"""Diverse-ViT regularizers: each term against a hand computation on a toy, gradients, off = 0, and
each term lowering its own redundancy measure when trained on a ViT base."""

from __future__ import annotations

import math

import pytest
import torch

import models.vit as vit
from models import create_model
from splitmix.data import load_split
from techniques.diversity import (
    DiversityConfig,
    attention_head_diversity,
    condition_number,
    diversity_loss,
    diversity_terms,
    patch_contrastive_diversity,
    patch_cosine_diversity,
    qkv_weights,
    stacked_vit_diversity,
    weight_condition_loss,
)


def _with_cls(patches: torch.Tensor) -> torch.Tensor:
    """Prepend a random CLS token, which every patch term must ignore."""
    cls = torch.randn(patches.shape[0], 1, patches.shape[-1])
    return torch.cat([cls, patches], dim=1)


def test_patch_cosine_hand_values():
    e = torch.eye(2).unsqueeze(0)  # two orthogonal tokens
    assert patch_cosine_diversity(_with_cls(e), include_diagonal=False).item() == pytest.approx(0.0, abs=1e-7)
    assert patch_cosine_diversity(_with_cls(e)).item() == pytest.approx(0.5)  # diagonal included: 1/n
    same = torch.tensor([[[1.0, 2.0, 3.0]] * 4])
    assert patch_cosine_diversity(_with_cls(same)).item() == pytest.approx(1.0)
    assert patch_cosine_diversity(_with_cls(same), include_diagonal=False).item() == pytest.approx(1.0)
    ortho16 = torch.eye(16).unsqueeze(0) * 3.0
    assert patch_cosine_diversity(_with_cls(ortho16)).item() == pytest.approx(1 / 16)
    # tokens at 60°: off-diagonal cosine 0.5 → (2·1 + 2·0.5)/4 with the diagonal
    t = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(3) / 2]]])
    assert patch_cosine_diversity(t, prefix_tokens=0).item() == pytest.approx(0.75)
    assert patch_cosine_diversity(t, prefix_tokens=0, include_diagonal=False).item() == pytest.approx(0.5)


def test_patch_contrastive_hand_values():
    e = torch.eye(4).unsqueeze(0)
    # S = I: positive 1, negatives average 0 → log(1 + e^{-1})
    assert patch_contrastive_diversity(_with_cls(e), _with_cls(e)).item() == pytest.approx(0.3132617, abs=1e-6)
    # Hand toy, n = 3, B = 1: last = first with token 0 and 1 swapped.
    first = torch.eye(3).unsqueeze(0)
    last = first[:, [1, 0, 2]]
    # S = permutation matrix: S_00 = S_11 = 0 with one 1 among the negatives (mean 1/2);
    # S_22 = 1 with negatives 0.
    expected = (2 * math.log(1 + math.exp(0.5 - 0.0)) + math.log(1 + math.exp(0.0 - 1.0))) / 3
    got = patch_contrastive_diversity(first, last, prefix_tokens=0).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_attention_head_hand_values():
    a = torch.softmax(torch.randn(2, 1, 5, 5), dim=-1)
    assert attention_head_diversity(a.expand(2, 3, 5, 5)).item() == pytest.approx(1.0)
    # Disjoint supports: head h attends only to token h → cross-head cosines 0 → 1/H.
    heads = 4
    disjoint = torch.zeros(1, heads, 6, 6)
    for h in range(heads):
        disjoint[0, h, :, h] = 1.0
    assert attention_head_diversity(disjoint).item() == pytest.approx(1 / heads)


def test_weight_condition_exact_singular_values():
    w = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # singular values 3 and 0.5
    assert condition_number(w).item() == pytest.approx(6.0)
    q, _ = torch.linalg.qr(torch.randn(2, 2))
    assert condition_number(q @ w).item() == pytest.approx(6.0, rel=1e-5)
    assert weight_condition_loss([w], chunks=1).item() == pytest.approx((9.0 - 0.25) ** 2)
    assert weight_condition_loss([torch.diag(torch.tensor([3.0, 2.0, 1.0]))], chunks=1).item() == pytest.approx(64.0)
    # A fused qkv weight (3D, D) made of c·orthogonal chunks → exactly 0 (the reference's power
    # iteration gives NaN here).
    d = 4
    chunks = [c * torch.linalg.qr(torch.randn(d, d))[0] for c in (1.0, 2.0, 0.5)]
    assert weight_condition_loss([torch.cat(chunks)]).item() == pytest.approx(0.0, abs=1e-4)
    # chunks of a qkv weight are scored independently: q = diag(3,2,1), k = v = identity.
    qkv = torch.cat([torch.diag(torch.tensor([3.0, 2.0, 1.0])), torch.eye(3), torch.eye(3)])
    assert weight_condition_loss([qkv]).item() == pytest.approx(64.0)


def test_scale_invariance_of_cosine_terms():
    x, y = torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    a = torch.softmax(torch.randn(2, 3, 7, 7), -1)
    for f, args, scaled in (
        (patch_cosine_diversity, (x,), (3.0 * x,)),
        (patch_contrastive_diversity, (x, y), (2.0 * x, 0.1 * y)),
        (attention_head_diversity, (a,), (5.0 * a,)),
    ):
        assert f(*args).item() == pytest.approx(f(*scaled).item(), rel=1e-5)


def _toy_inputs(requires_grad: bool = True):
    torch.manual_seed(0)
    tokens = [torch.randn(2, 5, 6, requires_grad=requires_grad) for _ in range(3)]
    attn_logits = torch.randn(2, 2, 5, 5, requires_grad=requires_grad)
    qkv = torch.randn(18, 6, requires_grad=requires_grad)
    return tokens, attn_logits, qkv


def test_gradients_flow_into_every_input():
    tokens, attn_logits, qkv = _toy_inputs()
    cfg = DiversityConfig.released_regularizers()
    loss = diversity_loss(cfg, tokens, [torch.softmax(attn_logits, -1)], [qkv])
    loss.backward()
    for t in (tokens[0], tokens[-1], attn_logits, qkv):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert tokens[1].grad is None  # middle layers are not used
    # the combination is the weighted sum of the individual terms
    terms = diversity_terms(cfg, tokens, [torch.softmax(attn_logits, -1)], [qkv])
    assert set(terms) == {"patch_cosine", "patch_contrastive", "attention_heads", "weight_condition"}
    expected = sum(getattr(cfg, k) * v for k, v in terms.items())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_orthogonal_weight_gradient_is_finite():
    w = torch.eye(3).repeat(3, 1).requires_grad_(True)  # identical singular values
    weight_condition_loss([w]).backward()
    assert torch.isfinite(w.grad).all()


def test_terms_off_when_weight_zero():
    tokens, attn_logits, qkv = _toy_inputs()
    attn = [torch.softmax(attn_logits, -1)]
    off = diversity_loss(DiversityConfig(), tokens, attn, [qkv])
    assert off.item() == 0.0 and not DiversityConfig().enabled
    # Nothing needed when off: inputs may be absent.
    assert diversity_loss(DiversityConfig(), None, None, None).item() == 0.0
    for name in ("patch_cosine", "patch_contrastive", "attention_heads", "weight_condition"):
        cfg = DiversityConfig(**{name: 0.3})
        terms = diversity_terms(cfg, tokens, attn, [qkv])
        assert list(terms) == [name]
        assert diversity_loss(cfg, tokens, attn, [qkv]).item() == pytest.approx(0.3 * terms[name].item())
    with pytest.raises(ValueError):
        DiversityConfig(patch_cosine=-1.0)


def test_qkv_weights_found_by_name():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(4, 12)
            self.proj = torch.nn.Linear(4, 4)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    found = qkv_weights(model)
    assert len(found) == 2 and all(w.shape == (12, 4) for w in found)


# --------------------------------------------------------------------------- effect on a ViT base
# Each redundancy measure is computed here independently of the term that should lower it.


def _cross_layer_gap(model, x) -> float:
    """Mean over patches of (mean cosine to the other patches' first-layer tokens − cosine to its own)."""
    _, first, last, _ = model.forward_with_tokens(x)
    h1 = torch.nn.functional.normalize(first[0, :, 1:], dim=-1)
    hl = torch.nn.functional.normalize(last[0, :, 1:], dim=-1)
    sim = h1 @ hl.transpose(1, 2)
    n = sim.shape[-1]
    own = sim.diagonal(dim1=1, dim2=2)
    return float(((sim.sum(-1) - own) / (n - 1) - own).mean())


def _head_similarity(model, x) -> float:
    """Mean off-diagonal cosine between block 1's heads' attention maps."""
    a = torch.nn.functional.normalize(vit.attention_maps(model, x)[0][:, 0].flatten(2), dim=-1)  # (B, H, N²)
    cos = a @ a.transpose(1, 2)
    h = cos.shape[-1]
    return float(((cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)) / (h * (h - 1))).mean())


def _qkv_condition(model, x) -> float:
    """Mean condition number of every block's W_q, W_k, W_v."""
    return float(torch.stack([condition_number(m) for w in model.qkv_matrices() for m in w.chunk(3)]).mean())


MEASURES = {
    "patch_cosine": (lambda m, x: float(vit.patch_similarity(m, x)[-1]), 1.0),
    "patch_contrastive": (_cross_layer_gap, 1.0),
    "attention_heads": (_head_similarity, 1.0),
    "weight_condition": (_qkv_condition, 1e-2),
}


@pytest.mark.parametrize("term", list(MEASURES))
def test_each_term_lowers_its_own_redundancy_measure(term):
    """Effect test: 30 Adam steps of task loss + the term vs task loss alone, same init and data."""
    torch.set_num_threads(1)
    train = load_split("digits", "", True)
    x, y = train.x[:64], train.y[:64]
    measure, coef = MEASURES[term]
    after = {}
    for on in (False, True):
        torch.manual_seed(0)
        model = create_model("vit", width=0.125, num_bases=1, depth=2)
        cfg = DiversityConfig(**{term: coef if on else 0.0})
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(30):
            logits, reg = stacked_vit_diversity(cfg, model, x)
            loss = torch.nn.functional.cross_entropy(logits[:, 0], y) + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after[on] = measure(model.eval(), x)
    assert after[True] < after[False] - 0.2 * max(abs(after[False]), 1.0), after

"""Over-smoothing of a trained ViT run: how alike its patch tokens become with depth.

AttnScale/FeatScale (arXiv 2203.05962) claim attention acts as a low-pass filter, so patch
tokens converge with depth; the summary of every ViT run records, per block, the mean pairwise
cosine similarity of the patch tokens and the share of the signal above the DC component, for
the widest model on test images, so runs with and without the options can be compared.
"""

from __future__ import annotations

import torch

from models.vit import VisionTransformer, high_frequency_ratio, patch_similarity
from strategies.registry import Method


def oversmoothing_profile(method: Method, state: dict[str, torch.Tensor], x: torch.Tensor, calibration: torch.Tensor | None = None) -> dict | None:
    """``{"width", "patch_similarity": [per block], "high_frequency_ratio": [per block]}`` of the
    widest clean (λ = 0) model on ``x``; None for a model that is not a ViT."""
    width = max(method.widths())
    model = method.eval_model(state, width, 0.0, calibration)
    if not isinstance(model, VisionTransformer):
        return None
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        similarity = patch_similarity(model, x)
        high = high_frequency_ratio(model, x)
    return {
        "width": width,
        "examples": len(x),
        "patch_similarity": [round(float(v), 6) for v in similarity],
        "high_frequency_ratio": [round(float(v), 6) for v in high],
    }

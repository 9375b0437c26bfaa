"""Query a finished run: build the model of a requested width and robustness on demand.

``load_run(RUN)`` reads a run folder written by ``splitmix simulate`` (config, summary,
``model.safetensors``) and ``run.model(width=0.5, robustness=0.3)`` returns the served
``nn.Module`` without retraining: for Split-Mix the k = width/r bases stacked into one batched
network (their logits averaged), with λ mixing the clean and adversarial BN paths; for the
baselines their own served model. ``export`` writes safetensors weights, a JSON model card and a
``torch.export`` program that runs with torch alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.cost import count_macs, count_params
from models.fuse import fuse_for_inference
from models.mixture_inference import compile_inference, inference_model
from models.splitmix import SplitMixSpec
from server.store import WEIGHTS, load_weights
from splitmix.config import RunConfig
from strategies.registry import make_method

# The values a served model's inputs may take: every dataset reader scales pixels to [0, 1]
# (splitmix/data.py: uint8 / 255, scikit-learn digits / 16; the domain transforms stay inside it)
# and adversarial training clamps to it (splitmix/adversarial.py), so the models never saw
# anything else. Outside it their outputs mean nothing (1e20 gets one class at probability 1.0).
# Float rounding (e.g. antialiased resizing) may step a few ulps past the ends: tolerated.
INPUT_RANGE = (0.0, 1.0)
INPUT_TOLERANCE = 1e-6


class QueryError(ValueError):
    """A query names something the run cannot serve (the message says what is allowed)."""


@dataclass(frozen=True)
class ServedModel:
    width: float
    robustness: float
    bases: list[int]
    model: nn.Module  # what is served: the fast inference form (models/mixture_inference.py)
    module: nn.Module  # the same model unfused: the trained tensors, as exported to safetensors


class Run:
    """A finished run folder, ready to serve models of any width / robustness it supports."""

    def __init__(self, folder: str | Path, compile: bool = False) -> None:
        self.folder = Path(folder)
        self.compile = compile  # torch.compile served models (fuses element-wise ops; slow first use)
        if not self.folder.is_dir():
            raise QueryError(f"run folder '{self.folder}' does not exist")
        for name in ("config.json", "summary.json", WEIGHTS):
            if not (self.folder / name).is_file():
                raise QueryError(f"'{self.folder}' is not a finished run: {name} is missing")
        self.config = json.loads((self.folder / "config.json").read_text())
        self.summary = json.loads((self.folder / "summary.json").read_text())
        self.spec = SplitMixSpec(**self.config["spec"])
        self.method_name = self.config.get("method", "splitmix")
        self.method = (
            RunConfig.from_mapping(self.config["run_config"]).make_method()
            if "run_config" in self.config
            else make_method(self.method_name, self.spec)
        )
        self.state = load_weights(self.folder / WEIGHTS)  # raises ValueError on a damaged file
        self.input_shape = (self.spec.in_channels, self.spec.image_size, self.spec.image_size)
        self._base_order = self._bases_by_accuracy()

    # ------------------------------------------------------------------ what can be served
    def widths(self) -> list[float]:
        return self.method.widths()

    def table(self) -> list[dict[str, Any]]:
        """Every servable width with its cost and the accuracy measured at the end of training."""
        rows = []
        for key, entry in self.summary["widths"].items():
            rows.append(
                {
                    "width": float(key),
                    "bases": entry["bases"],
                    "params": entry["params"],
                    "macs": entry["macs"],
                    "accuracy": entry["accuracy"],
                    "robust_accuracy": entry["robust_accuracy"],
                }
            )
        return rows

    def robustness_range(self) -> tuple[float, float]:
        return (0.0, 1.0) if self.spec.dual_bn else (0.0, 0.0)

    # ------------------------------------------------------------------ building models
    def check(self, width: float, robustness: float) -> tuple[float, float]:
        try:
            width, robustness = float(width), float(robustness)
        except (TypeError, ValueError):
            raise QueryError("width and robustness must be numbers") from None
        allowed = self.widths()
        if not any(abs(width - w) < 1e-6 for w in allowed):
            raise QueryError(f"width {width:g} is not served by this run; allowed widths: {', '.join(f'{w:g}' for w in allowed)}")
        lo, hi = self.robustness_range()
        if not lo <= robustness <= hi:
            raise QueryError(f"robustness {robustness:g} is outside the allowed range [{lo:g}, {hi:g}]")
        return next(w for w in allowed if abs(width - w) < 1e-6), robustness

    def bases_for(self, width: float, select: str = "first") -> list[int]:
        if not self.method.selectable_bases:
            return []
        k = self.spec.bases_for_width(width)
        if select == "first":
            return list(range(k))
        if select == "best":
            return sorted(self._base_order[:k])
        raise QueryError(f"base selection '{select}' is unknown; allowed: first, best")

    def served(self, width: float, robustness: float = 0.0, select: str = "first") -> ServedModel:
        width, robustness = self.check(width, robustness)
        return self._served(width, robustness, select)

    # B019: the cache is intended (built mixtures are kept, nothing is rebuilt per request)
    @lru_cache(maxsize=64)  # noqa: B019
    def _served(self, width: float, robustness: float, select: str) -> ServedModel:
        bases, model = self._build(self.state, width, robustness, select)
        served = inference_model(model)
        if self.compile:
            served = compile_inference(served)
        return ServedModel(width, robustness, bases, served, model)

    def _build(self, state: dict[str, torch.Tensor], width: float, robustness: float, select: str) -> tuple[list[int], nn.Module]:
        bases = self.bases_for(width, select)
        if select != "first" and not self.method.mixes_on_demand:
            raise QueryError("base selection applies to Split-Mix runs (with tracked BN statistics) only")
        model = self.method.served_model(state, width, robustness, bases, self._calibration_inputs)
        for p in model.parameters():
            p.requires_grad_(False)
        return bases, model.eval()

    def module_from(self, state: dict[str, torch.Tensor], width: float, robustness: float = 0.0, select: str = "first") -> nn.Module:
        """The unfused model at ``width`` and λ built from another served ``state`` of this run (e.g.
        ``rewind.safetensors``, an early round) by the same path as the run's own model, with the
        same bases: its tensors line up one to one with ``served(...).module``'s."""
        width, robustness = self.check(width, robustness)
        return self._build(state, width, robustness, select)[1]

    def model(self, width: float, robustness: float = 0.0, select: str = "first") -> nn.Module:
        """The served ``nn.Module`` at ``width`` and λ = ``robustness`` (eval mode)."""
        return self.served(width, robustness, select).model

    def _calibration_inputs(self) -> torch.Tensor:
        """Training inputs for re-estimating BN statistics where the run holds none of its own
        (FedBN's norms stay on the clients); never test data."""
        from splitmix.config import RunConfig
        from splitmix.data import train_sample

        cfg = RunConfig.from_mapping(self.config["run_config"])
        return train_sample(cfg.data_config(), 2048, cfg.seed).x

    def _bases_by_accuracy(self) -> list[int]:
        """Bases ordered by their own accuracy (λ = 0) as recorded at the end of the run."""
        scores = self.summary.get("base_accuracy")
        if not self.method.selectable_bases or not scores:
            return list(range(self.spec.num_bases))
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))

    # ------------------------------------------------------------------ export
    def export(self, width: float, robustness: float, out: str | Path, select: str = "first") -> dict[str, Any]:
        """Write ``out/model.safetensors``, ``out/model_card.json`` and ``out/model.pt2``."""
        from safetensors.torch import save_file

        served = self.served(width, robustness, select)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in served.module.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        example = torch.zeros(2, *self.input_shape)
        program = torch.export.export(
            fuse_for_inference(served.module), (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},)
        )
        torch.export.save(program, str(out / "model.pt2"))
        entry = self.summary["widths"].get(str(round(served.width, 6)), {})
        card = {
            "run": str(self.folder.resolve()),
            "method": self.method_name,
            "width": served.width,
            "robustness": served.robustness,
            "bases": served.bases,
            "base_selection": select,
            "input_shape": list(self.input_shape),
            "num_classes": self.spec.num_classes,
            "params": count_params(served.module),
            "macs": count_macs(served.module, self.input_shape),
            "accuracy": entry.get("by_lambda", {}).get(str(served.robustness), {}).get("accuracy"),
            "robust_accuracy": entry.get("by_lambda", {}).get(str(served.robustness), {}).get("robust_accuracy"),
            "accuracy_note": "measured at the end of training at this width and λ, bases 0..k-1; null if that λ was not evaluated",
            "files": {
                "weights": "model.safetensors (the stacked bases as trained; load into the run's architecture)",
                "program": "model.pt2 (torch.export; batch norm folded, channels-last; input (B, C, H, W) in [0, 1])",
            },
        }
        (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        return card


def load_run(folder: str | Path, compile: bool = False) -> Run:
    """Open a finished run folder (see :class:`Run`); ``compile`` serves torch.compile'd models."""
    return Run(folder, compile=compile)

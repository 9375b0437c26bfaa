"""Inference throughput of a Split-Mix mixture (k bases as one batched network) against
(a) a naive Python loop over the same k bases and (b) one dense network of the same architecture
with about the same number of parameters. CPU, eval mode, no autograd.

    python bench/inference.py [--run RUN] [--width 1.0] [--seconds 2]

Without ``--run`` the bases are freshly initialised (throughput does not depend on the values).
The last line is ``mix_vs_dense_throughput: X`` = mixed / dense images per second at batch 256,
both compiled with ``torch.compile`` (what ``splitmix serve --compile`` serves); the eager ratio
(plain ``splitmix serve``) is printed on the line before.
"""

from __future__ import annotations

import argparse
import time

import torch

from models.cost import count_macs, count_params
from models.fuse import fuse_for_inference
from models.registry import create_model
from models.splitmix import SplitMixSpec, build_mixture, init_global_state


def throughput(model, batch: int, shape: tuple[int, ...], seconds: float) -> float:
    x = torch.rand(batch, *shape)
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            model(x)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            count += 1
        return count * batch / (time.perf_counter() - start)


class NaiveLoop(torch.nn.Module):
    """The same bases as separate modules, run one after another and averaged."""

    def __init__(self, bases: list[torch.nn.Module]) -> None:
        super().__init__()
        self.bases = torch.nn.ModuleList(bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.bases]).mean(0)


def dense_like(spec: SplitMixSpec, params: int) -> torch.nn.Module:
    """The dense network of the same family whose parameter count is closest to ``params``."""
    best = None
    for step in range(1, 201):
        width = step / 200
        model = create_model(
            spec.arch, width=width, num_classes=spec.num_classes, in_channels=spec.in_channels, image_size=spec.image_size, dual_bn=spec.dual_bn
        )
        gap = abs(count_params(model) - params)
        if best is None or gap < best[0]:
            best = (gap, width, model)
    return best[2].eval(), best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run folder (default: freshly initialised digits CNN bases)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()

    if args.run:
        from server.query import load_run

        run = load_run(args.run)
        spec, state = run.spec, run.state
    else:
        spec = SplitMixSpec()
        state = init_global_state(spec, seed=0)
    k = spec.bases_for_width(args.width)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    mixed_raw = build_mixture(spec, state, list(range(k)), 0.0)
    dense_raw, dense_width = dense_like(spec, count_params(mixed_raw))
    # What is served (models/fuse.py: BN folded, channels-last), and the same treatment for the
    # loop's bases and the dense network, so layout tricks do not favour one side.
    mixed = fuse_for_inference(mixed_raw)
    naive = NaiveLoop([fuse_for_inference(build_mixture(spec, state, [b], 0.0)) for b in range(k)]).eval()
    dense = fuse_for_inference(dense_raw)
    print(f"threads: {torch.get_num_threads()}; {spec.arch} on {shape}, width {args.width:g} = {k} bases")
    print(
        f"mixed: {count_params(mixed_raw):,} params, {count_macs(mixed_raw, shape):,} MACs; "
        f"dense (width {dense_width:g}): {count_params(dense_raw):,} params, {count_macs(dense_raw, shape):,} MACs"
    )
    results = {}
    for batch in (1, 256):
        for name, model in (
            ("mixed", mixed),
            ("naive loop", naive),
            ("dense", dense),
            ("mixed, unfolded", mixed_raw),
            ("dense, unfolded", dense_raw),
        ):
            results[(name, batch)] = throughput(model, batch, shape, args.seconds)
            print(f"batch {batch:>3}  {name:<16} {results[(name, batch)]:>12,.0f} images/s")
    print(
        f"mixed / naive loop at batch 1: {results[('mixed', 1)] / results[('naive loop', 1)]:.2f}, "
        f"at batch 256: {results[('mixed', 256)] / results[('naive loop', 256)]:.2f}"
    )
    print(
        f"mixed / dense at batch 1: {results[('mixed', 1)] / results[('dense', 1)]:.2f}; "
        f"unfolded mixed / unfolded dense at batch 256: {results[('mixed, unfolded', 256)] / results[('dense, unfolded', 256)]:.2f}"
    )
    eager = results[("mixed", 256)] / results[("dense", 256)]
    print(f"eager (what `splitmix serve` serves): mixed / dense at batch 256: {eager:.3f}")
    # What `splitmix serve --compile` serves: torch.compile fuses the element-wise ops (BN is
    # folded already, ReLU and pooling remain) — the dense network is compiled the same way.
    start = time.perf_counter()
    mixed_c, dense_c = torch.compile(mixed, dynamic=True), torch.compile(dense, dynamic=True)
    with torch.inference_mode():
        x = torch.rand(256, *shape)
        mixed_c(x), dense_c(x)
    print(f"torch.compile of both: {time.perf_counter() - start:.1f} s")
    for name, model in (("mixed, compiled", mixed_c), ("dense, compiled", dense_c)):
        results[(name, 256)] = throughput(model, 256, shape, args.seconds)
        print(f"batch 256  {name:<16} {results[(name, 256)]:>12,.0f} images/s")
    print(f"mix_vs_dense_throughput: {results[('mixed, compiled', 256)] / results[('dense, compiled', 256)]:.3f}")


if __name__ == "__main__":
    main()

"""Inference throughput of a Split-Mix mixture as served (``models/mixture_inference.py``) against
(a) a naive Python loop over the same k bases and (b) one dense network of the same architecture
with about the same number of parameters, served the same way. CPU, eval mode, no autograd.

    python bench/inference.py [--run RUN] [--width 1.0] [--seconds 2] [--reps 21] [--threads N [--cpu-time]]

Without ``--run`` the bases are freshly initialised (throughput does not depend on the values).
Models compared with each other are timed in interleaved repetitions (the machine may be shared)
and each throughput is the median over ``--reps`` repetitions. The last two lines are
``eager_mix_vs_dense_throughput: Y`` (what plain ``splitmix serve`` serves) and
``mix_vs_dense_throughput: X`` = mixed / dense images per second at batch 256, both compiled with
``torch.compile`` (what ``splitmix serve --compile`` serves).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from models.cost import count_macs, count_params
from models.fuse import fuse_for_inference
from models.mixture_inference import compile_inference, inference_model
from models.registry import create_model
from models.splitmix import SplitMixSpec, build_mixture, init_global_state


def interleaved(
    models: Mapping[str, Callable], batch: int, shape: tuple[int, ...], seconds: float, reps: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median images/s of each model over ``reps`` repetitions taken in turn (mixed, dense,
    mixed, …), so load from other processes hits every model alike. ``seconds``: per model;
    ``clock``: wall time, or this thread's CPU time (meaningful with one torch thread: the time
    the thread waited for a core shared with other processes is not counted)."""
    x = torch.rand(batch, *shape)
    with torch.inference_mode():
        calls = {}
        for name, model in models.items():
            for _ in range(3):  # warm-up
                model(x)
            start, n = clock(), 0
            while clock() - start < seconds / reps or n < 1:
                model(x)
                n += 1
            calls[name] = n  # calls per repetition: about seconds / reps of work
        rates: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(reps):
            for name, model in models.items():
                start = clock()
                for _ in range(calls[name]):
                    model(x)
                rates[name].append(calls[name] * batch / (clock() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


class NaiveLoop(torch.nn.Module):
    """The same bases as separate modules, run one after another and averaged."""

    def __init__(self, bases: list[torch.nn.Module]) -> None:
        super().__init__()
        self.bases = torch.nn.ModuleList(bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.bases]).mean(0)


def dense_like(spec: SplitMixSpec, params: int) -> tuple[torch.nn.Module, float]:
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
    assert best is not None
    return best[2].eval(), best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run folder (default: freshly initialised digits CNN bases)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per model and batch size")
    parser.add_argument("--reps", type=int, default=21, help="interleaved repetitions (the median is reported)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time by this thread's CPU time (needs --threads 1; for a shared machine)")
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        parser.error(f"--cpu-time needs --threads 1 (got --threads {args.threads}): other threads' work is not on this thread's clock")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter

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
    # What `splitmix serve` serves (models/mixture_inference.py), for the mixture, for the loop's
    # bases and for the dense network alike, so no rewrite favours one side; "folded" is the
    # generic BN-folded channels-last form (models/fuse.py), what is exported.
    mixed, dense = inference_model(mixed_raw), inference_model(dense_raw)
    naive = NaiveLoop([inference_model(build_mixture(spec, state, [b], 0.0)) for b in range(k)]).eval()
    print(f"threads: {torch.get_num_threads()}; {spec.arch} on {shape}, width {args.width:g} = {k} bases")
    print(
        f"mixed: {count_params(mixed_raw):,} params, {count_macs(mixed_raw, shape):,} MACs; "
        f"dense (width {dense_width:g}): {count_params(dense_raw):,} params, {count_macs(dense_raw, shape):,} MACs"
    )
    timed = {
        "mixed": mixed,
        "dense": dense,
        "naive loop": naive,
        "mixed, folded": fuse_for_inference(mixed_raw),
        "dense, folded": fuse_for_inference(dense_raw),
        "mixed, unfolded": mixed_raw,
        "dense, unfolded": dense_raw,
    }
    results = {}
    for batch in (1, 256):
        for name, rate in interleaved(timed, batch, shape, args.seconds, args.reps, clock).items():
            results[(name, batch)] = rate
            print(f"batch {batch:>3}  {name:<16} {rate:>12,.0f} images/s")
    print(
        f"mixed / naive loop at batch 1: {results[('mixed', 1)] / results[('naive loop', 1)]:.2f}, "
        f"at batch 256: {results[('mixed', 256)] / results[('naive loop', 256)]:.2f}"
    )
    print(
        f"mixed / dense at batch 1: {results[('mixed', 1)] / results[('dense', 1)]:.2f}; at batch 256: "
        f"folded {results[('mixed, folded', 256)] / results[('dense, folded', 256)]:.3f}, "
        f"unfolded {results[('mixed, unfolded', 256)] / results[('dense, unfolded', 256)]:.3f}"
    )
    eager = results[("mixed", 256)] / results[("dense", 256)]
    print(f"eager (what `splitmix serve` serves): mixed / dense at batch 256: {eager:.3f}")
    # What `splitmix serve --compile` serves: the same forms through torch.compile, which fuses
    # the remaining element-wise work (pooling) — the dense network is compiled the same way.
    start = time.perf_counter()
    mixed_c, dense_c = compile_inference(inference_model(mixed_raw)), compile_inference(inference_model(dense_raw))
    with torch.inference_mode():
        x = torch.rand(256, *shape)
        mixed_c(x), dense_c(x)
    print(f"torch.compile of both: {time.perf_counter() - start:.1f} s")
    compiled = interleaved({"mixed, compiled": mixed_c, "dense, compiled": dense_c}, 256, shape, args.seconds, args.reps, clock)
    for name, rate in compiled.items():
        print(f"batch 256  {name:<16} {rate:>12,.0f} images/s")
    print(f"eager_mix_vs_dense_throughput: {eager:.3f}")
    print(f"mix_vs_dense_throughput: {compiled['mixed, compiled'] / compiled['dense, compiled']:.3f}")


if __name__ == "__main__":
    main()

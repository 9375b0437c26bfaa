"""Real CPU inference speedup of refilled (channel-sparse) tickets once they are physically sliced.

    python bench/structured_speedup.py [--image-size 28] [--batch 128] [--threads 1] [--repeats 7]
                                       [--sparsities 0.5,0.7,0.9] [--fused]

A full-width DigitCNN (64-128-256 channels, 512 hidden, dual BN, eval at λ = 0) is refilled to each
channel sparsity (``one_shot_refill``: every layer keeps the channels with the largest |w| sum;
weights are random, timing does not depend on their values), masked, and sliced into a smaller
dense DigitCNN; the sliced model is checked against the masked one (allclose 1e-5). The masked
model runs at dense cost — masks alone buy nothing — so the reference is the dense model. Dense
and sliced models are timed interleaved, one forward each per repeat, and the median is reported.
The last line is ``structured_speedup: X`` = dense / sliced time at channel sparsity 0.7 (eager;
``--fused`` adds BN-folded channels-last timings as extra columns).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from models.cnn import DigitCNN
from models.cost import count_macs, count_params
from models.fuse import fuse_for_inference
from models.slice_channels import kept_channels, slice_channels
from techniques.pruning import apply_masks_, one_shot_refill, sparsity_report


def _time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--fused", action="store_true", help="also time BN-folded channels-last copies")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if 0.7 not in sparsities:
        sparsities.append(0.7)

    torch.manual_seed(0)
    dense = DigitCNN(width=1.0, in_channels=1, image_size=args.image_size, dual_bn=True).eval()
    shape = (1, args.image_size, args.image_size)
    x = torch.rand(args.batch, *shape)
    models: dict[str, torch.nn.Module] = {"dense": dense}
    rows: dict[str, dict] = {"dense": {"sparsity": 0.0, "weight_sparsity": 0.0, "channels": (64, 128, 256, 512)}}
    with torch.inference_mode():
        for s in sparsities:
            masks = one_shot_refill(dense, s)
            masked = apply_masks_(copy.deepcopy(dense), masks)
            sliced = slice_channels(masked, kept_channels(masked, masks)).eval()
            torch.testing.assert_close(sliced(x[:16]), masked(x[:16]), atol=1e-5, rtol=1e-5)
            key = f"{s:g}"
            models[key] = sliced
            rows[key] = {
                "sparsity": s,
                "weight_sparsity": sparsity_report(dense, masks)["weight_sparsity"],
                "channels": (sliced.conv1.out_channels, sliced.conv2.out_channels, sliced.conv3.out_channels, sliced.fc1.out_per_base),
            }
        if args.fused:
            for key in list(models):
                models[f"{key}/fused"] = fuse_for_inference(models[key])
        for model in models.values():  # warm-up
            model(x)
            model(x)
        times: dict[str, list[float]] = {key: [] for key in models}
        for _ in range(args.repeats):
            for key, model in models.items():
                times[key].append(_time_once(model, x))
    median = {key: statistics.median(t) for key, t in times.items()}

    print(
        f"DigitCNN full width, input {shape}, batch {args.batch}, {args.threads} thread(s), "
        f"median of {args.repeats} interleaved forwards (eval, inference_mode)"
    )
    header = f"{'channel sp.':>11} {'channels':>17} {'weight sp.':>10} {'params':>10} {'MACs':>12} {'ms/batch':>9} {'speedup':>8} {'MAC ratio':>9}"
    if args.fused:
        header += f" {'fused ms':>9} {'fused x':>8}"
    print(header)
    dense_macs = count_macs(dense, shape)
    for key, row in rows.items():
        model = models[key]
        macs = count_macs(model, shape)
        line = (
            f"{row['sparsity']:>11.2f} {'-'.join(map(str, row['channels'])):>17} {row['weight_sparsity']:>10.3f} "
            f"{count_params(model):>10,} {macs:>12,} {median[key] * 1e3:>9.1f} "
            f"{median['dense'] / median[key]:>8.2f} {dense_macs / macs:>9.2f}"
        )
        if args.fused:
            line += f" {median[key + '/fused'] * 1e3:>9.1f} {median['dense/fused'] / median[key + '/fused']:>8.2f}"
        print(line)
    print(f"structured_speedup: {median['dense'] / median['0.7']:.2f}")


if __name__ == "__main__":
    main()

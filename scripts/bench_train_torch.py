"""PyTorch CPU training-step benchmark for the U-Net++ reference (scripts/unetpp_torch.py).

This is the PyTorch side of the training benchmark in BENCHMARKS.md: it times full
training steps (zero_grad, forward, deep-supervision BCE+Dice loss, backward, AdamW
step) of the same U-Net++ that medmine trains in candle (src/models/unetpp), on random
data, so the two implementations can be compared on the same machine.

Output: one line per timed step, then ``peak_rss_mb <float>`` and, as the very last line,
``images_per_s <float>`` (= batch * steps / total seconds of the timed steps).

Example:
    /work/torch-venv/bin/python scripts/bench_train_torch.py --size 256 --batch 8 --steps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unetpp_torch import NestedUNet, count_parameters, loss  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time U-Net++ training steps in PyTorch (reference for BENCHMARKS.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--size", type=int, required=True,
                    help="image side N (input is [B,3,N,N]); must be divisible by 16")
    ap.add_argument("--batch", type=int, required=True, help="batch size B")
    ap.add_argument("--base", type=int, default=32, help="base number of filters b (nb = b..16b)")
    ap.add_argument("--steps", type=int, required=True, help="number of timed training steps K")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps before timing")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(T); default: leave torch's default")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights, input and target")
    ap.add_argument("--device", default="cpu",
                    help="cpu | cuda[:N] (as `medmine --device`); CUDA steps are synchronised")
    ap.add_argument("--infer", action="store_true",
                    help="time inference instead (eval mode, no grad, mean of the four heads), "
                         "as `medmine bench infer`")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile(model) (inductor, the default backend) first; the "
                         "warm-up steps absorb the compilation (use --warmup 2 or more)")
    args = ap.parse_args()
    if args.size % 16 != 0:
        ap.error("--size must be divisible by 16")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    model = NestedUNet(in_channels=3, num_classes=1, base=args.base).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand([args.batch, 3, args.size, args.size], generator=gen).to(device)
    target = (torch.rand([args.batch, 1, args.size, args.size], generator=gen) > 0.5).float()
    target = target.to(device)

    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {torch.get_num_threads()}, nproc {os.cpu_count()}, device {device}")
    print(f"size {args.size} batch {args.batch} base {args.base} "
          f"params {count_parameters(model)} warmup {args.warmup} steps {args.steps}")

    if args.infer:
        model.eval()
    if args.compile:
        model = torch.compile(model)
        print("torch.compile: inductor")

    def step() -> float:
        if args.infer:
            with torch.inference_mode():
                outs = model(x)
                return torch.stack(outs).mean(0).sum().item()
        opt.zero_grad(set_to_none=True)
        outs = model(x)
        l = loss(outs, target)
        l.backward()
        opt.step()
        return l.item()

    for i in range(args.warmup):
        t0 = time.perf_counter()
        l = step()
        print(f"warmup {i} {time.perf_counter() - t0:.4f} s loss {l:.5f}")

    total = 0.0
    for i in range(args.steps):
        t0 = time.perf_counter()
        l = step()  # .item() synchronises, so the step is fully done when timed
        dt = time.perf_counter() - t0
        total += dt
        print(f"step {i} {dt:.4f} s loss {l:.5f}")

    print(f"mean_step_s {total / args.steps:.4f}")
    print(f"peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    print(f"images_per_s {args.batch * args.steps / total:.4f}")


if __name__ == "__main__":
    main()

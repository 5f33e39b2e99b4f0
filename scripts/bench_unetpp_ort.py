"""ONNX Runtime inference benchmark for the U-Net++ reference (scripts/unetpp_torch.py).

The ONNX Runtime side of `medmine bench infer` and of ``scripts/bench_train_torch.py --infer``:
the same U-Net++ (seeded weights, eval mode: BatchNorm with its running statistics, which ONNX
Runtime folds into the convolutions) and the same output, the mean of the four deep-supervision
heads, exported with ``torch.onnx.export`` and timed under ONNX Runtime (CPU execution provider,
graph optimisation ORT_ENABLE_ALL, intra-op threads = the machine's cores, one inter-op thread).

The export runs in a child process (cached in --onnx-dir), so that the timing process never
imports torch and its peak memory is ONNX Runtime's alone.

Output: one line per timed step, then ``mean_step_s``, ``peak_rss_mb <float>`` and, as the very
last line, ``images_per_s <float>`` (= batch * steps / total seconds of the timed steps), as
bench_train_torch.py.

Example:
    /work/torch-venv/bin/python scripts/bench_unetpp_ort.py --size 256 --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time U-Net++ inference under ONNX Runtime (reference for BENCHMARKS.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--size", type=int, default=256,
                    help="image side N (input is [B,3,N,N]); must be divisible by 16")
    ap.add_argument("--batch", type=int, default=8, help="batch size B")
    ap.add_argument("--base", type=int, default=32, help="base number of filters b (nb = b..16b)")
    ap.add_argument("--steps", type=int, default=3, help="number of timed inference steps K")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps before timing")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="ONNX Runtime intra-op threads (default: the machine's cores)")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights and input")
    ap.add_argument("--onnx-dir", default="/tmp/medmine-unetpp-onnx",
                    help="where the exported model is kept")
    ap.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size % 16 != 0:
        ap.error("--size must be divisible by 16")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def onnx_path(args: argparse.Namespace) -> str:
    # the spatial size and batch are dynamic axes: one file per base and seed
    return os.path.join(args.onnx_dir, f"unetpp_base{args.base}_seed{args.seed}.onnx")


def export(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from unetpp_torch import NestedUNet  # noqa: E402

    class MeanOfHeads(torch.nn.Module):
        """What `medmine bench infer` and `bench_train_torch.py --infer` compute: the mean of
        the four heads' logits, [B, 1, H, W]."""

        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack(self.net(x)).mean(0)

    torch.manual_seed(args.seed)
    model = MeanOfHeads(NestedUNet(in_channels=3, num_classes=1, base=args.base)).eval()
    legacy = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    x = torch.rand([2, 3, 64, 64])
    t = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            model, (x,), onnx_path(args), export_params=True, opset_version=17,
            do_constant_folding=True, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                          "logits": {0: "batch", 2: "height", 3: "width"}},
            **legacy)
    print(f"exported {onnx_path(args)} in {time.perf_counter() - t:.1f} s", flush=True)


def main() -> None:
    args = parse_args()
    os.makedirs(args.onnx_dir, exist_ok=True)
    if args.export_only:
        export(args)
        return
    path = onnx_path(args)
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--export-only",
                        "--base", str(args.base), "--seed", str(args.seed),
                        "--onnx-dir", args.onnx_dir], check=True)

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(args.seed)
    x = rng.random((args.batch, 3, args.size, args.size), dtype=np.float32)

    print(f"onnxruntime {ort.__version__}, python {platform.python_version()}, CPU EP, "
          f"ORT_ENABLE_ALL, intra-op threads {args.threads}, nproc {os.cpu_count()}")
    print(f"size {args.size} batch {args.batch} base {args.base} "
          f"warmup {args.warmup} steps {args.steps}")

    def step() -> float:
        out = sess.run(None, {"image": x})[0]
        return float(out.sum())

    for i in range(args.warmup):
        t0 = time.perf_counter()
        s = step()
        print(f"warmup {i} {time.perf_counter() - t0:.4f} s sum {s:.5f}")

    total = 0.0
    for i in range(args.steps):
        t0 = time.perf_counter()
        s = step()
        dt = time.perf_counter() - t0
        total += dt
        print(f"step {i} {dt:.4f} s sum {s:.5f}")
        if not np.isfinite(s):
            sys.exit("error: the output holds NaN or infinite values")

    print(f"mean_step_s {total / args.steps:.4f}")
    print(f"peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    print(f"images_per_s {args.batch * args.steps / total:.4f}")


if __name__ == "__main__":
    main()

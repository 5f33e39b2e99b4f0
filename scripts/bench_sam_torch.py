#!/usr/bin/env python3
"""The official PyTorch side of `medmine bench sam` (src/models/sam/bench.rs): times
`SamPredictor.set_image` (preprocessing + image encoder on the 1024x1024 input) and
`SamPredictor.predict` per prompt (prompt encoder, mask decoder, upscaling of the masks to the
original size; multimask_output=True, alternating a box and a point, after one warm-up), with
the official code and random weights (or a checkpoint).

  vit_b/vit_l/vit_h: segment_anything's sam_model_registry[v](checkpoint=None)
  vit_t:             MobileSAM (`pip install --no-deps mobilesam-mirror timm`; both import
                     nothing else that the torch venv lacks)

Prints one line per run, then `encoder_s <median>` and `decoder_ms <median>` as the last lines
(`peak_rss_mib` before them). Medians, as the Rust bench: the machine may be shared.

  /work/torch-venv/bin/python scripts/bench_sam_torch.py --variant vit_b --runs 3
"""
import argparse
import resource
import statistics
import time

import numpy as np
import torch


def build(variant, checkpoint):
    if variant == "vit_t":
        from mobile_sam import sam_model_registry
    else:
        from segment_anything import sam_model_registry
    return sam_model_registry[variant](checkpoint=checkpoint)


def synthetic_image(h, w):
    """The same image as bench.rs's synthetic_image (u8 truncation included)."""
    y, x = np.mgrid[0:h, 0:w]
    r = (255 * x // w).astype(np.uint8)
    g = (255 * y // h).astype(np.uint8)
    b = (((x // 32 + y // 32) % 2) * 200).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_t"])
    ap.add_argument("--sam", default=None, help="checkpoint (default: random weights)")
    ap.add_argument("--image", default=None, help="image file (default: synthetic 1024x1024)")
    ap.add_argument("--runs", type=int, default=3, help="timed encoder runs")
    ap.add_argument("--decoder-runs", type=int, default=20, help="timed decoder runs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] (as `medmine --device`)")
    args = ap.parse_args()
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    sam = build(args.variant, args.sam).eval().to(device)
    what = "checkpoint" if args.sam else f"random weights, seed {args.seed}"
    print(f"sam {args.variant} ({what}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}: built in {time.perf_counter() - t:.2f} s", flush=True)
    if args.variant == "vit_t":
        from mobile_sam import SamPredictor
    else:
        from segment_anything import SamPredictor
    predictor = SamPredictor(sam)

    if args.image:
        from PIL import Image
        image = np.array(Image.open(args.image).convert("RGB"))
    else:
        image = synthetic_image(1024, 1024)
    h, w = image.shape[:2]

    enc = []
    with torch.inference_mode():
        for i in range(max(1, args.runs)):
            t = time.perf_counter()
            predictor.set_image(image)
            sync()
            s = time.perf_counter() - t
            print(f"encoder run {i + 1}: {s:.3f} s", flush=True)
            enc.append(s)

        box = dict(box=np.array([0.25 * w, 0.25 * h, 0.7 * w, 0.75 * h], dtype=np.float32))
        point = dict(point_coords=np.array([[0.5 * w, 0.5 * h]], dtype=np.float32),
                     point_labels=np.array([1]))
        prompts = [box, point]
        predictor.predict(**box, multimask_output=True)  # warm-up
        sync()
        dec = []
        for i in range(max(1, args.decoder_runs)):
            t = time.perf_counter()
            predictor.predict(**prompts[i % 2], multimask_output=True)
            sync()
            ms = 1e3 * (time.perf_counter() - t)
            print(f"decoder run {i + 1}: {ms:.2f} ms", flush=True)
            dec.append(ms)

    print(f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    print(f"encoder_s {statistics.median(enc):.4f}")
    print(f"decoder_ms {statistics.median(dec):.3f}")


if __name__ == "__main__":
    main()

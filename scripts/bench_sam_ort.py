#!/usr/bin/env python3
"""The ONNX Runtime side of `medmine bench sam` (src/models/sam/bench.rs): the official SAM
(segment_anything vit_b/vit_l/vit_h; MobileSAM vit_t from mobile_sam) with seeded random
weights (or a checkpoint) exported to ONNX, as the desktop tools that run SAM do
(X-AnyLabeling, the SAM web demo), and timed under ONNX Runtime on the same image and prompts.

Export (once per variant, seed and checkpoint; cached in --onnx-dir, in a child process so that
the timing process never imports torch and its peak memory is ONNX Runtime's alone):
  decoder: the official path, segment_anything.utils.onnx.SamOnnxModel exported as
           scripts/export_onnx_model.py does (opset 17, dynamic number of points,
           constant folding); the masks are upscaled to the original image size INSIDE the graph
           (`orig_im_size`). By default (`--masks multi`) the graph returns the 3 multimask
           outputs (mask tokens 1..3, as the official predictor's multimask_output=True and as
           `medmine bench sam`), upscaled: SamOnnxModel with its `select_masks` replaced by that
           slice. `--masks single`: SamOnnxModel(return_single_mask=True) unchanged, the one
           best mask upscaled (what X-AnyLabeling and the web demo run; less work per click).
           The legacy (TorchScript) exporter is used, as the official script; it records
           SamOnnxModel's crop to the padded size (`int(prepadded_size[0])`) as a constant of
           the dummy `orig_im_size`, so the decoder is traced with the bench image's size (one
           file per size; with the official dummy 1500x2250 other sizes get wrong masks).
  encoder: `torch.onnx.export` of `sam.image_encoder` on the [1, 3, 1024, 1024] input.
  The seeded weights are saved beside them as `torch.save(state_dict)` (`*.pth`), for
  `medmine bench sam --sam <that file>`: both sides then run identical weights.

Timing, as the Rust bench (which times `SamPredictor::set_image` and `predict`):
  encoder_s per run: preprocessing (resize of the longest side to 1024 with PIL bilinear, as the
           official ResizeLongestSide; normalisation; zero padding to 1024x1024) + the encoder
           session; no warm-up run (as the Rust and PyTorch benches).
  decoder_ms per click: the prompt's coordinates mapped to the 1024 frame, the decoder session
           (prompt encoding, mask decoder, upscaling of the masks to the original size) and
           the thresholding of the masks (`> 0`, as predict returns boolean masks); one
           warm-up click, then `--decoder-runs` clicks with the prompts of `--prompts`, the same
           as bench.rs: `alternate` a box [0.25w, 0.25h, 0.7w, 0.75h] and a point (0.5w, 0.5h),
           label 1; `box` that box; `box-points` the box with a positive point (0.5w, 0.5h) and
           a negative one (0.3w, 0.3h).
ONNX Runtime: CPU execution provider, graph optimisation ORT_ENABLE_ALL, intra-op threads = the
machine's cores (os.cpu_count(); `--threads` to change), one inter-op thread, sequential;
idle intra-op threads spin, ONNX Runtime's default (`--no-spin`: they block; on a machine
shared with other work, spinning threads compete with it).

Prints one line per run, then `peak_rss_mib`, `encoder_s <median>` and `decoder_ms <median>` as
the last lines, as scripts/bench_sam_torch.py.

  /work/torch-venv/bin/python scripts/bench_sam_ort.py --variant vit_t --runs 3
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
IMG_SIZE = 1024


def synthetic_image(h, w):
    """The same image as bench.rs's synthetic_image (u8 truncation included)."""
    y, x = np.mgrid[0:h, 0:w]
    r = (255 * x // w).astype(np.uint8)
    g = (255 * y // h).astype(np.uint8)
    b = (((x // 32 + y // 32) % 2) * 200).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)


def preprocess_shape(h, w, long_side=IMG_SIZE):
    """ResizeLongestSide.get_preprocess_shape."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def preprocess(image):
    """ResizeLongestSide.apply_image (PIL bilinear) + Sam.preprocess (normalise, pad), as the
    official SamPredictor.set_image; [1, 3, 1024, 1024] float32."""
    from PIL import Image
    h, w = image.shape[:2]
    nh, nw = preprocess_shape(h, w)
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    x = (image.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
    out = np.zeros((1, 3, IMG_SIZE, IMG_SIZE), dtype=np.float32)
    out[0, :, :nh, :nw] = x.transpose(2, 0, 1)
    return out


def apply_coords(coords, h, w):
    """ResizeLongestSide.apply_coords: image pixels to the 1024 frame."""
    nh, nw = preprocess_shape(h, w)
    c = coords.astype(np.float32).copy()
    c[..., 0] *= nw / w
    c[..., 1] *= nh / h
    return c


def onnx_paths(args, h, w):
    tag = os.path.splitext(os.path.basename(args.sam))[0] if args.sam else f"seed{args.seed}"
    base = os.path.join(args.onnx_dir, f"sam_{args.variant}_{tag}")
    return {
        "encoder": base + "_encoder.onnx",
        # the traced graph crops the upscaled masks to the padded size of the dummy
        # orig_im_size (SamOnnxModel's `int(prepadded_size[0])` is a constant to the tracer):
        # one decoder per image size, traced with that size
        "decoder": f"{base}_decoder_{args.masks}_{h}x{w}.onnx",
        "pth": base + ".pth",
    }


def export(args, h, w):
    """Builds the official model (seeded random weights or the checkpoint) and writes the ONNX
    files and the weights; runs in a child process (imports torch)."""
    import torch

    if args.variant == "vit_t":
        from mobile_sam import sam_model_registry
    else:
        from segment_anything import sam_model_registry
    from segment_anything.utils.onnx import SamOnnxModel

    class SamOnnxMultimask(SamOnnxModel):
        """SamOnnxModel returning the 3 multimask outputs (tokens 1..3), as the official
        predictor's multimask_output=True: its single-mask selection replaced by that slice."""

        def select_masks(self, masks, iou_preds, num_points):
            return masks[:, 1:, :, :], iou_preds[:, 1:]

    torch.manual_seed(args.seed)
    sam = sam_model_registry[args.variant](checkpoint=args.sam).eval()
    paths = onnx_paths(args, h, w)
    if not args.sam:
        torch.save(sam.state_dict(), paths["pth"])
    legacy = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}

    if not os.path.exists(paths["decoder"]):
        cls = SamOnnxMultimask if args.masks == "multi" else SamOnnxModel
        model = cls(sam, return_single_mask=True)
        embed_dim = sam.prompt_encoder.embed_dim
        embed_size = sam.prompt_encoder.image_embedding_size
        mask_input_size = [4 * x for x in embed_size]
        dummy = {
            "image_embeddings": torch.randn(1, embed_dim, *embed_size, dtype=torch.float),
            "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
            "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
            "mask_input": torch.randn(1, 1, *mask_input_size, dtype=torch.float),
            "has_mask_input": torch.tensor([1], dtype=torch.float),
            "orig_im_size": torch.tensor([h, w], dtype=torch.float),
        }
        t = time.perf_counter()
        with torch.no_grad():
            torch.onnx.export(
                model, tuple(dummy.values()), paths["decoder"], export_params=True,
                verbose=False, opset_version=17, do_constant_folding=True,
                input_names=list(dummy.keys()),
                output_names=["masks", "iou_predictions", "low_res_masks"],
                dynamic_axes={"point_coords": {1: "num_points"},
                              "point_labels": {1: "num_points"}},
                **legacy)
        print(f"exported {paths['decoder']} in {time.perf_counter() - t:.1f} s", flush=True)

    if not os.path.exists(paths["encoder"]):
        t = time.perf_counter()
        x = torch.randn(1, 3, IMG_SIZE, IMG_SIZE)
        with torch.no_grad():
            torch.onnx.export(
                sam.image_encoder, (x,), paths["encoder"], export_params=True,
                opset_version=17, do_constant_folding=True,
                input_names=["image"], output_names=["image_embeddings"], **legacy)
        print(f"exported {paths['encoder']} in {time.perf_counter() - t:.1f} s", flush=True)


def session(path, threads, spin=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def check_finite(what, a):
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
    if bad:
        sys.exit(f"error: the {what} holds {bad} NaN or infinite values of {np.size(a)}: "
                 "the weights or the export are broken, and a time measured on them means nothing")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_t"])
    ap.add_argument("--sam", "--checkpoint", dest="sam", default=None,
                    help="official checkpoint (default: seeded random weights)")
    ap.add_argument("--image", default=None, help="image file (default: synthetic 1024x1024)")
    ap.add_argument("--runs", type=int, default=3, help="timed encoder runs")
    ap.add_argument("--decoder-runs", "--clicks", type=int, default=20, help="timed decoder runs")
    ap.add_argument("--prompts", default="alternate", choices=["alternate", "box", "box-points"],
                    help="the clicks' prompts, as `medmine bench sam --prompts`")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="ONNX Runtime intra-op threads (default: the machine's cores)")
    ap.add_argument("--no-spin", action="store_true",
                    help="intra-op threads block instead of spinning when idle "
                         "(session.intra_op.allow_spinning=0; default: ONNX Runtime's, spinning)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--masks", default="multi", choices=["multi", "single"],
                    help="multi: the 3 multimask outputs upscaled (as medmine bench sam); "
                         "single: the official return_single_mask=True graph")
    ap.add_argument("--onnx-dir", default="/tmp/medmine-sam-onnx",
                    help="where the exported models (and seeded weights) are kept")
    ap.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.onnx_dir, exist_ok=True)

    if args.image:
        from PIL import Image
        image = np.array(Image.open(args.image).convert("RGB"))
    else:
        image = synthetic_image(1024, 1024)
    h, w = image.shape[:2]
    paths = onnx_paths(args, h, w)

    if args.export_only:
        export(args, h, w)
        return
    if not all(os.path.exists(paths[k]) for k in ("encoder", "decoder")):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--export-only",
                        "--variant", args.variant, "--seed", str(args.seed), "--masks",
                        args.masks, "--onnx-dir", args.onnx_dir]
                       + (["--sam", args.sam] if args.sam else [])
                       + (["--image", args.image] if args.image else []), check=True)

    import onnxruntime as ort

    t = time.perf_counter()
    enc_sess = session(paths["encoder"], args.threads, not args.no_spin)
    dec_sess = session(paths["decoder"], args.threads, not args.no_spin)
    what = "checkpoint" if args.sam else f"random weights, seed {args.seed}"
    print(f"sam {args.variant} ({what}), onnxruntime {ort.__version__}, CPU EP, ORT_ENABLE_ALL, "
          f"{args.threads} intra-op threads{' (no spinning)' if args.no_spin else ''}, {args.masks} masks: sessions in "
          f"{time.perf_counter() - t:.2f} s ({paths['encoder']})", flush=True)

    enc = []
    emb = None
    for i in range(max(1, args.runs)):
        t = time.perf_counter()
        emb = enc_sess.run(None, {"image": preprocess(image)})[0]
        s = time.perf_counter() - t
        print(f"encoder run {i + 1}: {s:.3f} s", flush=True)
        enc.append(s)
        check_finite("image embedding", emb)

    box = (np.array([[0.25 * w, 0.25 * h], [0.7 * w, 0.75 * h]], dtype=np.float32),
           np.array([2, 3], dtype=np.float32))
    # no box: the official prompt encoder pads with one "not a point" (label -1)
    point = (np.array([[0.5 * w, 0.5 * h], [0.0, 0.0]], dtype=np.float32),
             np.array([1, -1], dtype=np.float32))
    # box + a positive and a negative point (points first, then the box corners, as the
    # official predictor concatenates them; no padding point with a box)
    box_points = (np.array([[0.5 * w, 0.5 * h], [0.3 * w, 0.3 * h],
                            [0.25 * w, 0.25 * h], [0.7 * w, 0.75 * h]], dtype=np.float32),
                  np.array([1, 0, 2, 3], dtype=np.float32))
    prompts = {"alternate": [box, point], "box": [box], "box-points": [box_points]}[args.prompts]
    fixed = {
        "image_embeddings": emb,
        "mask_input": np.zeros((1, 1, 256, 256), dtype=np.float32),
        "has_mask_input": np.zeros(1, dtype=np.float32),
        "orig_im_size": np.array([h, w], dtype=np.float32),
    }

    def click(prompt):
        coords, labels = prompt
        feeds = dict(fixed, point_coords=apply_coords(coords, h, w)[None],
                     point_labels=labels[None])
        masks, iou, _low = dec_sess.run(None, feeds)
        return masks > 0.0, masks

    _, logits = click(box)  # warm-up
    check_finite("mask logits (upscaled)", logits)
    dec = []
    for i in range(max(1, args.decoder_runs)):
        t = time.perf_counter()
        binary, logits = click(prompts[i % len(prompts)])
        ms = 1e3 * (time.perf_counter() - t)
        print(f"decoder run {i + 1}: {ms:.2f} ms ({binary.shape[1]} masks of {h}x{w})",
              flush=True)
        dec.append(ms)
        check_finite("mask logits (upscaled)", logits)

    print(f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    print(f"encoder_s {statistics.median(enc):.4f}")
    print(f"decoder_ms {statistics.median(dec):.3f}")


if __name__ == "__main__":
    main()

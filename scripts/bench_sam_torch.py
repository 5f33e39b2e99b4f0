#!/usr/bin/env python3
"""The official PyTorch side of `medmine bench sam` (src/models/sam/bench.rs): times
`SamPredictor.set_image` (preprocessing + image encoder on the 1024x1024 input) and
`SamPredictor.predict` per prompt (prompt encoder, mask decoder, upscaling of the masks to the
original size; multimask_output=True, alternating a box and a point, after one warm-up), with
the official code and random weights (or a checkpoint).

  vit_b/vit_l/vit_h: segment_anything's sam_model_registry[v](checkpoint=None)
  vit_t:             MobileSAM (`pip install --no-deps mobilesam-mirror timm`; both import
                     nothing else that the torch venv lacks)
  medsam:            MedSAM_Inference.py's pipeline (bowang-lab/MedSAM): vit_b, skimage
                     resize to 1024x1024 + min-max, image_encoder; decoder on a box
                     (multimask_output=False), sigmoid, bilinear to (H, W), > 0.5
  litemedsam:        CVPR24_LiteMedSAM_infer.py's pipeline: the LiteMedSAM branch's
                     tiny_vit_sam.TinyViT (--lite-medsam-src: the folder holding that file),
                     cv2 INTER_AREA to 256 + min-max + pad; decoder on a box, crop, bilinear,
                     sigmoid > 0.5. The medical variants alternate two boxes (box prompts only).

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


class Medical:
    """MedSAM's / LiteMedSAM's official inference steps behind set_image / predict."""

    def __init__(self, variant, checkpoint, lite_src, device):
        self.variant, self.device = variant, device
        if variant == "medsam":
            from segment_anything import sam_model_registry
            self.model = sam_model_registry["vit_b"](checkpoint=checkpoint)
        else:
            import sys
            sys.path.insert(0, lite_src)
            from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
            from tiny_vit_sam import TinyViT
            model = torch.nn.Module()
            model.image_encoder = TinyViT(
                img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4., drop_rate=0.,
                drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                local_conv_size=3, layer_lr_decay=0.8)
            model.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                                 input_image_size=(256, 256), mask_in_chans=16)
            model.mask_decoder = MaskDecoder(
                num_multimask_outputs=3, transformer=TwoWayTransformer(
                    depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
            if checkpoint:
                model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
            self.model = model
        self.model = self.model.eval().to(device)

    def set_image(self, img):
        import numpy as np
        self.H, self.W = img.shape[:2]
        if self.variant == "medsam":
            from skimage import transform
            x = transform.resize(img, (1024, 1024), order=3, preserve_range=True,
                                 anti_aliasing=True).astype(np.uint8)
            x = (x - x.min()) / np.clip(x.max() - x.min(), a_min=1e-8, a_max=None)
        else:
            import cv2
            scale = 256 / max(self.H, self.W)
            nw, nh = int(self.W * scale + 0.5), int(self.H * scale + 0.5)
            x = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            x = (x - x.min()) / np.clip(x.max() - x.min(), a_min=1e-8, a_max=None)
            x = np.pad(x, ((0, 256 - nh), (0, 256 - nw), (0, 0)))
            self.new_size = (nh, nw)
        x = torch.tensor(x).float().permute(2, 0, 1).unsqueeze(0).to(self.device)
        self.features = self.model.image_encoder(x)

    def predict(self, box):
        import numpy as np
        import torch.nn.functional as F
        H, W = self.H, self.W
        if self.variant == "medsam":
            b = np.array([box]) / np.array([W, H, W, H]) * 1024
        else:
            b = np.array([[int(v * 256 / max(H, W)) for v in box]])
        b = torch.as_tensor(b, dtype=torch.float, device=self.device)[:, None, :]
        pe = self.model.prompt_encoder
        sparse, dense = pe(points=None, boxes=b, masks=None)
        low, _ = self.model.mask_decoder(
            image_embeddings=self.features, image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False)
        if self.variant == "medsam":
            p = F.interpolate(torch.sigmoid(low), size=(H, W), mode="bilinear",
                              align_corners=False)
        else:
            nh, nw = self.new_size
            p = torch.sigmoid(F.interpolate(low[..., :nh, :nw], size=(H, W), mode="bilinear",
                                            align_corners=False))
        return (p.squeeze().cpu().numpy() > 0.5).astype(np.uint8)


def synthetic_image(h, w):
    """The same image as bench.rs's synthetic_image (u8 truncation included)."""
    y, x = np.mgrid[0:h, 0:w]
    r = (255 * x // w).astype(np.uint8)
    g = (255 * y // h).astype(np.uint8)
    b = (((x // 32 + y // 32) % 2) * 200).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="vit_b",
                    choices=["vit_b", "vit_l", "vit_h", "vit_t", "medsam", "litemedsam"])
    ap.add_argument("--lite-medsam-src", default=None,
                    help="folder with the LiteMedSAM branch's tiny_vit_sam.py (litemedsam)")
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
    medical = args.variant in ("medsam", "litemedsam")
    if medical:
        predictor = Medical(args.variant, args.sam, args.lite_medsam_src, device)
    else:
        sam = build(args.variant, args.sam).eval().to(device)
    what = "checkpoint" if args.sam else f"random weights, seed {args.seed}"
    print(f"sam {args.variant} ({what}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}: built in {time.perf_counter() - t:.2f} s", flush=True)
    if args.variant == "vit_t":
        from mobile_sam import SamPredictor
    else:
        from segment_anything import SamPredictor
    if not medical:
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

        box = np.array([0.25 * w, 0.25 * h, 0.7 * w, 0.75 * h], dtype=np.float32)
        if medical:  # two boxes, one mask each (bench.rs's second box)
            box2 = np.array([0.4 * w, 0.3 * h, 0.6 * w, 0.6 * h], dtype=np.float32)
            calls = [lambda: predictor.predict(box), lambda: predictor.predict(box2)]
        else:
            point = dict(point_coords=np.array([[0.5 * w, 0.5 * h]], dtype=np.float32),
                         point_labels=np.array([1]))
            calls = [lambda: predictor.predict(box=box, multimask_output=True),
                     lambda: predictor.predict(**point, multimask_output=True)]
        calls[0]()  # warm-up
        sync()
        dec = []
        for i in range(max(1, args.decoder_runs)):
            t = time.perf_counter()
            calls[i % 2]()
            sync()
            ms = 1e3 * (time.perf_counter() - t)
            print(f"decoder run {i + 1}: {ms:.2f} ms", flush=True)
            dec.append(ms)

    print(f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    print(f"encoder_s {statistics.median(enc):.4f}")
    print(f"decoder_ms {statistics.median(dec):.3f}")


if __name__ == "__main__":
    main()

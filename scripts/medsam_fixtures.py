#!/usr/bin/env python3
"""Parity fixtures for medmine's MedSAM and LiteMedSAM (tests/it/medsam_parity.rs), made the
way the official inference scripts of github.com/bowang-lab/MedSAM do it.

MedSAM (`MedSAM_Inference.py`, branch main) is `segment_anything`'s vit_b Sam called piece by
piece: skimage `resize(img, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True)
.astype(np.uint8)`, min-max to [0, 1], `image_encoder` directly (no mean/std, no padding), the
box scaled by `1024 / [W, H, W, H]`, the decoder with `multimask_output=False`, then
`sigmoid`, `F.interpolate(bilinear, align_corners=False)` to (H, W) and `> 0.5`. The model is
the small seeded ViT SAM of scripts/sam_fixtures.py (`build`, `noise_`: its configuration).

LiteMedSAM (`CVPR24_LiteMedSAM_infer.py`, branch LiteMedSAM): its own `tiny_vit_sam.TinyViT`
(1x1 patch embedding, `img_size=256`), `segment_anything`'s PromptEncoder with
`input_image_size=(256, 256)` and MaskDecoder; `cv2.resize(INTER_AREA)` of the longest side to
256, min-max, zero padding to 256, each box coordinate `int(x * 256 / max(H, W))`, low-res
logits cropped to the resized image, bilinear to (H, W), `sigmoid > 0.5`. Small sizes as in
scripts/sam_fixtures_vit_t.py (the TinyViT's `view(B, 64, 64, C)` holds, the neck has
`prompt_embed_dim` channels where the class hard-codes 256). The official TinyViT class is
imported from a checkout of that branch, never copied:

    git clone https://github.com/bowang-lab/MedSAM && git -C MedSAM show \\
        LiteMedSAM:tiny_vit_sam.py > /tmp/litemedsam/tiny_vit_sam.py
    pip install scikit-image opencv-python-headless   (plus scripts/requirements-torch.txt)
    /work/torch-venv/bin/python scripts/medsam_fixtures.py --lite-medsam-src /tmp/litemedsam

The pre- and postprocessing steps below follow the scripts' lines one for one; the scripts
themselves cannot be imported (they parse arguments and run at import).

Images: a portrait one smaller than both input sizes (the Kvasir fixture image of
tests/fixtures/sam, turned a quarter) and a landscape one larger than both (that image scaled
up 8x with nearest neighbours and cropped to 1210x1050: sharp steps, so that the anti-aliasing
filters matter). MedSAM's weights are the SAM fixture's (tests/fixtures/sam/sam_tiny.pth: the
same `build`, `noise_` and seed; checked below), so no second copy is stored. Writes
tests/fixtures/medsam/ and tests/fixtures/litemedsam/.
"""
import argparse
import hashlib
import json
import os
import sys
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import transform

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
warnings.filterwarnings("ignore", category=UserWarning)
from sam_fixtures import CFG, build, noise_  # noqa: E402
from segment_anything.modeling import (MaskDecoder, PromptEncoder,  # noqa: E402
                                       TwoWayTransformer)

FIX = os.path.join(HERE, "..", "tests", "fixtures")
SAM_IMAGE = os.path.join(FIX, "sam", "image.png")

# Boxes in original-image pixels (integers, as MedSAM_Inference.py parses them).
IMAGES = {
    "portrait": dict(box=[20, 30, 100, 120]),
    "landscape": dict(box=[200, 180, 900, 820]),  # 1210x1050
}
LITE_ENCODER = dict(embed_dims=[16, 32, 48, 320], depths=[2, 2, 2, 0], num_heads=[1, 2, 3, 1],
                    window_sizes=[7, 7, 14, 7])


def make_images(out):
    base = np.array(Image.open(SAM_IMAGE).convert("RGB"))  # [136, 160, 3]
    portrait = np.ascontiguousarray(np.rot90(base))  # [160, 136, 3]
    # 8x nearest neighbours: sharp 8-pixel steps, which the anti-aliasing filters smooth
    landscape = np.ascontiguousarray(base.repeat(8, axis=0).repeat(8, axis=1)[:1050, :1210])
    imgs = {"portrait": portrait, "landscape": landscape}
    for name, img in imgs.items():
        Image.fromarray(img).save(os.path.join(out, f"{name}.png"), optimize=True)
        imgs[name] = np.array(Image.open(os.path.join(out, f"{name}.png")).convert("RGB"))
    return imgs


def saver(out):
    def save_npy(name, arr):
        np.save(os.path.join(out, name), np.ascontiguousarray(arr))

    def save_png(name, arr):
        Image.fromarray(arr).save(os.path.join(out, name), optimize=True)
    return save_npy, save_png


def save_weights(model, out, stem):
    pth = os.path.join(out, stem + ".pth")
    torch.save(model.state_dict(), pth)
    return torch.load(pth)


def save_resized(save_npy, name, resized):
    """The resized uint8 image: sha256 (in the manifest), every row's sum and [::8, ::8] (to
    locate a difference without storing megabytes)."""
    save_npy(f"{name}_resized_rowsum.npy", resized.astype(np.int64).sum(axis=(1, 2)))
    save_npy(f"{name}_resized_sub8.npy", resized[::8, ::8])
    return hashlib.sha256(np.ascontiguousarray(resized).tobytes()).hexdigest()


def decode(model, emb, box_t):
    """The scripts' `medsam_inference` up to the low-res logits (identical in both)."""
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=box_t, masks=None)
        low, iou = model.mask_decoder(
            image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False)
    return low, iou


def medsam(args):
    out = os.path.join(FIX, "medsam")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.remove(os.path.join(out, f))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build(CFG)
    noise_(model, gen)
    sam_state = torch.load(os.path.join(FIX, "sam", "sam_tiny.pth"))
    assert all(torch.equal(v, sam_state[k]) for k, v in model.state_dict().items())
    model.eval()
    save_npy, save_png = saver(out)
    info = {}
    for name, img_3c in make_images(out).items():
        H, W, _ = img_3c.shape
        # %% image preprocessing (MedSAM_Inference.py)
        img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True,
                                    anti_aliasing=True).astype(np.uint8)
        resized = img_1024
        img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(),
                                                         a_min=1e-8, a_max=None)
        x = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)
        box_np = np.array([IMAGES[name]["box"]])
        box_1024 = box_np / np.array([W, H, W, H]) * 1024
        with torch.no_grad():
            emb = model.image_encoder(x)
        box_t = torch.as_tensor(box_1024, dtype=torch.float)[:, None, :]
        low, iou = decode(model, emb, box_t)
        prob = F.interpolate(torch.sigmoid(low), size=(H, W), mode="bilinear",
                             align_corners=False).squeeze().numpy()
        seg = (prob > 0.5).astype(np.uint8)
        sha = save_resized(save_npy, name, resized)
        save_npy(f"{name}_input_sub16.npy", x[0, :, ::16, ::16].numpy())
        save_npy(f"{name}_embedding_sub4.npy", emb[:, :, ::4, ::4].numpy())
        save_npy(f"{name}_low_sub4.npy", low[0, :, ::4, ::4].numpy())
        save_npy(f"{name}_prob_sub8.npy", prob[::8, ::8].astype(np.float32))
        save_png(f"{name}_mask.png", seg * 255)
        frac = float(seg.mean())
        assert 0.03 < frac < 0.97, f"{name}: degenerate mask ({frac:.3f})"
        assert low.std() > 0.3, f"{name}: logits too flat"
        info[name] = dict(
            height=H, width=W, box=IMAGES[name]["box"], box_1024=box_1024[0].tolist(),
            resized_sha256=sha,
            embedding_std=float(emb.std()), low_std=float(low.std()), mask_fraction=frac,
            iou_prediction=float(iou.item()))
    manifest = dict(
        generator="scripts/medsam_fixtures.py", seed=args.seed, config=CFG,
        official="bowang-lab/MedSAM MedSAM_Inference.py (branch main)",
        versions=versions(), images=info,
        files=dict(
            weights="../sam/sam_tiny.pth (the same tensors)",
            images="<image>.png: the input image",
            resized="<image>_resized_rowsum.npy, <image>_resized_sub8.npy, resized_sha256: skimage "
                    "resize(1024x1024, order=3, anti_aliasing).astype(uint8)",
            input="<image>_input_sub16.npy [3,64,64]: the min-max input [:, ::16, ::16]",
            embedding="<image>_embedding_sub4.npy [1,C,16,16]: image_encoder(x)[..., ::4, ::4]",
            low="<image>_low_sub4.npy [1,64,64]: low-res logits [:, ::4, ::4]",
            prob="<image>_prob_sub8.npy: sigmoid + bilinear to (H, W), [::8, ::8]",
            mask="<image>_mask.png: prob > 0.5 (0/255)"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print("medsam", {k: (v["mask_fraction"], v["low_std"]) for k, v in info.items()})


# ---- LiteMedSAM ------------------------------------------------------------------------------

def lite_resize_longest_side(image, target_length=256):
    """CVPR24_LiteMedSAM_infer.py's resize_longest_side (cv2 INTER_AREA)."""
    oldh, oldw = image.shape[0], image.shape[1]
    scale = target_length * 1.0 / max(oldh, oldw)
    neww, newh = int(oldw * scale + 0.5), int(oldh * scale + 0.5)
    return cv2.resize(image, (neww, newh), interpolation=cv2.INTER_AREA)


def lite_build(src_dir):
    sys.path.insert(0, src_dir)
    from tiny_vit_sam import TinyViT  # the LiteMedSAM branch's file  # noqa: E402
    from tiny_vit_sam import LayerNorm2d  # noqa: E402
    c = CFG["prompt_embed_dim"]
    encoder = TinyViT(img_size=256, in_chans=3, mlp_ratio=4., drop_rate=0., drop_path_rate=0.0,
                      use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8, **LITE_ENCODER)
    encoder.neck = torch.nn.Sequential(
        torch.nn.Conv2d(LITE_ENCODER["embed_dims"][-1], c, kernel_size=1, bias=False),
        LayerNorm2d(c), torch.nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(c))

    class MedSAMLite(torch.nn.Module):  # the script's MedSAM_Lite: three named parts
        def __init__(self):
            super().__init__()
            self.image_encoder = encoder
            self.mask_decoder = MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=c,
                                              mlp_dim=CFG["decoder_mlp_dim"],
                                              num_heads=CFG["decoder_num_heads"]),
                transformer_dim=c, iou_head_depth=3,
                iou_head_hidden_dim=CFG["iou_head_hidden_dim"])
            self.prompt_encoder = PromptEncoder(embed_dim=c, image_embedding_size=(64, 64),
                                                input_image_size=(256, 256),
                                                mask_in_chans=CFG["mask_in_chans"])
    return MedSAMLite()


def lite_noise_(model, gen):
    """scripts/sam_fixtures_vit_t.py's noise (He-initialised TinyViT, BatchNorm statistics,
    attention biases), on this model."""
    from sam_fixtures_vit_t import noise_ as vit_t_noise  # noqa: E402
    vit_t_noise(model, gen)


def litemedsam(args):
    out = os.path.join(FIX, "litemedsam")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.remove(os.path.join(out, f))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = lite_build(args.lite_medsam_src)
    lite_noise_(model, gen)
    state = save_weights(model, out, "litemedsam_tiny")
    model = lite_build(args.lite_medsam_src)
    model.load_state_dict(state)  # as the script: load_state_dict, then eval()
    model.eval()
    save_npy, save_png = saver(out)
    info = {}
    for name in IMAGES:
        img_3c = np.array(Image.open(os.path.join(FIX, "medsam", f"{name}.png")).convert("RGB"))
        H, W = img_3c.shape[:2]
        img_256 = lite_resize_longest_side(img_3c, 256)
        newh, neww = img_256.shape[:2]
        norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8,
                                                   a_max=None)
        padded = np.pad(norm, ((0, 256 - newh), (0, 256 - neww), (0, 0)))
        x = torch.tensor(padded).float().permute(2, 0, 1).unsqueeze(0)
        with torch.no_grad():
            emb = model.image_encoder(x)
        box = np.array(IMAGES[name]["box"])
        ratio = 256 / max((H, W))
        box256 = np.zeros_like(box)
        for i in range(len(box)):
            box256[i] = int(box[i] * ratio)
        box_t = torch.as_tensor(box256[None, None, ...], dtype=torch.float)
        low, iou = decode(model, emb, box_t)
        up = F.interpolate(low[..., :newh, :neww], size=(H, W), mode="bilinear",
                           align_corners=False)
        prob = torch.sigmoid(up).squeeze().numpy()
        seg = (prob > 0.5).astype(np.uint8)
        save_png(f"{name}_resized.png", img_256)
        save_npy(f"{name}_embedding_sub4.npy", emb[:, :, ::4, ::4].numpy())
        save_npy(f"{name}_low_sub4.npy", low[0, :, ::4, ::4].numpy())
        save_npy(f"{name}_logits_sub8.npy", up.squeeze().numpy()[::8, ::8].astype(np.float32))
        save_png(f"{name}_mask.png", seg * 255)
        frac = float(seg.mean())
        assert 0.03 < frac < 0.97, f"{name}: degenerate mask ({frac:.3f})"
        info[name] = dict(
            height=H, width=W, box=IMAGES[name]["box"], box_256=box256.tolist(),
            resized=[newh, neww],
            resized_sha256=hashlib.sha256(np.ascontiguousarray(img_256).tobytes()).hexdigest(),
            embedding_std=float(emb.std()), low_std=float(low.std()), mask_fraction=frac)
    manifest = dict(
        generator="scripts/medsam_fixtures.py", seed=args.seed, config=CFG, encoder=LITE_ENCODER,
        official="bowang-lab/MedSAM CVPR24_LiteMedSAM_infer.py, tiny_vit_sam.py (branch "
                 "LiteMedSAM)",
        versions=versions(), images=info,
        files=dict(
            weights="litemedsam_tiny.pth (torch.save(state_dict))",
            images="../medsam/<image>.png",
            resized="<image>_resized.png: cv2.resize(INTER_AREA), longest side 256",
            embedding="<image>_embedding_sub4.npy [1,C,16,16]",
            low="<image>_low_sub4.npy [1,64,64]: low-res logits [:, ::4, ::4]",
            logits="<image>_logits_sub8.npy: cropped, bilinear to (H, W), [::8, ::8]",
            mask="<image>_mask.png: sigmoid > 0.5 (0/255)"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print("litemedsam", {k: (v["mask_fraction"], v["low_std"]) for k, v in info.items()})


def versions():
    import scipy
    import skimage
    return dict(torch=torch.__version__, numpy=np.__version__, scipy=scipy.__version__,
                skimage=skimage.__version__, opencv=cv2.__version__)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lite-medsam-src", help="folder holding the LiteMedSAM branch's "
                    "tiny_vit_sam.py (without it only the MedSAM fixtures are written)")
    args = ap.parse_args()
    medsam(args)
    if args.lite_medsam_src:
        litemedsam(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Parity fixtures for medmine's SAM (tests/it/sam_parity.rs), made with Meta's official code.

Builds an official `segment_anything` Sam (ImageEncoderViT + PromptEncoder + MaskDecoder) with a
SMALL seeded configuration, noised weights (so outputs depend on the image, see STACK-NOTES),
saves its state dict exactly as official checkpoints are saved (`torch.save(sam.state_dict())`)
and as `.safetensors`, then runs the official `SamPredictor` on a small Kvasir-SEG image with
box / points / box+points / mask_input+points prompts and writes inputs and outputs.

    pip install segment-anything==1.0 safetensors==0.8.0 && pip install --no-deps torchvision==0.29.2
    /work/torch-venv/bin/python scripts/sam_fixtures.py [--kvasir ../shared/data/kvasir-seg]

Writes tests/fixtures/sam/ (see manifest.json there for what each file is).
"""
import argparse
import hashlib
import json
import os
from functools import partial

import numpy as np
import torch
from PIL import Image
from segment_anything import SamPredictor

from sam_fixture_cases import run_prompt_cases
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                       TwoWayTransformer)

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "sam")

# Small config; every size is read back from the checkpoint's shapes on the Rust side.
CFG = dict(
    encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1],
    window_size=14, prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=8,
    mask_in_chans=16, iou_head_hidden_dim=32,
)
IMAGE_STEM = "cju0qkwl35piu0993l0dewei2"
IMAGE_WIDTH = 160  # the fixture image: the Kvasir image downscaled to this width


def build(cfg):
    """Same wiring as segment_anything.build_sam._build_sam, with the sizes of `cfg`."""
    image_size, patch = 1024, 16
    emb = image_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg["encoder_depth"], embed_dim=cfg["encoder_embed_dim"], img_size=image_size,
            mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg["encoder_num_heads"], patch_size=patch, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=cfg["encoder_global_attn_indexes"],
            window_size=cfg["window_size"], out_chans=cfg["prompt_embed_dim"]),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg["prompt_embed_dim"], image_embedding_size=(emb, emb),
            input_image_size=(image_size, image_size), mask_in_chans=cfg["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=cfg["prompt_embed_dim"], mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_num_heads"]),
            transformer_dim=cfg["prompt_embed_dim"], iou_head_depth=3,
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def noise_(sam, gen):
    """Official init plus noise: the zero-initialised pos_embed / rel_pos and the identity-ish
    LayerNorms would otherwise make the embedding nearly image-independent."""
    with torch.no_grad():
        for name, p in sam.named_parameters():
            sigma = 0.1 if name.startswith("image_encoder") else 0.05
            if p.ndim == 1 and ("norm" in name or ".1." in name or ".3." in name):
                sigma = 0.1  # LayerNorm weights/biases around 1 / 0
            p.add_(sigma * torch.randn(p.shape, generator=gen))
        pe = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        pe.copy_(torch.randn(pe.shape, generator=gen))
        # Scale the output heads so that logits and IoU are O(1): an absolute tolerance of
        # 1e-3 then means something (unscaled, the logits' spread is ~0.05).
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(20.0)
            mlp.layers[-1].bias.mul_(20.0)
        sam.mask_decoder.iou_prediction_head.layers[-1].weight.mul_(10.0)
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.mul_(10.0)


def save_npy(name, arr):
    np.save(os.path.join(OUT, name), np.ascontiguousarray(arr))


def save_mask_png(name, mask):
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(OUT, name), optimize=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvasir", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                     "shared", "data", "kvasir-seg"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    sam = build(CFG)
    noise_(sam, gen)
    state = sam.state_dict()
    for f in os.listdir(OUT):  # start clean
        os.remove(os.path.join(OUT, f))
    torch.save(state, os.path.join(OUT, "sam_tiny.pth"))  # as the official checkpoints
    from safetensors.torch import save_file  # noqa: E402  (optional dependency)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(OUT, "sam_tiny.safetensors"))
    os.chmod(os.path.join(OUT, "sam_tiny.safetensors"), 0o644)

    # The image: a Kvasir-SEG polyp, downscaled (PIL bicubic) and saved losslessly.
    src = Image.open(os.path.join(args.kvasir, "images", IMAGE_STEM + ".jpg")).convert("RGB")
    h = round(src.height * IMAGE_WIDTH / src.width)
    img = src.resize((IMAGE_WIDTH, h), Image.BICUBIC)
    img.save(os.path.join(OUT, "image.png"), optimize=True)
    image = np.array(Image.open(os.path.join(OUT, "image.png")).convert("RGB"))
    H, W = image.shape[:2]

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    resized = predictor.transform.apply_image(image)  # [h', w', 3] uint8, PIL bilinear
    x = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())  # [1,3,1024,1024]
    emb = predictor.features.numpy()  # [1, C, 64, 64]
    save_npy("embedding.npy", emb)
    save_npy("resized_sub8.npy", resized[::8, ::8])  # diagnostics for a hash mismatch
    save_npy("input_sub16.npy", x[0, :, ::16, ::16].numpy())

    # Sensitivity: another image must give a clearly different embedding.
    other = np.array(src.transpose(Image.FLIP_LEFT_RIGHT).resize((IMAGE_WIDTH, h), Image.BICUBIC))
    with torch.no_grad():
        emb2 = sam.image_encoder(sam.preprocess(torch.as_tensor(
            predictor.transform.apply_image(other)).permute(2, 0, 1)[None].float())).numpy()
    sens = float(np.abs(emb - emb2).mean() / emb.std())
    assert sens > 0.2, f"embedding nearly image-independent ({sens:.3f})"

    # Prompts in original-image pixels (the polyp is left of centre in this image).
    cases, outputs = run_prompt_cases(predictor, save_npy, save_mask_png)

    manifest = dict(
        generator="scripts/sam_fixtures.py", seed=args.seed, config=CFG,
        versions=dict(torch=torch.__version__, segment_anything="1.0",
                      torchvision=__import__("torchvision").__version__,
                      pillow=Image.__version__, numpy=np.__version__),
        image=dict(file="image.png", source=f"kvasir-seg/images/{IMAGE_STEM}.jpg",
                   height=H, width=W),
        resized=dict(shape=list(resized.shape), sha256=hashlib.sha256(resized.tobytes()).hexdigest()),
        input_sum=float(x.double().sum()),
        embedding_sensitivity=sens,
        spread=dict(embedding_std=float(emb.std()),
                    low_res_std={k: float(v["single_low"].std()) for k, v in outputs.items()}),
        prompts={k: {kk: (vv.tolist() if kk != "mask_input" else "box_single_low.npy")
                     for kk, vv in v.items()} for k, v in cases.items()},
        files=dict(
            weights="sam_tiny.pth (torch.save(state_dict)), sam_tiny.safetensors (same tensors)",
            embedding="embedding.npy [1,C,64,64]: predictor.features",
            low="box_single_low.npy [1,256,256]; <prompt>_single_low_sub4.npy [1,64,64] = "
                "low_res_logits[:, ::4, ::4]; <prompt>_multi_low_sub8.npy [3,32,32] (::8)",
            iou="<prompt>_<single|multi>_iou.npy [n]",
            masks="<prompt>_<single|multi>_mask<i>.png: predictor masks at original size (0/255)",
        ),
    )
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"sensitivity {sens:.3f}; fixture dir {total / 1e6:.2f} MB")
    for k, v in outputs.items():
        print(k, {t: float((v[t] > 0).mean()) for t in v})


if __name__ == "__main__":
    main()

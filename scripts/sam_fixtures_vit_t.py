#!/usr/bin/env python3
"""Parity fixtures for medmine's MobileSAM (vit_t, TinyViT encoder): tests/it/sam_parity_vit_t.rs.

The same protocol as scripts/sam_fixtures.py (vit_b-style), with MobileSAM's official code
(PyPI `mobilesam-mirror`, the `mobile_sam` package of github.com/ChaoningZhang/MobileSAM):
builds `mobile_sam.modeling.Sam` with a TinyViT image encoder of a SMALL seeded configuration,
noised weights (BatchNorm running statistics and attention biases too), saves the state dict
as the official checkpoint is saved (`torch.save(sam.state_dict())`) and as `.safetensors`,
then runs the official `mobile_sam.SamPredictor` on the vit_b fixture's image with box /
points / box+points / mask_input+points prompts and writes inputs and outputs.

Small, but the official classes and wiring (`build_sam_vit_t`) with three departures, each
only a size: TinyViT `embed_dims=[16, 32, 48, 320]` (320: the official PatchMerging keeps the
64x64 grid only for out_dim 320/448/576), `depths=[2, 2, 2, 0]`, `num_classes=0` (no
classifier head, which SAM never uses), and a neck of `prompt_embed_dim` (32) channels where
`TinyViT.__init__` hard-codes 256 (same layers and names, `neck.0..3`).

The official model must see `.eval()` AFTER its weights are loaded: TinyViT's Attention keeps
`ab = attention_biases[:, idxs]` as a non-persistent buffer computed in `train(False)`, and
`build_sam_vit_t` calls `.eval()` BEFORE `load_state_dict`, so a model used straight from
`build_sam_vit_t(checkpoint)` ignores the checkpoint's attention biases (they stay zero). The
MobileSAM README calls `mobile_sam.eval()` again after building; so do we, and manifest.json
records how far the stale-bias embedding is from the right one.

    pip install mobilesam-mirror==1.0.0 timm safetensors==0.8.0   (torch, torchvision: see
    scripts/requirements-torch.txt)
    /work/torch-venv/bin/python scripts/sam_fixtures_vit_t.py

Writes tests/fixtures/sam_vit_t/ (manifest.json there says what each file is).
"""
import argparse
import hashlib
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image

warnings.filterwarnings("ignore", category=UserWarning)  # timm registry notices
warnings.filterwarnings("ignore", category=FutureWarning)
from mobile_sam import SamPredictor  # noqa: E402
from sam_fixture_cases import run_prompt_cases  # noqa: E402
from mobile_sam.modeling import (MaskDecoder, PromptEncoder, Sam, TinyViT,  # noqa: E402
                                 TwoWayTransformer)
from mobile_sam.modeling.tiny_vit_sam import LayerNorm2d  # noqa: E402

HERE = os.path.dirname(__file__)
OUT = os.path.join(HERE, "..", "tests", "fixtures", "sam_vit_t")
IMAGE = os.path.join(HERE, "..", "tests", "fixtures", "sam", "image.png")  # shared with vit_b

# Every size is read back from the checkpoint's shapes on the Rust side.
ENCODER = dict(embed_dims=[16, 32, 48, 320], depths=[2, 2, 2, 0], num_heads=[1, 2, 3, 1],
               window_sizes=[7, 7, 14, 7])
CFG = dict(prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=8, mask_in_chans=16,
           iou_head_hidden_dim=32)
WEIGHTS = "sam_vit_t_tiny"


def build():
    """mobile_sam.build_sam.build_sam_vit_t's wiring with the sizes above (see the docstring)."""
    image_size, emb, c = 1024, 64, CFG["prompt_embed_dim"]
    encoder = TinyViT(img_size=image_size, in_chans=3, num_classes=0, mlp_ratio=4.,
                      drop_rate=0., drop_path_rate=0.0, use_checkpoint=False,
                      mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8, **ENCODER)
    encoder.neck = torch.nn.Sequential(
        torch.nn.Conv2d(ENCODER["embed_dims"][-1], c, kernel_size=1, bias=False), LayerNorm2d(c),
        torch.nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False), LayerNorm2d(c))
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=c, image_embedding_size=(emb, emb),
            input_image_size=(image_size, image_size), mask_in_chans=CFG["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=c, mlp_dim=CFG["decoder_mlp_dim"],
                                          num_heads=CFG["decoder_num_heads"]),
            transformer_dim=c, iou_head_depth=3, iou_head_hidden_dim=CFG["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


def noise_(sam, gen):
    """Official init plus noise, so that every weight matters (STACK-NOTES: with small noise
    MobileSAM's embedding barely depends on the image)."""
    def randn(shape):
        return torch.randn(shape, generator=gen)
    with torch.no_grad():
        # He-initialised encoder weights: with PyTorch's default init each conv/linear shrinks
        # the signal (~0.6x), and through TinyViT's many convolutions the image would be lost
        # behind the biases (sensitivity 0.005 instead of > 0.2).
        for m in sam.image_encoder.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(randn(m.weight.shape) * (2.0 / fan_in) ** 0.5)
        for name, p in sam.named_parameters():
            if name.endswith("attention_biases"):
                p.add_(1.0 * randn(p.shape))  # zero-initialised; must visibly matter
            elif name.startswith("image_encoder"):
                p.add_(0.1 * randn(p.shape))
            elif p.ndim == 1 and ("norm" in name or ".1." in name or ".3." in name):
                p.add_(0.1 * randn(p.shape))
            else:
                p.add_(0.05 * randn(p.shape))
        for name, b in sam.named_buffers():  # BatchNorm running statistics (eval mode uses them)
            if name.endswith("running_mean"):
                b.copy_(0.1 * randn(b.shape))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
        pe = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        pe.copy_(randn(pe.shape))
        # logits and IoU O(1), so that an absolute tolerance of 1e-3 means something
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(20.0)
            mlp.layers[-1].bias.mul_(20.0)
        sam.mask_decoder.iou_prediction_head.layers[-1].weight.mul_(10.0)
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.mul_(10.0)


def save_npy(name, arr):
    np.save(os.path.join(OUT, name), np.ascontiguousarray(arr))


def save_mask_png(name, mask):
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(OUT, name), optimize=True)


def embed(sam, predictor, image):
    x = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return sam.image_encoder(sam.preprocess(x)).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    sam = build()
    noise_(sam, gen)
    for f in os.listdir(OUT):  # start clean
        os.remove(os.path.join(OUT, f))
    pth = os.path.join(OUT, WEIGHTS + ".pth")
    torch.save(sam.state_dict(), pth)  # as the official checkpoint
    state = torch.load(pth)
    from safetensors.torch import save_file  # noqa: E402  (optional dependency)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(OUT, WEIGHTS + ".safetensors"))
    os.chmod(os.path.join(OUT, WEIGHTS + ".safetensors"), 0o644)

    # The official way to use it: build (build_sam_vit_t calls eval() first), load, eval().
    stale = build().eval()
    stale.load_state_dict(state)
    sam = build().eval()
    sam.load_state_dict(state)
    sam.eval()  # recomputes the attention-bias buffers from the loaded weights (README usage)

    image = np.array(Image.open(IMAGE).convert("RGB"))
    H, W = image.shape[:2]
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    resized = predictor.transform.apply_image(image)
    x = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())
    emb = predictor.features.numpy()  # [1, C, 64, 64]
    save_npy("embedding.npy", emb)
    assert np.abs(embed(sam, predictor, image) - emb).max() == 0
    stale_diff = float(np.abs(embed(stale, predictor, image) - emb).max())
    assert stale_diff > 0.1, f"attention biases barely matter ({stale_diff:.3f})"

    # Sensitivity: another image (the mirror image) must give a clearly different embedding.
    emb2 = embed(sam, predictor, np.ascontiguousarray(image[:, ::-1]))
    sens = float(np.abs(emb - emb2).mean() / emb.std())
    assert sens > 0.2, f"embedding nearly image-independent ({sens:.3f})"

    # Prompts in original-image pixels: the vit_b fixture's (the polyp is left of centre).
    cases, outputs = run_prompt_cases(predictor, save_npy, save_mask_png)

    import mobile_sam  # noqa: E402
    manifest = dict(
        generator="scripts/sam_fixtures_vit_t.py", seed=args.seed, encoder=ENCODER, config=CFG,
        versions=dict(torch=torch.__version__, mobile_sam=getattr(mobile_sam, "__version__", "?"),
                      mobilesam_mirror="1.0.0", pillow=Image.__version__,
                      numpy=np.__version__),
        image=dict(file="../sam/image.png", height=H, width=W),
        resized=dict(shape=list(resized.shape),
                     sha256=hashlib.sha256(resized.tobytes()).hexdigest()),
        input_sum=float(x.double().sum()),
        embedding_sensitivity=sens,
        stale_attention_bias_max_diff=stale_diff,
        spread=dict(embedding_std=float(emb.std()),
                    low_res_std={k: float(v["single_low"].std()) for k, v in outputs.items()}),
        prompts={k: {kk: (vv.tolist() if kk != "mask_input" else "box_single_low.npy")
                     for kk, vv in v.items()} for k, v in cases.items()},
        files=dict(
            weights=f"{WEIGHTS}.pth (torch.save(state_dict)), {WEIGHTS}.safetensors (same "
                    "tensors)",
            embedding="embedding.npy [1,C,64,64]: predictor.features",
            low="box_single_low.npy [1,256,256]; <prompt>_single_low_sub4.npy [1,64,64] = "
                "low_res_logits[:, ::4, ::4]; <prompt>_multi_low_sub8.npy [3,32,32] (::8)",
            iou="<prompt>_<single|multi>_iou.npy [n]",
            masks="<prompt>_<single|multi>_mask<i>.png: predictor masks at original size (0/255)",
        ),
    )
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    n = sum(p.numel() for p in sam.parameters())
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{n} parameters; sensitivity {sens:.3f}; stale-bias diff {stale_diff:.3f}; "
          f"fixture dir {total / 1e6:.2f} MB")
    for k, v in outputs.items():
        print(k, {t: float((v[t] > 0).mean()) for t in v})


if __name__ == "__main__":
    main()

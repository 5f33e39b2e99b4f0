"""PyTorch reference U-Net++ mirroring medmine's `src/models/unetpp` (candle).

Why this exists: BENCHMARKS.md compares medmine's candle training throughput with
PyTorch on the same machine. For that comparison to mean anything the two sides must
train the *same* network with the *same* loss, so this file is a line-by-line mirror of
the Rust model:

* U-Net++ (Zhou et al. 2018) in the common "NestedUNet" formulation, with deep
  supervision (four 1x1 heads on x0_1..x0_4).
* Filters ``nb = [b, 2b, 4b, 8b, 16b]`` for base ``b`` (default 32), 3 input channels,
  1 output class.
* ``VGGBlock``: conv3x3 (no bias: BatchNorm follows) -> BatchNorm(eps 1e-5, momentum 0.1) -> ReLU, twice.
* Down-sampling ``MaxPool2d(2, 2)``; up-sampling bilinear x2 with
  ``align_corners=False``.
* Module names equal the Rust `VarBuilder` paths, so ``state_dict()`` keys equal the
  Rust checkpoint keys (e.g. ``conv0_1.bn2.running_var``, ``final3.weight``). The only
  difference is PyTorch's extra ``*.num_batches_tracked`` buffers, which the Rust side
  does not store; use :func:`rust_state_dict` / :func:`load_rust_state_dict` to convert.

The loss (:func:`loss`) is the deep-supervision BCE + soft-Dice loss used by medmine's
trainer, with optional per-sample weights.

Run directly to print the parameter count: ``python scripts/unetpp_torch.py --base 32``.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class VGGBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU (convs without bias: the BatchNorm after each one cancels a bias, which would only ever get a zero gradient)."""

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, middle_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(middle_channels, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(middle_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return x


class NestedUNet(nn.Module):
    """U-Net++ with deep supervision; ``forward`` returns the 4 head logits [B,1,H,W].

    H and W must be divisible by 16 (four 2x2 poolings).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1, base: int = 32):
        super().__init__()
        nb = [base, base * 2, base * 4, base * 8, base * 16]
        self.nb_filter = nb

        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

        self.conv0_0 = VGGBlock(in_channels, nb[0], nb[0])
        self.conv1_0 = VGGBlock(nb[0], nb[1], nb[1])
        self.conv2_0 = VGGBlock(nb[1], nb[2], nb[2])
        self.conv3_0 = VGGBlock(nb[2], nb[3], nb[3])
        self.conv4_0 = VGGBlock(nb[3], nb[4], nb[4])

        self.conv0_1 = VGGBlock(nb[0] + nb[1], nb[0], nb[0])
        self.conv1_1 = VGGBlock(nb[1] + nb[2], nb[1], nb[1])
        self.conv2_1 = VGGBlock(nb[2] + nb[3], nb[2], nb[2])
        self.conv3_1 = VGGBlock(nb[3] + nb[4], nb[3], nb[3])

        self.conv0_2 = VGGBlock(nb[0] * 2 + nb[1], nb[0], nb[0])
        self.conv1_2 = VGGBlock(nb[1] * 2 + nb[2], nb[1], nb[1])
        self.conv2_2 = VGGBlock(nb[2] * 2 + nb[3], nb[2], nb[2])

        self.conv0_3 = VGGBlock(nb[0] * 3 + nb[1], nb[0], nb[0])
        self.conv1_3 = VGGBlock(nb[1] * 3 + nb[2], nb[1], nb[1])

        self.conv0_4 = VGGBlock(nb[0] * 4 + nb[1], nb[0], nb[0])

        self.final1 = nn.Conv2d(nb[0], num_classes, kernel_size=1)
        self.final2 = nn.Conv2d(nb[0], num_classes, kernel_size=1)
        self.final3 = nn.Conv2d(nb[0], num_classes, kernel_size=1)
        self.final4 = nn.Conv2d(nb[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        pool, up = self.pool, self.up

        x0_0 = self.conv0_0(x)
        x1_0 = self.conv1_0(pool(x0_0))
        x0_1 = self.conv0_1(torch.cat([x0_0, up(x1_0)], 1))

        x2_0 = self.conv2_0(pool(x1_0))
        x1_1 = self.conv1_1(torch.cat([x1_0, up(x2_0)], 1))
        x0_2 = self.conv0_2(torch.cat([x0_0, x0_1, up(x1_1)], 1))

        x3_0 = self.conv3_0(pool(x2_0))
        x2_1 = self.conv2_1(torch.cat([x2_0, up(x3_0)], 1))
        x1_2 = self.conv1_2(torch.cat([x1_0, x1_1, up(x2_1)], 1))
        x0_3 = self.conv0_3(torch.cat([x0_0, x0_1, x0_2, up(x1_2)], 1))

        x4_0 = self.conv4_0(pool(x3_0))
        x3_1 = self.conv3_1(torch.cat([x3_0, up(x4_0)], 1))
        x2_2 = self.conv2_2(torch.cat([x2_0, x2_1, up(x3_1)], 1))
        x1_3 = self.conv1_3(torch.cat([x1_0, x1_1, x1_2, up(x2_2)], 1))
        x0_4 = self.conv0_4(torch.cat([x0_0, x0_1, x0_2, x0_3, up(x1_3)], 1))

        return [self.final1(x0_1), self.final2(x0_2), self.final3(x0_3), self.final4(x0_4)]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE-with-logits (mean over pixels) + soft Dice loss, shape [B].

    Dice loss is ``1 - (2*sum(p*t) + 1) / (sum(p) + sum(t) + 1)`` with ``p = sigmoid(logits)``,
    sums taken per sample over all of C, H, W.
    """
    b = logits.shape[0]
    logits = logits.reshape(b, -1)
    target = target.reshape(b, -1).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=1)
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(dim=1) + target.sum(dim=1) + 1.0)
    return bce + dice


def loss(
    logits_list: Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Deep-supervision loss: mean over heads of the weighted per-sample BCE + Dice loss.

    ``weights`` (shape [B], default all ones) weights the samples of each head as
    ``sum(w * l) / sum(w)``.
    """
    b = target.shape[0]
    if weights is None:
        weights = torch.ones(b, dtype=logits_list[0].dtype, device=target.device)
    weights = weights.to(logits_list[0].dtype)
    total = 0.0
    for logits in logits_list:
        l = per_sample_loss(logits, target)
        total = total + (weights * l).sum() / weights.sum()
    return total / len(logits_list)


def rust_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state_dict()`` without PyTorch-only ``num_batches_tracked`` buffers (= Rust keys)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_rust_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Load a Rust checkpoint's tensors (e.g. from ``safetensors.torch.load_file``).

    Fails unless the only missing keys are ``num_batches_tracked`` and nothing is unexpected.
    """
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise KeyError(f"missing: {missing}, unexpected: {result.unexpected_keys}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Print U-Net++ (NestedUNet) parameter count and keys.")
    ap.add_argument("--base", type=int, default=32, help="base number of filters b (default 32)")
    ap.add_argument("--keys", action="store_true", help="also list state-dict keys and shapes")
    args = ap.parse_args()
    model = NestedUNet(base=args.base)
    print(f"base {args.base}: trainable parameters {count_parameters(model)}")
    if args.keys:
        for k, v in rust_state_dict(model).items():
            print(k, tuple(v.shape))


if __name__ == "__main__":
    main()

"""``resnet_tiny``: a small CIFAR-style ResNet, the teacher (annotator) for the CIFAR runs.

3x3 stem at stride 1, four stages of BasicBlocks (default widths 32/64/128/256, strides 1/2/2/2,
two blocks each: overall stride 8), global average pooling and a Linear head. ``dense_logits``
applies the head as a 1x1 convolution to the final feature map; since pooling and the head are
both linear, the spatial mean of the dense logits equals the image logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetTiny(nn.Module):
    """CIFAR-style ResNet; ``forward(images) -> logits [B, C]`` in train and eval (no MixToken)."""

    def __init__(self, num_classes=10, img_size=32, in_chans=3, widths=(32, 64, 128, 256),
                 depths=(2, 2, 2, 2), strides=(1, 2, 2, 2)):
        super().__init__()
        if not (len(widths) == len(depths) == len(strides)) or not widths:
            raise ValueError(f"widths, depths and strides must have one entry per stage, got "
                             f"{tuple(widths)}, {tuple(depths)}, {tuple(strides)}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.stride = 1
        for s in strides:
            self.stride *= s
        if img_size % self.stride:
            raise ValueError(f"img_size={img_size} is not a multiple of the overall stride {self.stride}")
        self.patch_grid = img_size // self.stride
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for w, d, s in zip(widths, depths, strides):
            stages.append(nn.Sequential(*(BasicBlock(cin if i == 0 else w, w, s if i == 0 else 1) for i in range(d))))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)
        self.grad_checkpointing = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: every block starts as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Every 1-D parameter (BatchNorm weights and biases, the head bias)."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        ref = self.head.weight
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Final feature map ``[B, D, h, w]`` (h = w = img_size / 8 by default)."""
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images must be [B, {self.in_chans}, H, W], got {tuple(images.shape)}")
        if images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of the stride {self.stride}")
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.stem(images)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in self.stages:
            x = checkpoint(stage, x, use_reentrant=False) if ckpt else stage(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images).mean(dim=(2, 3)))

    @torch.no_grad()
    def dense_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Per-location logits ``[B, C, h, w]``: the head as a 1x1 convolution on the final map."""
        f = self.forward_features(images)
        return F.conv2d(f, self.head.weight[:, :, None, None], self.head.bias)

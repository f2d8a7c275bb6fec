"""Public token-labeling loss: functional, module and dense targets (a thin layer over token_label_ce.py).

Input checks. Shapes, dtypes, devices, k <= C, N square, ``ground_truth`` without ``gt_classes``:
always, as ``ValueError`` naming the argument and the shapes; they cost no host synchronisation.
Value checks (class ids in [0, C), boxes finite with positive height and width, ``gt_classes`` in
[0, C)) need to read the data: ``validate=None`` (default) does them when the tensors live on the CPU
(free) and skips them for CUDA tensors, because the forward must never synchronise with the host;
there the kernels never address outside a row and turn any such value into a NaN loss instead (never a
silently wrong one). ``validate=True`` always checks (one sync), ``False`` never.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from . import reference as _ref

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_LABEL_FLOATS = (torch.float16, torch.float32, torch.bfloat16)
_INTS = (torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8)


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _use_triton(t):
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensor(name, t, ndim=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")


def _mix_lambda(mix_box, L, device):
    """-> (lam as float or None, mix tensor or None); validates python boxes on the host."""
    if mix_box is None:
        return 1.0, None
    if isinstance(mix_box, torch.Tensor):
        if mix_box.numel() != 4 or mix_box.is_floating_point():
            raise ValueError(f"mix_box must hold 4 integers (r0, c0, r1, c1), got {mix_box.dtype} "
                             f"of shape {_shape(mix_box)}")
        if mix_box.device != device:
            raise ValueError(f"mix_box is on {mix_box.device}, the logits on {device}")
        m = mix_box.reshape(4)  # the kernel converts int16/32/64 on load: no cast kernel for those
        return 1.0, m if m.dtype in (torch.int16, torch.int32, torch.int64) else m.to(torch.int32)
    try:
        r0, c0, r1, c1 = (int(v) for v in mix_box)
    except (TypeError, ValueError):
        raise ValueError(f"mix_box must be None or (r0, c0, r1, c1) ints, got {mix_box!r}") from None
    if not (0 <= r0 <= r1 <= L and 0 <= c0 <= c1 <= L):
        raise ValueError(f"mix_box {mix_box!r} must satisfy 0 <= r0 <= r1 <= L and 0 <= c0 <= c1 <= L (L = {L})")
    return 1.0 - (r1 - r0) * (c1 - c0) / (L * L), None


def validate_inputs(cls_logits, aux_logits, label_values, label_indices, boxes, flips, *, mix_box=None,
                    gt_classes=None, smoothing=0.1, ground_truth=False, box_order="hw", validate=None, _device=None):
    """All checks of the module docstring; returns (B, N, C, L, lam, mix_tensor).

    ``_device``: the device the logits will live on when ``aux_logits`` is only a meta stand-in.
    """
    _check_tensor("aux_logits", aux_logits, 3, _FLOATS)
    B, N, C = aux_logits.shape
    _check_tensor("cls_logits", cls_logits, 2, _FLOATS)
    if tuple(cls_logits.shape) != (B, C):
        raise ValueError(f"cls_logits has shape {_shape(cls_logits)} but aux_logits {_shape(aux_logits)} "
                         f"needs [B, C] = {[B, C]}")
    if B < 1 or N < 1 or C < 1:
        raise ValueError(f"aux_logits must have B, N, C >= 1, got shape {_shape(aux_logits)}")
    L = math.isqrt(N)
    if L * L != N:
        raise ValueError(f"aux_logits has N = {N} tokens (shape {_shape(aux_logits)}); N must be a square L*L")
    _check_tensor("label_values", label_values, 4, _LABEL_FLOATS)
    _check_tensor("label_indices", label_indices, 4, _INTS)
    Bv, k, S, S2 = label_values.shape
    if Bv != B or S != S2 or S < 1 or k < 1:
        raise ValueError(f"label_values has shape {_shape(label_values)}; expected [B={B}, k, S, S]")
    if tuple(label_indices.shape) != tuple(label_values.shape):
        raise ValueError(f"label_indices has shape {_shape(label_indices)}, label_values "
                         f"{_shape(label_values)}: they must match")
    if k > C:
        raise ValueError(f"label maps hold k = {k} classes per location (label_values {_shape(label_values)}) "
                         f"but the logits have only C = {C}")
    _check_tensor("boxes", boxes, 2, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    if tuple(boxes.shape) != (B, 4):
        raise ValueError(f"boxes has shape {_shape(boxes)}; expected [B, 4] = {[B, 4]}")
    _check_tensor("flips", flips, 1, (torch.bool,) + _INTS)
    if tuple(flips.shape) != (B,):
        raise ValueError(f"flips has shape {_shape(flips)}; expected [B] = {[B]}")
    if ground_truth:
        if gt_classes is None:
            raise ValueError("ground_truth=True needs gt_classes [B]")
        _check_tensor("gt_classes", gt_classes, 1, _INTS)
        if tuple(gt_classes.shape) != (B,):
            raise ValueError(f"gt_classes has shape {_shape(gt_classes)}; expected [B] = {[B]}")
    if box_order not in ("hw", "original"):
        raise ValueError(f"box_order must be 'hw' or 'original', got {box_order!r}")
    if not (0.0 <= float(smoothing) <= 1.0):
        raise ValueError(f"smoothing must lie in [0, 1], got {smoothing}")
    dev = _device if _device is not None else aux_logits.device
    named = [("cls_logits", cls_logits), ("label_values", label_values), ("label_indices", label_indices),
             ("boxes", boxes), ("flips", flips)] + ([("gt_classes", gt_classes)] if ground_truth else [])
    for name, t in named:
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but aux_logits is on {dev}")
    lam, mix_tensor = _mix_lambda(mix_box, L, dev)
    if validate or (validate is None and dev.type == "cpu"):
        _check_values(label_indices, boxes, gt_classes if ground_truth else None, C)
    return B, N, C, L, lam, mix_tensor


def _check_values(label_indices, boxes, gt_classes, C):
    lo, hi = int(label_indices.min()), int(label_indices.max())
    if lo < 0 or hi >= C:
        raise ValueError(f"label_indices {_shape(label_indices)} hold class ids in [{lo}, {hi}], outside [0, C={C})")
    b = boxes.to(torch.float64)
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"boxes {_shape(boxes)} contain non-finite values")
    if not bool((b[:, 2:] > 0).all()):
        raise ValueError(f"boxes {_shape(boxes)} need positive height and width (columns 2 and 3)")
    if gt_classes is not None:
        lo, hi = int(gt_classes.min()), int(gt_classes.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"gt_classes {_shape(gt_classes)} hold class ids in [{lo}, {hi}], outside [0, C={C})")


def token_label_cross_entropy(cls_logits, aux_logits, label_values, label_indices, boxes, flips, *, mix_box=None,
                              gt_classes=None, smoothing=0.1, dense_weight=1.0, cls_weight=1.0, ground_truth=False,
                              box_order="hw", validate=None):
    """Token-labeling loss with targets RoI-aligned inside the kernel (design.md; token_labeling.md §2, §4).

    Returns the fp32 scalar ``cls_weight * CE(cls, t_cls) + dense_weight * mean_tokens CE(aux, t_tok)``;
    autograd gives the gradients of both logits tensors (written by the forward; backward scales them).
    On CUDA (or under TRITON_INTERPRET=1) it runs the fused Triton kernels; elsewhere it falls back to
    the eager reference-style computation. ``validate``: see the module docstring.
    Note: like Liger's fused CE, backward scales the saved gradient in place, so it supports one
    backward per forward.
    """
    B, N, C, L, lam, mix_tensor = validate_inputs(
        cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_box=mix_box, gt_classes=gt_classes,
        smoothing=smoothing, ground_truth=ground_truth, box_order=box_order, validate=validate)
    if not _use_triton(aux_logits):
        return _ref.reference_style_loss(
            cls_logits.float(), aux_logits.float(), label_values, label_indices, boxes, flips,
            mix_box=mix_box if mix_tensor is None else mix_tensor.tolist(), gt_classes=gt_classes,
            smoothing=smoothing, dense_weight=dense_weight, cls_weight=cls_weight, ground_truth=ground_truth,
            box_order=box_order)
    from .token_label_ce import TokenLabelCEFunction, token_label_ce_op

    if cls_logits.dtype != aux_logits.dtype:
        cls_logits = cls_logits.to(aux_logits.dtype)
    args = (cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_tensor,
            gt_classes if ground_truth else None, float(lam), float(smoothing), float(dense_weight),
            float(cls_weight), bool(ground_truth), box_order == "original")
    if torch.compiler.is_compiling():  # the custom op: torch.compile needs its fake implementation
        loss, _, _ = token_label_ce_op(*args)
    else:  # eager: a plain autograd.Function, none of the custom-op dispatch layers
        loss = TokenLabelCEFunction.apply(*args)
    return loss


def roi_align_label_maps(label_values, label_indices, boxes, flips, num_classes, out_size, smoothing=0.1,
                         box_order="hw"):
    """Dense smoothed targets ``[B, 1 + L*L, C]`` fp32 (cls first, then tokens row-major).

    For users who want the targets themselves: it densifies the maps (in sample chunks that keep the
    dense maps under ~256 MiB) and uses the same sampling code as the float64 reference, in fp32.
    The loss never calls this.
    """
    _check_tensor("label_values", label_values, 4, _LABEL_FLOATS)
    _check_tensor("label_indices", label_indices, 4, _INTS)
    if tuple(label_indices.shape) != tuple(label_values.shape) or label_values.shape[2] != label_values.shape[3]:
        raise ValueError(f"label_values {_shape(label_values)} and label_indices {_shape(label_indices)} must both "
                         f"be [B, k, S, S]")
    B, k, S, _ = label_values.shape
    C, L = int(num_classes), int(out_size)
    if C < k:
        raise ValueError(f"num_classes = {C} is smaller than k = {k} (label_values {_shape(label_values)})")
    if L < 1:
        raise ValueError(f"out_size must be >= 1, got {out_size}")
    _check_tensor("boxes", boxes, 2)
    if tuple(boxes.shape) != (B, 4):
        raise ValueError(f"boxes has shape {_shape(boxes)}; expected [B, 4] = {[B, 4]}")
    _check_tensor("flips", flips, 1)
    if tuple(flips.shape) != (B,):
        raise ValueError(f"flips has shape {_shape(flips)}; expected [B] = {[B]}")
    if box_order not in ("hw", "original"):
        raise ValueError(f"box_order must be 'hw' or 'original', got {box_order!r}")
    _check_values(label_indices, boxes, None, C)
    chunk = max(1, (256 << 20) // (C * S * S * 4))
    out = [_ref.dense_targets(label_values[i:i + chunk], label_indices[i:i + chunk], boxes[i:i + chunk],
                              flips[i:i + chunk], C, L, smoothing, box_order, torch.float32)
           for i in range(0, B, chunk)]
    return torch.cat(out, 0)


def _soft_ce(x, t):
    return torch.sum(-t * torch.log_softmax(x.float(), dim=-1), dim=-1).mean()


class TokenLabelCrossEntropy(nn.Module):
    """The token-labeling criterion as an ``nn.Module``; three call forms.

    * sparse (fused):  ``crit((cls, aux, mix_box), batch)`` with ``batch`` a dict holding
      ``label_values, label_indices, boxes, flips`` (and ``classes`` for ground_truth), or
      ``crit((cls, aux, mix_box), label_values=..., label_indices=..., boxes=..., flips=..., gt_classes=...)``;
    * the reference repo's call: ``crit((cls, aux, mix_box), target)`` with a dense target [B, C, 2 + N]
      (column 0 ground truth, 1 cls, then the tokens);
    * timm's soft target ``[B, C]``: with the (cls, aux, mix_box) tuple every token gets the image
      label (as the reference does); with a plain logits tensor it is SoftTargetCrossEntropy.
    The dense forms use plain PyTorch math.
    """

    def __init__(self, dense_weight=1.0, cls_weight=1.0, ground_truth=False, smoothing=0.1, box_order="hw"):
        super().__init__()
        if box_order not in ("hw", "original"):
            raise ValueError(f"box_order must be 'hw' or 'original', got {box_order!r}")
        self.dense_weight = float(dense_weight)
        self.cls_weight = float(cls_weight)
        self.ground_truth = bool(ground_truth)
        self.smoothing = float(smoothing)
        self.box_order = box_order

    def extra_repr(self):
        return (f"dense_weight={self.dense_weight}, cls_weight={self.cls_weight}, ground_truth={self.ground_truth}, "
                f"smoothing={self.smoothing}, box_order={self.box_order!r}")

    def forward(self, outputs, target=None, *, label_values=None, label_indices=None, boxes=None, flips=None,
                gt_classes=None):
        if isinstance(target, dict):
            label_values, label_indices = target["label_values"], target["label_indices"]
            boxes, flips = target["boxes"], target["flips"]
            gt_classes = target.get("classes", gt_classes)
            target = None
        if not isinstance(outputs, (tuple, list)):
            if target is None or not isinstance(target, torch.Tensor) or target.dim() != 2:
                raise ValueError("a plain logits tensor needs a soft target [B, C]; got target "
                                 f"{_shape(target) if target is not None else None}")
            if tuple(target.shape) != tuple(outputs.shape):
                raise ValueError(f"target {_shape(target)} does not match logits {_shape(outputs)}")
            return _soft_ce(outputs, target.float())
        if len(outputs) != 3:
            raise ValueError(f"outputs must be (cls_logits, aux_logits, mix_box), got a sequence of {len(outputs)}")
        cls_logits, aux_logits, mix_box = outputs
        if target is None:
            if label_values is None or label_indices is None or boxes is None or flips is None:
                raise ValueError("give a dense target, a soft target [B, C], or label_values, label_indices, "
                                 "boxes and flips")
            return token_label_cross_entropy(
                cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_box=mix_box,
                gt_classes=gt_classes, smoothing=self.smoothing, dense_weight=self.dense_weight,
                cls_weight=self.cls_weight, ground_truth=self.ground_truth, box_order=self.box_order)
        return self._dense_forward(cls_logits, aux_logits, mix_box, target)

    def _dense_forward(self, cls_logits, aux_logits, mix_box, target):
        _check_tensor("aux_logits", aux_logits, 3, _FLOATS)
        B, N, C = aux_logits.shape
        _check_tensor("target", target)
        if target.dim() == 2:
            if tuple(target.shape) != (B, C):
                raise ValueError(f"soft target has shape {_shape(target)}; expected [B, C] = {[B, C]}")
            t_cls = target.float()
            t_aux = t_cls.unsqueeze(1).expand(B, N, C)
        elif target.dim() == 3:
            if tuple(target.shape) != (B, C, 2 + N):
                raise ValueError(f"dense target has shape {_shape(target)}; expected [B, C, 2 + N] = {[B, C, 2 + N]}")
            t = target.float()
            t_cls = t[:, :, 1]
            if self.ground_truth:
                gt = t[:, :, 0]
                ratio = 0.9 - 0.4 * (gt.argmax(-1) == t_cls.argmax(-1)).float().unsqueeze(-1)
                t_cls = t_cls * ratio + gt * (1.0 - ratio)
            t_aux = t[:, :, 2:].transpose(1, 2)
        else:
            raise ValueError(f"target must be [B, C] or [B, C, 2 + N], got {_shape(target)}")
        L = math.isqrt(N)
        if mix_box is not None:
            if isinstance(mix_box, torch.Tensor):
                r0, c0, r1, c1 = mix_box.reshape(4).float().unbind(0)
                lam = 1.0 - (r1 - r0) * (c1 - c0) / N
            else:
                lam, _ = _mix_lambda(mix_box, L, aux_logits.device)
            t_cls = lam * t_cls + (1.0 - lam) * t_cls.flip(0)
        return (self.cls_weight * _soft_ce(cls_logits, t_cls)
                + self.dense_weight * _soft_ce(aux_logits.reshape(B * N, C), t_aux.reshape(B * N, C)))

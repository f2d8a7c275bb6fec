"""Aux head + token-labeling loss fused (Liger's fused-linear-CE idea): the [B, N, C] logits never exist.

The aux head ``Linear(D, C)`` runs on chunks of samples with cuBLAS; each chunk's logits go straight
into the token-row kernel, which writes their gradient, and that gradient is folded at once into the
gradients of the features (grad @ W), of W (grad^T @ features, fp32 accumulator) and of the bias.
Only one chunk of logits and its gradient are alive at any time, so at C = 21,841 the peak extra
memory is a small fraction of the logits it replaces. Backward is a scale by grad_output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import compute_dtype
from .loss import _use_triton, validate_inputs


class _FusedLinearTokenLabelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cls_logits, features, weight, bias, label_values, label_indices, boxes, flips, mix_tensor,
                gt_classes, lam, smoothing, dense_weight, cls_weight, ground_truth, original, chunk):
        from .token_label_ce import _workspace, launch_token_rows

        B, N, D = features.shape
        C = weight.shape[0]
        dev = features.device
        dt = compute_dtype(features)
        w = weight.to(dt)
        bvec = bias.to(dt) if bias is not None else None
        feats = features.to(dt)
        x_cls = cls_logits.contiguous()
        grad_cls = torch.empty_like(x_cls)
        grad_feat = torch.empty(B, N, D, device=dev, dtype=features.dtype)
        grad_w = torch.zeros(C, D, device=dev, dtype=torch.float32) if weight.requires_grad else None
        grad_b = torch.zeros(C, device=dev, dtype=torch.float32) if (bias is not None and bias.requires_grad) else None
        ws = _workspace(label_values, label_indices, boxes, flips, B, N, C)
        logits_buf = torch.empty(min(chunk, B) * N, C, device=dev, dtype=dt)
        grad_buf = torch.empty_like(logits_buf)
        for b0 in range(0, B, chunk):
            bc = min(chunk, B - b0)
            f = feats[b0:b0 + bc].reshape(bc * N, D)
            x = logits_buf[: bc * N]
            g = grad_buf[: bc * N]
            if bvec is not None:
                torch.addmm(bvec, f, w.t(), out=x)
            else:
                torch.mm(f, w.t(), out=x)
            # the first chunk's launch also pools the cls targets and writes the cls rows (whole batch)
            cls = (x_cls, grad_cls, gt_classes, mix_tensor, lam, cls_weight, ground_truth) if b0 == 0 else None
            launch_token_rows(x, g, ws, b0, bc * N, N, C, smoothing, float(dense_weight) / (B * N), original, cls=cls)
            grad_feat[b0:b0 + bc] = (g @ w).view(bc, N, D).to(features.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ f).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        ctx.has_w = grad_w is not None
        ctx.has_b = grad_b is not None
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        # plain ctx attributes, dropped in backward: autograd can take the buffers as .grad (no clone)
        ctx.bufs = [grad_cls, grad_feat, grad_w, grad_b]
        return ws.total_loss()

    @staticmethod
    def backward(ctx, grad_loss):
        from .token_label_ce import scale_grad_, scale_grads_

        bufs, ctx.bufs = ctx.bufs, None
        if bufs is None:
            raise RuntimeError("fused_linear_token_label_cross_entropy: backward can run only once per forward")
        grad_cls, grad_feat, grad_w, grad_b = bufs
        del bufs
        gc, gf = scale_grads_(grad_cls, grad_feat, grad_loss)
        gw = scale_grad_(grad_w, grad_loss).to(ctx.w_dtype) if ctx.has_w else None
        gb = scale_grad_(grad_b, grad_loss).to(ctx.b_dtype) if ctx.has_b else None
        return (gc, gf, gw, gb) + (None,) * 13


def fused_linear_token_label_cross_entropy(cls_logits, features, weight, bias, label_values, label_indices, boxes,
                                           flips, *, mix_box=None, gt_classes=None, smoothing=0.1, dense_weight=1.0,
                                           cls_weight=1.0, ground_truth=False, box_order="hw", validate=None,
                                           chunk_samples=None):
    """``token_label_cross_entropy(cls_logits, features @ weight.T + bias, ...)`` without the [B, N, C] logits.

    features [B, N, D] (the final-norm patch tokens), weight [C, D], bias [C] or None. ``chunk_samples``
    samples are processed per cuBLAS call (default: about 1/16 of the batch, at least 1).
    Gradients flow to cls_logits, features, weight and bias.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got {tuple(getattr(features, 'shape', ())) or type(features)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != features.shape[2]:
        raise ValueError(f"weight must be [C, D] with D = {features.shape[2]} (features {tuple(features.shape)}), "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    C = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (C,)):
        raise ValueError(f"bias must be None or [C] = [{C}], got {tuple(getattr(bias, 'shape', ()))}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features on {features.device}")
    B, N, D = features.shape
    meta = torch.empty(B, N, C, device="meta", dtype=features.dtype)  # shape/dtype checks only
    # the checks need aux-shaped logits; a meta tensor carries the shape without memory
    _, _, _, L, lam, mix_tensor = validate_inputs(
        cls_logits, meta, label_values, label_indices, boxes, flips, mix_box=mix_box, gt_classes=gt_classes,
        smoothing=smoothing, ground_truth=ground_truth, box_order=box_order,
        validate=validate if validate is not None else (features.device.type == "cpu"), _device=features.device)
    if not _use_triton(features):
        from .loss import token_label_cross_entropy

        return token_label_cross_entropy(cls_logits, F.linear(features, weight, bias), label_values, label_indices,
                                         boxes, flips, mix_box=mix_box, gt_classes=gt_classes, smoothing=smoothing,
                                         dense_weight=dense_weight, cls_weight=cls_weight, ground_truth=ground_truth,
                                         box_order=box_order, validate=False)
    chunk = int(chunk_samples) if chunk_samples else max(1, B // 16)
    return _FusedLinearTokenLabelCE.apply(
        cls_logits, features, weight, bias, label_values, label_indices, boxes, flips, mix_tensor,
        gt_classes if ground_truth else None, float(lam), float(smoothing), float(dense_weight), float(cls_weight),
        bool(ground_truth), box_order == "original", chunk)

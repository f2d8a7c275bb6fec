"""PyTorch references for the token-labeling loss, written from the spec (token_labeling.md §2, §4).

* ``roi_align_label_maps_reference`` and ``token_label_cross_entropy_reference``: float64 oracles with
  the same signatures as the public functions; the tests and ``bench`` check the fused kernels against
  them.
* ``reference_style_loss``: the reference repo's eager algorithm (densify -> roi_align -> softmax ->
  soft CE) in the dtype of its inputs, the benchmark baseline. It uses ``torchvision.ops.roi_align``
  when torchvision is importable (as the original does), else the pure-torch ``roi_align`` below.

The geometry lives once, in ``_axis_weights``: torchvision's roi_align (aligned=False, spatial_scale 1,
adaptive sampling grid) is separable. For one box and output cell (p, q), the average over the
grid_h x grid_w bilinear samples of a map is ``sum_{r,c} Wy[p, r] * Wx[q, c] * map[r, c]``, where
``Wy[p, r] = (1/grid_h) sum_g valid(y_g) * bilinear weight of y_g on row r`` (and Wx likewise), because
the bilinear weights, the out-of-range test (``y < -1 or y > S`` gives 0) and the average all factor
into a y part and an x part.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "roi_align",
    "roi_align_label_maps_reference",
    "token_label_cross_entropy_reference",
    "reference_style_loss",
    "densify_label_maps",
    "dense_targets",
    "box_axes",
]


def densify_label_maps(label_values, label_indices, num_classes, dtype=torch.float64):
    """Scatter top-k teacher logits into ``[B, C, S, S]``; every other class keeps logit 0 (§2.2)."""
    B, k, S, S2 = label_values.shape
    dense = torch.zeros(B, num_classes, S, S2, dtype=dtype, device=label_values.device)
    dense.scatter_(1, label_indices.long(), label_values.to(dtype))
    return dense


def box_axes(boxes, flips, box_order="hw"):
    """Map our boxes (top, left, height, width; before the flip) to the reference's frame.

    Returns ``(row_start, row_size, col_start, col_size)`` normalised, for sampling the
    *horizontally flipped* map when ``flips`` is set (the reference flips the full map first and
    draws its box in the flipped frame: left becomes ``1 - left - width``). ``box_order="original"``
    reproduces the reference's swapped axes (§2.4): map rows follow the crop's left/width and map
    columns its top/height.
    """
    boxes = boxes.to(torch.float64)
    t, l, h, w = boxes.unbind(1)
    l = torch.where(flips.to(torch.bool), 1.0 - l - w, l)
    if box_order == "hw":
        return t, h, l, w
    if box_order == "original":
        return l, w, t, h
    raise ValueError(f"box_order must be 'hw' or 'original', got {box_order!r}")


def _axis_weights(start, size, S, L):
    """Per-box separable RoIAlign weights along one axis: ``[B, L, S]`` (float64).

    ``start``/``size`` are normalised (0..1 of the map side). torchvision semantics with the
    reference's manual -0.5 shift and aligned=False: roi = max(size*S, 1), bin = roi/L,
    grid = ceil(roi/L), sample y = start*S - 0.5 + p*bin + (g + 0.5)*bin/grid; a sample with
    y < -1 or y > S contributes 0; otherwise y is clamped at 0, y_low = floor(y), and when
    y_low >= S-1 both taps sit on row S-1.
    """
    start = start.to(torch.float64) * S - 0.5
    roi = torch.clamp(size.to(torch.float64) * S, min=1.0)  # (end - start) with end = (start+size)*S - 0.5
    bin_ = roi / L
    grid = torch.ceil(roi / L).clamp(min=1)
    G = int(grid.max().item())  # host sync: fine for the oracle, never in the fused path
    B = start.shape[0]
    dev = start.device
    p = torch.arange(L, dtype=torch.float64, device=dev).view(1, L, 1)
    g = torch.arange(G, dtype=torch.float64, device=dev).view(1, 1, G)
    y = start.view(B, 1, 1) + p * bin_.view(B, 1, 1) + (g + 0.5) * (bin_ / grid).view(B, 1, 1)
    in_grid = g < grid.view(B, 1, 1)
    valid = (y >= -1.0) & (y <= S) & in_grid
    y = torch.clamp(y, min=0.0)
    y_low = torch.floor(y)
    top = y_low >= S - 1
    y_low = torch.where(top, torch.full_like(y_low, S - 1), y_low)
    y_high = torch.where(top, y_low, y_low + 1)
    y = torch.where(top, y_low, y)
    ly = y - y_low
    hy = 1.0 - ly
    wgt = valid.to(torch.float64) / grid.view(B, 1, 1)
    W = torch.zeros(B, L, S, dtype=torch.float64, device=dev)
    W.scatter_add_(2, y_low.long(), hy * wgt)
    W.scatter_add_(2, y_high.long(), ly * wgt)
    return W


def roi_align(maps, row_start, row_size, col_start, col_size, out_size):
    """Pure-torch ``torchvision.ops.roi_align(maps, [b, x1, y1, x2, y2], out_size, 1.0, -1, False)``.

    The box is given as normalised (row_start, row_size, col_start, col_size) and mapped to
    ``x1 = col_start*S - 0.5`` etc. as the reference does; one box per batch entry.
    Returns ``[B, C, L, L]`` in the dtype of ``maps`` (the weights are built in float64).
    """
    S = maps.shape[-1]
    Wy = _axis_weights(row_start, row_size, S, out_size).to(maps.dtype)
    Wx = _axis_weights(col_start, col_size, S, out_size).to(maps.dtype)
    return torch.einsum("bpr,bcrs,bqs->bcpq", Wy, maps, Wx)


def _smooth(p, smoothing):
    C = p.shape[-1]
    off = smoothing / C
    return p * (1.0 - smoothing + off) + off


def _pooled_logits(label_values, label_indices, boxes, flips, num_classes, out_size, box_order, dtype):
    dense = densify_label_maps(label_values, label_indices, num_classes, dtype)
    maps = torch.where(flips.to(torch.bool).view(-1, 1, 1, 1), dense.flip(-1), dense)
    r0, rs, c0, cs = box_axes(boxes, flips, box_order)
    tok = roi_align(maps, r0, rs, c0, cs, out_size)  # [B, C, L, L]
    cls = roi_align(maps, r0, rs, c0, cs, 1)[:, :, 0, 0]  # [B, C]
    return cls, tok


def roi_align_label_maps_reference(label_values, label_indices, boxes, flips, num_classes, out_size,
                                   smoothing=0.1, box_order="hw"):
    """Float64 dense targets ``[B, 1 + L*L, C]`` (cls first, then tokens row-major), smoothed (§2.5)."""
    return dense_targets(label_values, label_indices, boxes, flips, num_classes, out_size, smoothing, box_order,
                         torch.float64)


def dense_targets(label_values, label_indices, boxes, flips, num_classes, out_size, smoothing, box_order, dtype):
    """Dense smoothed targets ``[B, 1 + L*L, C]`` in ``dtype`` (the one implementation of §2.2-§2.5)."""
    cls, tok = _pooled_logits(label_values, label_indices, boxes, flips, num_classes, out_size, box_order, dtype)
    B, C = cls.shape
    z = torch.cat([cls.unsqueeze(1), tok.flatten(2).transpose(1, 2)], dim=1)  # [B, 1+N, C]
    return _smooth(torch.softmax(z, dim=-1), smoothing)


def _mix_lambda(mix_box, N):
    if mix_box is None:
        return 1.0
    r0, c0, r1, c1 = (int(v) for v in mix_box)
    return 1.0 - (r1 - r0) * (c1 - c0) / N


def _soft_ce(x, t):
    """mean over rows of sum_c -t_c * log_softmax(x)_c (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-t * torch.log_softmax(x, dim=-1), dim=-1).mean()


def _cls_target(t_cls, gt_classes, smoothing, ground_truth, mix_box, N):
    """§2.6 ground-truth blend (as the code does it: before MixToken), then §3.5 MixToken mixing."""
    B, C = t_cls.shape
    if ground_truth:
        off = smoothing / C
        on = 1.0 - smoothing + off
        gt = torch.full_like(t_cls, off)
        gt.scatter_(1, gt_classes.long().view(B, 1), on)
        agree = (gt.argmax(1) == t_cls.argmax(1)).to(t_cls.dtype).unsqueeze(1)
        ratio = 0.9 - 0.4 * agree
        t_cls = t_cls * ratio + gt * (1.0 - ratio)
    lam = _mix_lambda(mix_box, N)
    if lam < 1:
        t_cls = lam * t_cls + (1.0 - lam) * t_cls.flip(0)
    return t_cls


def token_label_cross_entropy_reference(cls_logits, aux_logits, label_values, label_indices, boxes, flips, *,
                                        mix_box=None, gt_classes=None, smoothing=0.1, dense_weight=1.0,
                                        cls_weight=1.0, ground_truth=False, box_order="hw"):
    """Float64 oracle of ``token_label_cross_entropy`` (differentiable w.r.t. both logits)."""
    B, N, C = aux_logits.shape
    L = math.isqrt(N)
    t = roi_align_label_maps_reference(label_values, label_indices, boxes, flips, C, L, smoothing, box_order)
    t_cls = _cls_target(t[:, 0], gt_classes, smoothing, ground_truth, mix_box, N)
    x_cls = cls_logits.to(torch.float64)
    x_aux = aux_logits.to(torch.float64)
    return cls_weight * _soft_ce(x_cls, t_cls) + dense_weight * _soft_ce(x_aux.reshape(B * N, C),
                                                                         t[:, 1:].reshape(B * N, C))


def _torchvision_roi_align():
    try:
        from torchvision.ops import roi_align as tv_roi_align
    except Exception:  # torchvision missing or its extension fails to load
        return None
    return tv_roi_align


def reference_style_loss(cls_logits, aux_logits, label_values, label_indices, boxes, flips, *, mix_box=None,
                         gt_classes=None, smoothing=0.1, dense_weight=1.0, cls_weight=1.0, ground_truth=False,
                         box_order="hw"):
    """The reference repo's eager algorithm in the logits' dtype: the benchmark baseline.

    densify [B,C,S,S] (fp32, as the original) -> flip -> roi_align to L x L and 1 x 1 -> softmax ->
    smoothing -> [B, C, 2+N]-style targets -> soft CE. Works for B = 1 (the original's squeeze does not).
    """
    B, N, C = aux_logits.shape
    L = math.isqrt(N)
    dtype = torch.float32
    dense = densify_label_maps(label_values, label_indices, C, dtype)
    dense = torch.where(flips.to(torch.bool).view(-1, 1, 1, 1), dense.flip(-1), dense)
    S = dense.shape[-1]
    tv = _torchvision_roi_align()
    r0, rs, c0, cs = box_axes(boxes, flips, box_order)
    if tv is not None:
        # torchvision box columns are (x1, y1, x2, y2) with x the width (column) axis
        rois = torch.stack([torch.arange(B, device=dense.device, dtype=torch.float64),
                            c0 * S - 0.5, r0 * S - 0.5, (c0 + cs) * S - 0.5, (r0 + rs) * S - 0.5], 1).to(dtype)
        tok = tv(dense, rois, output_size=(L, L))
        cls = tv(dense, rois, output_size=(1, 1))
    else:
        tok = roi_align(dense, r0, rs, c0, cs, L)
        cls = roi_align(dense, r0, rs, c0, cs, 1)
    target = torch.cat([cls.flatten(2), tok.flatten(2)], dim=2)  # [B, C, 1+N]
    target = _smooth(torch.softmax(target, dim=1).transpose(1, 2), smoothing)  # [B, 1+N, C]
    t_cls = _cls_target(target[:, 0], gt_classes, smoothing, ground_truth, mix_box, N)
    t_aux = target[:, 1:].reshape(B * N, C)
    x_aux = aux_logits.reshape(B * N, C)
    loss_cls = _soft_ce(cls_logits, t_cls.to(cls_logits.dtype))
    loss_aux = _soft_ce(x_aux, t_aux.to(x_aux.dtype))
    return cls_weight * loss_cls + dense_weight * loss_aux

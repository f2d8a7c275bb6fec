"""LV-ViT (arXiv 2104.10858) with MixToken, as the reference repo defines it (reference §3, §5).

Module and parameter names are the reference's (``patch_embed.conv1``/``bn1``..``proj``,
``blocks.i.attn.qkv``, ``head``, ``aux_head``, ``pos_embed``, ``cls_token``), so its released
state dicts load as they are.

MixToken: one box per batch on the token grid, drawn on the host from the model's own
``numpy.random.RandomState`` (seed it with ``seed_mix_token``) with the reference's draws in the
reference's order: ``lam ~ Beta(1, 1)``, then the row centre, then the column centre. The mixing
itself is a ``torch.where`` with a token mask, so a compiled forward sees a tensor of fixed shape
instead of new Python ints every step (no recompiles), and the host never waits on the device.
The aux predictions are swapped back by swapping the final token features back before
``aux_head``: the head is applied per token, so this gives exactly the reference's un-mixed
``aux_head`` outputs, and the fused aux-head loss can take the features directly.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attention_qkv, check_backend, prepare_backend, select_backend

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rand_mix_box(rng: np.random.RandomState, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """The reference's ``rand_bbox`` on an ``grid_h x grid_w`` token grid -> (r0, c0, r1, c1).

    Rows [r0, r1) and columns [c0, c1). Draw order and integer rounding as the reference: the cut
    sides are ``int(side * sqrt(1 - lam))``, the centre is uniform, and both ends are clipped.
    """
    lam = rng.beta(1.0, 1.0)
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(grid_h * cut), int(grid_w * cut)
    cr, cc = int(rng.randint(grid_h)), int(rng.randint(grid_w))
    r0, r1 = (int(np.clip(cr + d, 0, grid_h)) for d in (-(cut_h // 2), cut_h // 2))
    c0, c1 = (int(np.clip(cc + d, 0, grid_w)) for d in (-(cut_w // 2), cut_w // 2))
    return r0, c0, r1, c1


@torch.compiler.disable
def mix_box_mask(mix_box, grid_h: int, grid_w: int, device) -> torch.Tensor:
    """Token mask ``[1, N, 1]`` (bool, on ``device``) of a MixToken box (tuple of ints or int tensor [4])."""
    if isinstance(mix_box, torch.Tensor):
        if mix_box.numel() != 4:
            raise ValueError(f"mix_box must hold 4 ints (r0, c0, r1, c1), got shape {tuple(mix_box.shape)}")
        box = mix_box.reshape(4).to(device=device, non_blocking=True)
        rows = torch.arange(grid_h, device=device)
        cols = torch.arange(grid_w, device=device)
        inside = ((rows >= box[0]) & (rows < box[2]))[:, None] & ((cols >= box[1]) & (cols < box[3]))[None, :]
        return inside.reshape(1, grid_h * grid_w, 1)
    if len(mix_box) != 4:
        raise ValueError(f"mix_box must be (r0, c0, r1, c1), got {mix_box!r}")
    r0, c0, r1, c1 = (int(v) for v in mix_box)
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    mask = mask.reshape(1, grid_h * grid_w, 1)
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned + non_blocking: the host does not wait for the GPU to drain its queue.
        mask = mask.pin_memory().to(device, non_blocking=True)
    return mask.to(device)


def patchify_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=k)`` for a k x k kernel with stride k, as one GEMM.

    Kernel = stride and no padding: the patches do not overlap, so the conv is a Linear on the
    flattened patches. x ``[B, C, H, W]`` (H, W multiples of k) -> ``[B, D, H/k, W/k]`` held in
    ``[B, H/k, W/k, D]`` memory (channels_last), so flattening it to tokens is a free view. A patch
    is flattened in (row, column, channel) order, the weight ``[D, C, k, k]`` in the same order.

    Why: in the H100 profile of the compiled LV-ViT-S step (B=128) one conv input-gradient kernel ran
    once per step, cuDNN's generic ``dgrad_engine``, 3.2 ms of 29 ms; by elimination it is this
    conv's (conv1 needs no input gradient, the 3x3 convs ran sm90 implicit-GEMM kernels). A GEMM of
    this size (25088 x 4096 x 384) takes ~0.1 ms. Under torch.compile the patch copy can fuse into
    the BN+ReLU kernel before it, and the gradient's copy back into the ReLU/BN backward.
    """
    B, C, H, W = x.shape
    D, Cw, k, kw = weight.shape
    if Cw != C or kw != k or H % k or W % k:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} are not a k x k patchify "
                         "(weight [D, C, k, k], H and W multiples of k)")
    return patch_linear(patches_of(x, k), weight, bias, (B, H // k, W // k))


def patches_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [B, C, H, W] as ``[B * (H/k) * (W/k), k * k * C]``: one row per k x k patch, in (row, column, channel)
    order (a view for a channels_last x up to the last reshape, which is the one copy)."""
    B, C, H, W = x.shape
    h, w = H // k, W // k
    # [B, H, W, C] -> [B, h, k, w, k, C] -> [B, h, w, k, k, C]
    return x.permute(0, 2, 3, 1).reshape(B, h, k, w, k, C).transpose(2, 3).reshape(B * h * w, k * k * C)


def patch_linear(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 grid: tuple[int, int, int]) -> torch.Tensor:
    """The k x k stride-k conv of ``weight [D, C, k, k]`` on patch rows (``patches_of``) of a ``grid`` (B, h, w):
    ``[B, D, h, w]`` in ``[B, h, w, D]`` memory."""
    D, C, k, _ = weight.shape
    B, h, w = grid
    if tuple(patches.shape) != (B * h * w, k * k * C):
        raise ValueError(f"patches {tuple(patches.shape)} are not the {B} x {h} x {w} patches of {k} x {k} x {C} "
                         f"that weight {tuple(weight.shape)} takes")
    out = F.linear(patches, weight.permute(0, 2, 3, 1).reshape(D, k * k * C), bias)
    return out.view(B, h, w, D).permute(0, 3, 1, 2)


def conv_stride2_s2d(x: torch.Tensor, weight: torch.Tensor, padding: int, channel_multiple: int = 8,
                     wgrad: str = "cudnn") -> torch.Tensor:
    """``F.conv2d(x, weight, stride=2, padding=padding)`` as a stride-1 conv on a 2x2 space-to-depth input.

    The kernel is zero-padded to an even size 2m (an odd 7x7 becomes 8x8, its last row and column
    zero), the padded input ``[B, C, 2h', 2w']`` is folded into ``[B, 4C, h', w']`` (channel
    ``4c + 2dy + dx`` holds pixel ``(2i + dy, 2j + dx)`` of channel c) and the kernel likewise into
    ``[D, 4C, m, m]``: output ``(i, j)`` of the stride-2 conv reads padded rows ``2i .. 2i+2m-1``,
    which are folded rows ``i .. i+m-1``. Channels are zero-padded up to a multiple of
    ``channel_multiple`` (tensor-core kernels want 8 bf16 channels; 3 input channels give 12 -> 16).
    Why: a 3-channel 7x7/2 conv is a poor fit for tensor cores; 16 channels and a 4x4 kernel are not.
    Returns ``[B, D, Ho, Wo]`` (channels_last: the folded input is built in NHWC memory). ``wgrad`` "triton": the
    weight gradient by kernels/conv_wgrad.py instead of cuDNN's (forward and input gradient stay cuDNN's).
    """
    B, C, H, W = x.shape
    D, Cw, kh, kw = weight.shape
    if Cw != C or kh != kw:
        raise ValueError(f"weight {tuple(weight.shape)} must be [D, {C}, k, k] for x {tuple(x.shape)}")
    if padding < 0 or channel_multiple < 1:
        raise ValueError(f"padding must be >= 0 and channel_multiple >= 1, got {padding}, {channel_multiple}")
    if wgrad not in STEM_IMPLS["conv1_wgrad"]:
        raise ValueError(f"wgrad must be one of {', '.join(STEM_IMPLS['conv1_wgrad'])}, got {wgrad!r}")
    m = (kh + 1) // 2
    Ho, Wo = (H + 2 * padding - kh) // 2 + 1, (W + 2 * padding - kw) // 2 + 1
    # padded extent that output Ho-1 reads up to: 2 (Ho - 1) + 2m; cropped (negative pad) if shorter
    xp = F.pad(x, (padding, 2 * (Wo - 1) + 2 * m - W - padding, padding, 2 * (Ho - 1) + 2 * m - H - padding))
    hp, wp = xp.shape[-2] // 2, xp.shape[-1] // 2
    c4 = -(-4 * C // channel_multiple) * channel_multiple
    # [B, C, hp, 2, wp, 2] -> [B, hp, wp, C, 2, 2] -> [B, hp, wp, 4C] (+ zero channels), NHWC memory
    folded = xp.reshape(B, C, hp, 2, wp, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, hp, wp, 4 * C)
    wq = F.pad(weight, (0, 2 * m - kw, 0, 2 * m - kh)).reshape(D, C, m, 2, m, 2)
    wq = wq.permute(0, 1, 3, 5, 2, 4).reshape(D, 4 * C, m, m)
    if c4 != 4 * C:
        folded = F.pad(folded, (0, c4 - 4 * C))
        wq = F.pad(wq, (0, 0, 0, 0, 0, c4 - 4 * C))
    if wgrad == "triton":
        from tokenlabel.kernels.conv_wgrad import conv2d_s1  # noqa: PLC0415 (imports triton: only when asked for)

        return conv2d_s1(folded.permute(0, 3, 1, 2), wq)
    return F.conv2d(folded.permute(0, 3, 1, 2), wq.contiguous(memory_format=torch.channels_last))


STEM_IMPLS = {"conv1": ("auto", "conv", "s2d"), "proj": ("gemm", "conv"), "bn": ("torch", "triton"),
              "conv1_wgrad": ("cudnn", "triton")}
# how the blocks' residual adds with the LayerNorms after them, and the MLPs' bias + GELU, run (LVViT.set_impl)
BLOCK_IMPLS = {"residual_norm": ("torch", "triton"), "gelu": ("torch", "triton", "gemm")}


class PatchEmbed4_2(nn.Module):
    """The reference's "4_2" stem: conv7x7/2 -> BN -> ReLU -> (conv3x3 -> BN -> ReLU) x2 -> conv (p/2)x(p/2).

    Parameters and their names are the reference's whatever the implementation: ``proj_impl``
    "gemm" runs the patchifying ``proj`` conv as one matmul (:func:`patchify_linear`), "conv" as
    cuDNN's conv; ``conv1_impl`` "s2d" runs ``conv1`` as a space-to-depth stride-1 conv
    (:func:`conv_stride2_s2d`), "conv" as the plain conv, and "auto" (the default) picks "s2d" for CUDA
    inputs and "conv" otherwise; ``bn_impl`` "triton" runs each BatchNorm + ReLU in training on CUDA by
    ``tokenlabel.kernels.batchnorm`` (channels-last streaming kernels; the last one writes the proj GEMM's patch
    rows itself), "torch" (the default) as ``F.relu(bn(x))``; ``conv1_wgrad_impl`` "triton" computes the s2d
    conv1's weight gradient by ``tokenlabel.kernels.conv_wgrad`` in training on CUDA, "cudnn" (the default) by
    cuDNN. Change them with :meth:`set_impl`.

    Why "auto" picks "s2d" on CUDA: in the compiled LV-ViT-S step on an H200 the plain 3-channel 7x7/2 conv's
    forward and weight-gradient kernels took 1.24 ms per step (~50 TFLOP/s); with "s2d" the step ran 21.43 ms
    against 22.17 ms, 5,974 against 5,774 img/s (bench rows, 2026-12-04, models/NOTES.md). On the CPU the plain
    conv is the faster one.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, stem_channels=64,
                 conv1_impl="auto", proj_impl="gemm"):
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"patch_size must be even (the stem has stride 2), got {patch_size}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        c = stem_channels
        self.conv1 = nn.Conv2d(in_chans, c, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)
        self.conv1_impl, self.proj_impl, self.bn_impl, self.conv1_wgrad_impl = "conv", "gemm", "torch", "cudnn"
        self.set_impl(conv1=conv1_impl, proj=proj_impl)

    def set_impl(self, conv1: str | None = None, proj: str | None = None, bn: str | None = None,
                 conv1_wgrad: str | None = None) -> None:
        """Pick how ``conv1`` ("auto" | "conv" | "s2d"), ``proj`` ("gemm" | "conv"), the BatchNorm + ReLUs
        (``bn``: "torch" | "triton") and the s2d conv1's weight gradient (``conv1_wgrad``: "cudnn" | "triton")
        run; None keeps the current one."""
        for name, value in (("conv1", conv1), ("proj", proj), ("bn", bn), ("conv1_wgrad", conv1_wgrad)):
            if value is not None and value not in STEM_IMPLS[name]:
                raise ValueError(f"{name} must be one of {', '.join(STEM_IMPLS[name])}, got {value!r}")
        self.conv1_impl = conv1 or self.conv1_impl
        self.proj_impl = proj or self.proj_impl
        self.bn_impl = bn or self.bn_impl
        self.conv1_wgrad_impl = conv1_wgrad or self.conv1_wgrad_impl
        if self.bn_impl == "triton":
            import tokenlabel.kernels.batchnorm  # noqa: F401, PLC0415 (imported before any torch.compile trace)
        if self.conv1_wgrad_impl == "triton":
            import tokenlabel.kernels.conv_wgrad  # noqa: F401, PLC0415 (as above)

    def _bn_relu(self, bn, x, patch=0):
        """``F.relu(bn(x))``; ``patch`` k > 0: as its k x k patch rows (``patches_of``), which the Triton kernels
        write in that layout directly."""
        if self.bn_impl == "triton" and self.training and bn.momentum is not None:
            from tokenlabel.kernels import batchnorm  # noqa: PLC0415 (imports triton: only when asked for)

            if x.is_cuda or batchnorm.INTERPRET:
                return batchnorm.bn_relu_train(x.contiguous(memory_format=torch.channels_last), bn, patch)
        out = F.relu(bn(x), inplace=True)
        return patches_of(out, patch) if patch else out

    def _conv1_wgrad(self, x) -> str:
        """"triton" where the s2d conv1's weight gradient is taken by our kernel: asked for, in training with
        gradients on, the kernel able to run (CUDA, or the interpreter); else "cudnn"."""
        if self.conv1_wgrad_impl != "triton" or not (self.training and torch.is_grad_enabled()
                                                     and self.conv1.weight.requires_grad):
            return "cudnn"
        from tokenlabel.kernels import conv_wgrad  # noqa: PLC0415 (imports triton: only when asked for)

        return "triton" if x.is_cuda or conv_wgrad.INTERPRET else "cudnn"

    def conv1_resolved(self, cuda: bool) -> str:
        """The conv1 implementation that runs for an input on CUDA (``cuda``) or elsewhere."""
        if self.conv1_impl == "auto":
            return "s2d" if cuda else "conv"
        return self.conv1_impl

    def forward(self, x):
        if self.conv1_resolved(x.is_cuda) == "s2d":  # its folded input is built in NHWC memory whatever x's layout
            x = conv_stride2_s2d(x, self.conv1.weight, self.conv1.padding[0], wgrad=self._conv1_wgrad(x))
        elif x.is_cuda:
            # cuDNN's NHWC kernels; the [B, D, h, w] output is then [B, h, w, D] in memory, so
            # flattening to tokens [B, N, D] below is a free view.
            x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        else:
            x = self.conv1(x)
        x = self._bn_relu(self.bn1, x)
        x = self._bn_relu(self.bn2, self.conv2(x))
        x = self.conv3(x)
        if self.proj_impl == "gemm":
            k = self.proj.kernel_size[0]
            B, _, H, W = x.shape
            if H % k or W % k:
                raise ValueError(f"the stem's {H} x {W} activations are not whole {k} x {k} patches")
            # the patch rows straight from the last BatchNorm + ReLU (the Triton kernels write them, no copy)
            return patch_linear(self._bn_relu(self.bn3, x, patch=k), self.proj.weight, self.proj.bias,
                                (B, H // k, W // k))
        return self.proj(self._bn_relu(self.bn3, x))

    def extra_repr(self):
        return (f"conv1_impl={self.conv1_impl!r}, proj_impl={self.proj_impl!r}, bn_impl={self.bn_impl!r}, "
                f"conv1_wgrad_impl={self.conv1_wgrad_impl!r}")


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (no bias) and a pluggable kernel."""

    def __init__(self, dim, num_heads, qkv_bias=False, attn="auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = check_backend(attn)
        if attn == "triton":
            prepare_backend(attn)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self.heads(x))

    def heads(self, x):
        """The heads' outputs ``[B, N, D]``, before ``proj``."""
        return attention_qkv(self.qkv(x), self.num_heads, self.backend, self.scale)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2. ``gelu_impl`` "triton" (on CUDA or under TRITON_INTERPRET=1) runs fc1 without its bias
    and adds the bias inside one Triton GELU kernel each way (``tokenlabel.kernels.bias_gelu``), so fc1's bias
    gradient comes out of GELU's backward pass; "gemm" computes fc1's bias + GELU in fc1's GEMM epilogue and GELU's
    backward in the epilogue of fc2's input-gradient GEMM (``tokenlabel.kernels.linear_gelu``; slower than
    "triton" on an H100 on 2026-12-05, kept to measure its TMA form); "torch" runs the modules as written."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu_impl = "torch"

    def forward(self, x):
        if self._gemm_epilogues(x):
            b = self.branch(x)
            return b + self.fc2.bias.to(b.dtype)
        return self.fc2(self.hidden(x))

    def _gemm_epilogues(self, x) -> bool:
        if self.gelu_impl != "gemm":
            return False
        from tokenlabel.kernels.linear_gelu import INTERPRET  # noqa: PLC0415 (imports triton: only when asked for)

        return x.is_cuda or INTERPRET

    def branch(self, x):
        """fc2's output without fc2's bias (which the fused residual add takes)."""
        if self._gemm_epilogues(x):
            from tokenlabel.kernels.linear_gelu import mlp_gelu  # noqa: PLC0415

            return mlp_gelu(x, self.fc1.weight, self.fc1.bias, self.fc2.weight)
        return F.linear(self.hidden(x), self.fc2.weight)

    def hidden(self, x):
        """GELU(fc1(x)) alone: bias_gelu's kernel for "triton", and for "gemm" too (whose fused path never
        materialises it; ``branch`` is what the blocks call); torch's modules otherwise."""
        if self.gelu_impl in ("triton", "gemm"):
            from tokenlabel.kernels import bias_gelu as bg  # noqa: PLC0415 (imports triton: only when asked for)

            if x.is_cuda or bg.INTERPRET:
                return bg.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias)
        return self.act(self.fc1(x))


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch of a sample)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        return x * self.sample_scale(x)

    def sample_scale(self, x, extra: float = 1.0):
        """Per-sample factor ``[B, 1, ..]``: 0 for a dropped sample, ``extra / keep`` otherwise."""
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return mask.mul_(extra / keep)

    def extra_repr(self):
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-LN transformer block with the reference's residual scaling: x += DropPath(f(LN(x))) / skip_lam."""

    def __init__(self, dim, num_heads, mlp_ratio=3.0, qkv_bias=False, drop_path=0.0, skip_lam=1.0, attn="auto"):
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn=attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _residual(self, x, branch):
        # x + DropPath(branch) / skip_lam as one elementwise kernel in eager mode (add with alpha, or
        # addcmul with the per-sample drop-path factor folded together with 1 / skip_lam).
        scale = self._branch_scale(x)
        if isinstance(scale, torch.Tensor):
            return torch.addcmul(x, branch, scale)
        return x + branch if scale == 1.0 else torch.add(x, branch, alpha=scale)

    def forward(self, x):
        x = self._residual(x, self.attn(self.norm1(x)))
        return self._residual(x, self.mlp(self.norm2(x)))

    def _branch_scale(self, x):
        """The branch's factor: DropPath's per-sample mask over keep and skip_lam ([B, 1, ..], drawn now) in
        training, else the constant 1 / skip_lam."""
        if isinstance(self.drop_path, DropPath) and self.training and self.drop_path.p > 0:
            return self.drop_path.sample_scale(x, 1.0 / self.skip_lam)
        return 1.0 / self.skip_lam

    def forward_fused(self, x, n, next_norm: nn.LayerNorm, out_dtype=None, last: bool = False):
        """``forward`` with ``n = norm1(x)`` given and each residual add fused with the LayerNorm after it
        (``tokenlabel.kernels.add_layernorm``; the biases of ``attn.proj`` and ``mlp.fc2`` are added there too, so
        their gradients come from the same backward pass): returns ``(x_out, next_norm(x_out))``, the normalised
        tokens in ``out_dtype`` (None: the stream's). ``last``: ``(None, next_norm(x_out))`` in the stream's dtype
        (the final norm's), the stream being read by nothing else."""
        from tokenlabel.kernels.add_layernorm import add_layer_norm  # noqa: PLC0415 (imports triton)

        proj, fc2 = self.attn.proj, self.mlp.fc2
        x, n = add_layer_norm(x, F.linear(self.attn.heads(n), proj.weight), self.norm2, self._branch_scale(x),
                              out_dtype, branch_bias=proj.bias)
        # the final norm's output keeps the stream's dtype, as nn.LayerNorm's under autocast
        out = add_layer_norm(x, self.mlp.branch(n), next_norm, self._branch_scale(x),
                             None if last else out_dtype, return_stream=not last, branch_bias=fc2.bias)
        return (None, out) if last else out


class LVViT(nn.Module):
    """LV-ViT: conv stem, cls token + learned position embedding, pre-LN blocks, cls head + aux head.

    ``model.train()``: ``model(images) -> (cls_logits [B, C], aux_logits [B, N, C], mix_box)`` with
    MixToken on (``mix_box`` = (r0, c0, r1, c1) Python ints, or None when MixToken is off).
    ``model.eval()``: ``model(images) -> cls_logits + 0.5 * aux_logits.max(dim=1).values``.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=16,
                 num_heads=6, mlp_ratio=3.0, qkv_bias=False, skip_lam=2.0, stem_channels=64,
                 drop_path_rate=0.0, attn="auto", mix_token=True, mix_token_seed=None):
        super().__init__()
        self.num_classes, self.embed_dim, self.num_features = num_classes, embed_dim, embed_dim
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed4_2(img_size, patch_size, in_chans, embed_dim, stem_channels)
        self.img_size, self.patch_size = img_size, patch_size
        self.patch_grid = self.patch_embed.grid
        num_patches = self.patch_grid ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], skip_lam, attn) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.aux_head = nn.Linear(embed_dim, num_classes)
        self.mix_token = bool(mix_token)
        self.grad_checkpointing = False
        self.residual_norm_impl = "torch"

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        self.seed_mix_token(mix_token_seed)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- configuration -------------------------------------------------------------------
    def seed_mix_token(self, seed: int | None = None) -> None:
        """Seed the MixToken box generator (use seed + rank under DDP, as the reference's 42 + rank).

        None draws the seed from torch's global generator, so ``torch.manual_seed`` before building
        the model makes the box sequence reproducible too.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu").item())
        self.mix_token_rng = np.random.RandomState(int(seed))

    @torch.compiler.disable
    def sample_mix_box(self) -> tuple[int, int, int, int]:
        """Draw the next MixToken box (r0, c0, r1, c1) on the token grid from the model's generator."""
        return rand_mix_box(self.mix_token_rng, self.patch_grid, self.patch_grid)

    def set_attention(self, attn: str) -> None:
        """Switch every block to the attention backend ``attn`` ("auto" | "xformers" | "sdpa" | "triton" |
        "math")."""
        prepare_backend(attn)
        for blk in self.blocks:
            blk.attn.backend = attn

    @property
    def attn(self) -> str:
        return self.blocks[0].attn.backend if len(self.blocks) else "auto"

    def measure_attention(self, batch_size: int, dtype: torch.dtype, device, grad: bool = True) -> str | None:
        """Time "auto"'s backends now for this model's attention at ``batch_size`` ([batch_size, tokens, heads,
        head_dim] q of ``dtype``: the autocast dtype when training under autocast) and return the choice.

        A torch.compile trace cannot time anything: inside one, "auto" takes what an eager call measured for the
        shape, else "sdpa". Call this before compiling (``tokenlabel train`` does, for its training and eval
        batches). None when no block runs "auto"; "sdpa" off CUDA."""
        if not len(self.blocks) or self.attn != "auto":
            return None
        a = self.blocks[0].attn
        shape = (int(batch_size), self.patch_grid ** 2 + 1, a.num_heads, a.head_dim)
        return select_backend(shape, dtype, device, grad=grad)

    def set_impl(self, residual_norm: str | None = None, gelu: str | None = None) -> None:
        """How the blocks run; None keeps the current choice. Parameters and results are the same either way.

        ``residual_norm``: each residual add (drop path, 1 / skip_lam and the bias of attn.proj or mlp.fc2 folded in)
        and the LayerNorm after it: "torch" (the default: the modules as written, which torch.compile fuses its own
        way) or "triton" (one kernel per add + LayerNorm each way, ``tokenlabel.kernels.add_layernorm``).
        ``gelu``: each MLP's fc1 bias + GELU: "torch", "triton" (``tokenlabel.kernels.bias_gelu``) or "gemm" (in
        the epilogues of fc1's GEMM and of fc2's input-gradient GEMM: ``tokenlabel.kernels.linear_gelu``). The
        Triton paths run on CUDA or under TRITON_INTERPRET=1; elsewhere the torch path runs.
        """
        for name, value in (("residual_norm", residual_norm), ("gelu", gelu)):
            if value is not None and value not in BLOCK_IMPLS[name]:
                raise ValueError(f"{name} must be one of {', '.join(BLOCK_IMPLS[name])}, got {value!r}")
        # imported before any torch.compile trace
        if residual_norm == "triton":
            import tokenlabel.kernels.add_layernorm  # noqa: F401, PLC0415
        if gelu == "triton":
            import tokenlabel.kernels.bias_gelu  # noqa: F401, PLC0415
        if gelu == "gemm":
            import tokenlabel.kernels.linear_gelu  # noqa: F401, PLC0415
        self.residual_norm_impl = residual_norm or self.residual_norm_impl
        if gelu is not None:
            for blk in self.blocks:
                blk.mlp.gelu_impl = gelu

    @property
    def gelu_impl(self) -> str:
        return self.blocks[0].mlp.gelu_impl if len(self.blocks) else "torch"

    def _fused_residual_norm(self, x) -> bool:
        if self.residual_norm_impl != "triton" or not len(self.blocks):
            return False
        from tokenlabel.kernels.add_layernorm import INTERPRET  # noqa: PLC0415

        return x.is_cuda or INTERPRET

    def _blocks_fused(self, x, ckpt: bool):
        """The blocks and the final LayerNorm with every residual add fused into the LayerNorm that follows it (the
        block's norm2, the next block's norm1, the final norm): the final-norm tokens."""
        dev = x.device.type
        half = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        n = self.blocks[0].norm1(x)
        for i, blk in enumerate(self.blocks):
            last = i + 1 == len(self.blocks)
            # a Linear reads the normalised tokens next inside the blocks (bf16 under autocast, as it would cast
            # them); ``last``: the final norm's output keeps the stream's dtype
            step = partial(blk.forward_fused, next_norm=self.norm if last else self.blocks[i + 1].norm1,
                           out_dtype=half, last=last)
            x, n = checkpoint(step, x, n, use_reentrant=False) if ckpt else step(x, n)
        return n

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (non-reentrant checkpoint; drop-path masks are replayed)."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names without weight decay: pos_embed, cls_token and every 1-D parameter (norms, biases)."""
        return {"pos_embed", "cls_token"} | {n for n, p in self.named_parameters() if p.ndim <= 1}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """New cls head and aux head for ``num_classes`` (trunc-normal init, on the old heads' device)."""
        ref = self.head.weight
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
        self.aux_head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
        for m in (self.head, self.aux_head):
            self._init_weights(m)

    def flops_per_image(self, train: bool = True) -> float:
        """Matmul/conv FLOPs (2 per multiply-add) of one image; ``train`` counts backward as 2x forward.

        LV-ViT-S at 224: 13.1 GFLOP forward, 39.3 GFLOP per training image (elementwise ops excluded).
        """
        pe, N = self.patch_embed, self.patch_grid ** 2
        half = (self.img_size // 2) ** 2
        c, D = pe.conv1.out_channels, self.embed_dim
        macs = half * c * (pe.conv1.in_channels * 49 + 2 * c * 9) + N * c * (self.patch_size // 2) ** 2 * D
        T = N + 1
        for blk in self.blocks:
            hidden = blk.mlp.fc1.out_features
            macs += T * (4 * D * D + 2 * D * hidden) + 2 * T * T * D  # qkv + proj, MLP, q k^T and attn v
        macs += (1 + N) * D * self.num_classes  # head on the cls token, aux head on every patch token
        return 2.0 * macs * (3 if train else 1)

    # ---- forward -------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images must be [B, {self.in_chans}, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H != self.img_size or W != self.img_size:
            raise ValueError(
                f"images are {H}x{W} but the model was built for {self.img_size}x{self.img_size}: create it "
                f"with img_size={H} (load weights with resize_pos_embed=True to resize the position "
                f"embedding from {self.img_size}) or resize the images")

    def _encode(self, images, mix_mask=None):
        """(cls feature [B, D], patch features [B, N, D]) after the final LayerNorm, patches un-mixed."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, D]
        if mix_mask is not None:
            # MixToken after the stem, before the cls token and the position embedding; partner of b is B-1-b.
            x = torch.where(mix_mask, x.flip(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        if self._fused_residual_norm(x):
            x = self._blocks_fused(x, ckpt)
        else:
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
            x = self.norm(x)
        patches = x[:, 1:]
        if mix_mask is not None:
            # Swap the mixed tokens back so every patch token speaks about its own image (before aux_head,
            # which is per token, so the aux logits equal the reference's swapped-back ones).
            patches = torch.where(mix_mask, patches.flip(0), patches)
        return x[:, 0], patches

    def _tokens(self, images, mix_mask=None):
        cls, patches = self._encode(images, mix_mask)
        return torch.cat((cls[:, None], patches), dim=1)

    def forward_features(self, images: torch.Tensor, mix_box=None) -> torch.Tensor:
        """Final-LayerNorm tokens ``[B, 1 + N, D]`` (cls first; patch tokens un-mixed if ``mix_box``)."""
        self.check_images(images)
        mask = None if mix_box is None else mix_box_mask(mix_box, self.patch_grid, self.patch_grid, images.device)
        return self._tokens(images, mask)

    def forward_head(self, tokens: torch.Tensor):
        """(cls_logits [B, C], aux_logits [B, N, C]) from final tokens."""
        return self.head(tokens[:, 0]), self.aux_head(tokens[:, 1:])

    def _forward_train_core(self, images, mix_mask, aux_features: bool = False):
        cls, patches = self._encode(images, mix_mask)
        return self.head(cls), (patches if aux_features else self.aux_head(patches))

    def _forward_eval_core(self, images):
        cls, patches = self._encode(images)
        return self.head(cls) + 0.5 * self.aux_head(patches).max(dim=1).values

    # torch.compile(model) / model.compile(): this frame (host-side box draw) runs eagerly, and the
    # frames it calls (_forward_train_core, _forward_eval_core) are compiled, fullgraph included.
    @torch.compiler.disable(recursive=False)
    def forward_train(self, images: torch.Tensor, mix_box=None, aux_features: bool = False):
        """Training forward -> (cls_logits, aux_logits [B, N, C] un-mixed, mix_box).

        ``mix_box``: None draws a box when MixToken is on; a (r0, c0, r1, c1) tuple or an int tensor
        [4] uses that box (and is returned as given); ``False`` turns mixing off for this call.
        ``aux_features=True`` returns the final patch features ``[B, N, D]`` instead of the aux
        logits, for a loss that folds ``aux_head`` in (its weight is ``model.aux_head.weight``).
        """
        self.check_images(images)
        if mix_box is False or (mix_box is None and not self.mix_token):
            box, mask = None, None
        else:
            box = self.sample_mix_box() if mix_box is None else mix_box
            mask = mix_box_mask(box, self.patch_grid, self.patch_grid, images.device)
        cls, aux = self._forward_train_core(images, mask, aux_features)
        return cls, aux, box

    @torch.compiler.disable(recursive=False)
    def forward(self, images: torch.Tensor, mix_box=None, aux_features: bool = False):
        if self.training:
            return self.forward_train(images, mix_box, aux_features)
        self.check_images(images)
        return self._forward_eval_core(images)

    @torch.no_grad()
    def dense_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Per-token class logits ``[B, C, L, L]``: ``aux_head`` on every patch token (no MixToken)."""
        self.check_images(images)
        aux = self.aux_head(self._encode(images)[1])
        B, N, C = aux.shape
        return aux.transpose(1, 2).reshape(B, C, self.patch_grid, self.patch_grid)

"""One full training step (forward, loss, backward, AdamW) in images/s and MFU.

LV-ViT-S at 224, B=128, bf16 autocast, MixToken on, synthetic inputs already on the GPU (the loader
is out of the picture), per attention backend, eager and torch.compile; the baseline is a step built
like the reference (plain "math" attention, AMP bf16, the reference-style eager loss, no compile);
timm's vit_small_patch16_224 step for scale. FLOPs per image (training = 3x forward):
LV-ViT-S/224 39.9 GFLOP, ViT-S/16 27.6 GFLOP. MFU is given against a bf16 matmul peak measured on
this GPU and against the datasheet's dense bf16 peak.

With ``--data`` a further provider, ``loader_fed``, feeds the step from the real DALI loader and
reports the share of wall time spent waiting for data.
"""
from __future__ import annotations

import math
import os
import time

import torch

from .registry import Case, CheckFailed, Prepared, Skip, register, within
from .timing import StepGaps, sync

GFLOP_PER_IMAGE = {"lvvit_s": 39.9, "vit_small_patch16_224": 27.6}
SHAPES = {"S224": (dict(B=128, img=224, C=1000, S=18, k=5), ("bf16",))}
QUICK_SHAPES = {"tiny": (dict(B=2, img=32, C=10, S=4, k=2, depth=1, embed_dim=64, num_heads=2), ("bf16",))}
_OVERRIDES = ("depth", "embed_dim", "num_heads")


def _models():
    try:
        import tokenlabel.models as M
    except Exception as e:  # noqa: BLE001
        raise Skip(f"tokenlabel.models not importable: {type(e).__name__}: {e}")
    return M


def _loss_fn(kind):
    try:
        if kind == "fused":
            from tokenlabel.kernels import token_label_cross_entropy as fn
        else:
            from tokenlabel.kernels.reference import reference_style_loss as fn
    except Exception as e:  # noqa: BLE001
        raise Skip(f"loss {kind!r} not importable: {type(e).__name__}: {e}")
    return fn


def _lvvit(case: Case, attn: str):
    M = _models()
    p = case.params
    if attn == "xformers":
        ok, reason = M.xformers_status(case.device)
        if not ok:
            raise Skip(reason)
    if attn == "triton" and case.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise Skip("attn='triton' runs on CUDA (on the CPU only under TRITON_INTERPRET=1)")
    kw = {k: p[k] for k in _OVERRIDES if k in p}
    model = M.create_model("lvvit_s", num_classes=p["C"], attn=attn, img_size=p["img"], **kw)
    return model.to(case.device).train(), M


def _targets(case: Case, L: int):
    from .loss import make_inputs

    p = case.params
    x = make_inputs(p["B"], L * L, p["C"], p["S"], p["k"], torch.float32, case.device,
                    torch.Generator(device=case.device).manual_seed(1), logits=False)
    return {k: x[k] for k in ("label_values", "label_indices", "boxes", "flips")}


def _autocast(case):
    return torch.autocast(case.device.type, dtype=case.dtype, enabled=case.dtype != torch.float32)


def _lvvit_prepare(case: Case, attn: str, compile_: bool, loss_kind: str = "fused", fused_adamw=True,
                   loader=None, compile_mode: str | None = None, conv1_impl: str | None = None,
                   compile_options: dict | None = None, bn_impl: str | None = None,
                   residual_norm: str | None = None, gelu: str | None = None,
                   conv1_wgrad: str | None = None) -> Prepared:
    if compile_ and case.device.type != "cuda":
        raise Skip("torch.compile providers run on CUDA only (too slow to compile for a CPU smoke run)")
    model, M = _lvvit(case, attn)
    if conv1_impl is not None:  # how the stem's 7x7/2 conv runs (models.lvvit.PatchEmbed4_2.set_impl)
        model.patch_embed.set_impl(conv1=conv1_impl)
    if bn_impl is not None:  # how the stem's BatchNorm + ReLUs run
        model.patch_embed.set_impl(bn=bn_impl)
    if conv1_wgrad is not None:  # who computes the s2d conv1's weight gradient
        model.patch_embed.set_impl(conv1_wgrad=conv1_wgrad)
    # how the blocks' residual adds + the LayerNorms after them, and the MLPs' bias + GELU, run
    model.set_impl(residual_norm=residual_norm, gelu=gelu)
    loss_fn = _loss_fn(loss_kind)
    p = case.params
    B = p["B"]
    L = model.patch_grid
    images = torch.randn(B, 3, p["img"], p["img"], device=case.device)
    targets = _targets(case, L)
    opt = torch.optim.AdamW(M.param_groups(model, 0.05), lr=1e-4,
                            fused=bool(fused_adamw and case.device.type == "cuda"))
    if compile_ and compile_options:  # inductor options instead of a mode (torch.compile takes one or the other)
        model.compile(options=compile_options)
    elif compile_:
        model.compile(mode=compile_mode)
    graphs = compile_ and (compile_mode in ("reduce-overhead", "max-autotune")  # both replay CUDA graphs
                           or bool((compile_options or {}).get("triton.cudagraphs")))
    how = (f" options {compile_options}" if compile_options else f" mode={compile_mode}") + " (CUDA graphs)"
    notes = [f"attn={attn}", f"loss={loss_kind}",
             ("compiled" + (how if graphs else "")) if compile_ else "eager",
             "AdamW fused" if fused_adamw and case.device.type == "cuda" else "AdamW foreach",
             f"{case.dtype} autocast, MixToken on, drop path {_drop_path(model)}",
             f"stem conv1={model.patch_embed.conv1_resolved(case.device.type == 'cuda')}, "
             f"stem BatchNorm {model.patch_embed.bn_impl}, conv1 weight gradient {model.patch_embed.conv1_wgrad_impl}",
             f"residual + LayerNorm {model.residual_norm_impl}",
             f"bias + GELU {model.gelu_impl}", _cudnn_note(case)]
    if attn == "auto":
        from tokenlabel.models.attention import select_backend

        if _has_attn_dims(model):
            a = model.blocks[0].attn
            notes.append("auto -> " + select_backend((B, L * L + 1, a.num_heads, a.head_dim), case.dtype, case.device))

    def step(batch=None):
        x, t = (images, targets) if batch is None else (batch["images"], batch)
        if graphs:  # a new iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(case):
            cls, aux, box = model(x)
            loss = loss_fn(cls, aux, t["label_values"], t["label_indices"], t["boxes"], t["flips"], mix_box=box)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def check():
        # The first step (it compiles, when compiling) must give the loss an eager "math" model with
        # the same weights gives on the same inputs and MixToken box, within bf16 noise + drop path.
        ref_model, _ = _lvvit(case, "math")
        ref_model.load_state_dict(model.state_dict() if not compile_ else _orig(model).state_dict())
        box = _orig(model).sample_mix_box() if getattr(_orig(model), "mix_token", False) else None
        with torch.no_grad(), _autocast(case):
            cls, aux, _ = ref_model(images, mix_box=box if box is not None else False)
            ref = loss_fn(cls, aux, *(targets[k] for k in ("label_values", "label_indices", "boxes", "flips")),
                          mix_box=box)
        # with grad on, as in training: a compiled model reuses its training graph (no extra compile)
        with _autocast(case):
            cls, aux, _ = model(images, mix_box=box if box is not None else False)
            got = loss_fn(cls, aux, *(targets[k] for k in ("label_values", "label_indices", "boxes", "flips")),
                          mix_box=box)
        del ref_model
        loss = step()
        ref, got, first = float(ref.detach()), float(got.detach()), float(loss.detach())
        err = abs(got - ref) / max(abs(ref), 1e-12)
        if not (math.isfinite(first) and err <= 0.05):
            raise CheckFailed(f"loss {got:.5g} vs eager math model {ref:.5g} (rel {err:.3g} > 0.05); "
                              f"first training step loss {first:.5g}")
        return {"loss_vs_math": err}

    gflop = GFLOP_PER_IMAGE["lvvit_s"] if case.shape in SHAPES else None
    prep = Prepared(modes={"train_step": step}, check=check, items=B,
                    flops=gflop * 1e9 * B if gflop else None, mfu=bool(gflop),
                    notes="; ".join(notes) + (f"; {gflop} GFLOP/image (training)" if gflop else ""))
    if loader is not None:
        _attach_loader(prep, step, loader, case.device, whole_epochs=not case.quick)
    return prep


CUDA_SYNC = "auto"  # bench --cuda-sync: how the process waits for the GPU (set by the CLI before CUDA starts)


def _cudnn_note(case):
    """Whether cuDNN timed its convolution algorithms (``bench --cudnn-benchmark``) for this row, and how the process
    waits for the GPU (``bench --cuda-sync``)."""
    if case.device.type != "cuda":
        return "cuDNN n/a"
    return f"cuDNN benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}, CUDA sync {CUDA_SYNC}"


def _has_attn_dims(model):
    a = getattr(model.blocks[0], "attn", None) if hasattr(model, "blocks") else None
    return a is not None and hasattr(a, "num_heads") and hasattr(a, "head_dim")


def _orig(model):
    return getattr(model, "_orig_mod", model)


def _drop_path(model):
    ps = [m.p for m in model.modules() if type(m).__name__ == "DropPath"]
    return f"max {max(ps):g}" if ps else "off"


@register("step", "reference_style", baseline=True)
def reference_style(case: Case) -> Prepared:
    """Built like the reference: math attention, AMP bf16, reference-style eager loss, no compile, the plain conv1."""
    return _lvvit_prepare(case, "math", False, loss_kind="reference", fused_adamw=False, conv1_impl="conv")


# our kernels besides the attention: the stem's BatchNorm + ReLU, the residual adds + LayerNorm, fc1's bias + GELU,
# the stem conv1's weight gradient (since 2026-12-05 16:00 UTC: H100, 21.68 ms per step against 21.76 with cuDNN's;
# in the profile 168 us against cuDNN's 464)
OUR_BLOCK_KERNELS = dict(bn_impl="triton", residual_norm="triton", gelu="triton", conv1_wgrad="triton")


def _backend_provider(attn, compile_, mode=None, conv1_impl=None, options=None, bwd_impl="split", bn_impl=None,
                      residual_norm=None, gelu=None, conv1_wgrad=None):
    """attn="triton" providers pin the attention backward (``bwd_impl``), whatever an "auto" measured earlier in
    the process, so their rows say which kernel ran."""
    def fn(case: Case) -> Prepared:
        prep = _lvvit_prepare(case, attn, compile_, compile_mode=mode, conv1_impl=conv1_impl, compile_options=options,
                              bn_impl=bn_impl, residual_norm=residual_norm, gelu=gelu, conv1_wgrad=conv1_wgrad)
        if attn != "triton":
            return prep
        from tokenlabel.kernels import flash_attention as fa

        return within(prep, lambda: fa.use_bwd_impl(bwd_impl), f"attention backward: {bwd_impl}")
    fn.__doc__ = (f"LV-ViT-S, attn={attn}, fused loss, {'torch.compile' if compile_ else 'eager'}"
                  + (f" mode={mode}" if mode else "") + (f" options {options}" if options else "")
                  + (f", stem conv1={conv1_impl}" if conv1_impl else "")
                  + (f", stem BatchNorm {bn_impl}" if bn_impl else "")
                  + (f", residual + LayerNorm {residual_norm}" if residual_norm else "")
                  + (f", bias + GELU {gelu}" if gelu else "")
                  + (f", conv1 weight gradient {conv1_wgrad}" if conv1_wgrad else "")
                  + (f", attention backward {bwd_impl}" if attn == "triton" else ""))
    return fn


for _attn in ("math", "sdpa", "xformers", "triton", "auto"):
    register("step", f"eager_{_attn}")(_backend_provider(_attn, False))
for _attn in ("sdpa", "xformers", "triton", "auto"):
    register("step", f"compile_{_attn}")(_backend_provider(_attn, True))
# the compiled forward and backward replayed as CUDA graphs: the host no longer paces the GPU
register("step", "compile_graphs_auto")(_backend_provider("auto", True, "reduce-overhead"))
# the same with our flash attention forced (kernels/flash_attention.py: q, k, v read out of the qkv Linear's output,
# its gradient written whole) against cuDNN's through SDPA, whichever "auto" picks
register("step", "compile_graphs_sdpa")(_backend_provider("sdpa", True, "reduce-overhead"))
register("step", "compile_graphs_triton")(_backend_provider("triton", True, "reduce-overhead"))
register("step", "compile_graphs_triton_head")(_backend_provider("triton", True, "reduce-overhead", bwd_impl="head"))
# the stem's 3-channel 7x7/2 conv: the model's default ("auto") runs it on CUDA as a 16-channel 4x4/1 conv on a
# space-to-depth input; these run it explicitly one way or the other (the H200 profile in
# bench/results/step-profile-h200: the plain conv's forward and weight gradient took 1.24 ms of the 22.1 ms step;
# the rows of 2026-12-04 21:11 UTC: compile_graphs_auto, then still the plain conv, 22.17 ms; _s2d 21.43 ms)
register("step", "compile_graphs_auto_s2d")(_backend_provider("auto", True, "reduce-overhead", conv1_impl="s2d"))
register("step", "compile_graphs_auto_plainconv1")(_backend_provider("auto", True, "reduce-overhead",
                                                                     conv1_impl="conv"))
# the same with inductor's GEMM templates autotuned, pointwise ops fused into their epilogues (GELU after fc1):
# minutes of compile; the candidate for the GELU / bias / residual kernels of the step (models/NOTES.md)
register("step", "compile_autotune_auto")(_backend_provider("auto", True, "max-autotune"))
# reduce-overhead's CUDA graphs with inductor's coordinate-descent tuning of its own Triton kernels (block sizes and
# warps of the LayerNorm / GELU / BatchNorm / pointwise kernels, ~7.8 of the H200 step's 22.1 ms, running near 65% of
# the memory bandwidth); the GEMMs stay on cuBLAS. Not measured yet (models/NOTES.md, fifth session).
CDTUNE_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
register("step", "compile_graphs_auto_cdtune")(_backend_provider("auto", True, options=CDTUNE_OPTIONS))
# ... and with inductor's combo kernels: independent small kernels (the H200 profile's 312 "other" pointwise and
# reduction kernels, 1.27 ms, ~4 us each) launched as one where their sizes allow. Not measured yet.
COMBO_OPTIONS = {"triton.cudagraphs": True, "combo_kernels": True, "benchmark_combo_kernel": True}
register("step", "compile_graphs_auto_combo")(_backend_provider("auto", True, options=COMBO_OPTIONS))
# ... and with the stem's BatchNorm + ReLUs by kernels/batchnorm.py (inductor's BatchNorm kernels: 1.96 ms of the H200
# step, its reductions at ~26-43% of the memory bandwidth; the floor of the three is ~1.0 ms). Not measured yet.
register("step", "compile_graphs_auto_bnk")(_backend_provider("auto", True, "reduce-overhead", bn_impl="triton"))
# ... and with each block's residual adds fused with the LayerNorms after them (kernels/add_layernorm.py; inductor's
# LayerNorm kernels: 2.54 ms of the H200 step, ~37 us each where the bytes take 24-32 us). Measured 2026-12-05 before
# the CUDA-graph tiling sweep: 22.97 ms against 21.53 (kernels/NOTES.md); not rerun since.
register("step", "compile_graphs_auto_lnk")(_backend_provider("auto", True, "reduce-overhead",
                                                               residual_norm="triton"))
# ... and with each MLP's fc1 bias + GELU as one Triton kernel each way (kernels/bias_gelu.py; inductor's GELU
# kernels: 2.03 ms of the H200 step, the forward at ~54% of the bandwidth, GELU recomputed in the backward and fc1's
# bias gradient read separately). 2026-12-05, H200, with the swept tiling: 21.08 ms against 21.47.
register("step", "compile_graphs_auto_geluk")(_backend_provider("auto", True, "reduce-overhead", gelu="triton"))
# every kernel of ours at once: our flash attention (split backward), the stem's BatchNorm kernels, the fused
# residual + LayerNorm, bias + GELU, conv1's weight gradient (OUR_BLOCK_KERNELS: what `tokenlabel train` takes by
# default on CUDA; rows before 2026-12-05 16:00 UTC had cuDNN's conv1 weight gradient, as _cudnn_wgrad has now).
# 2026-12-05, H200, with the swept tilings: 19.90 ms against 21.47; with the H100 sweep's tilings 18.85 against 21.03.
register("step", "compile_graphs_ours")(_backend_provider("triton", True, "reduce-overhead", **OUR_BLOCK_KERNELS))
# ... the same with the attention backward as split2's two launches (new, not measured), and with cuDNN's attention
# through SDPA instead of ours (how much our attention adds or takes in the whole step)
register("step", "compile_graphs_ours_split2")(_backend_provider("triton", True, "reduce-overhead", bwd_impl="split2",
                                                                 **OUR_BLOCK_KERNELS))
# ... and with our attention's TMA kernels both ways ("tma": persistent programs loading by TMA), plain and with the
# forward warp-specialised (H100, 2026-12-05: 23.18 ms against compile_graphs_ours' 21.64 ms in the same call)
_ATTN_TMA = _backend_provider("triton", True, "reduce-overhead", bwd_impl="tma", **OUR_BLOCK_KERNELS)


@register("step", "compile_graphs_ours_attn_tma")
def compile_graphs_ours_attn_tma(case: Case) -> Prepared:
    """compile_graphs_ours with the attention forward and backward as flash_attention's "tma" kernels."""
    from tokenlabel.kernels import flash_attention as fa

    return within(_ATTN_TMA(case), fa.use_tma, "attention forward and backward: tma")


@register("step", "compile_graphs_ours_attn_tma_ws")
def compile_graphs_ours_attn_tma_ws(case: Case) -> Prepared:
    """compile_graphs_ours_attn_tma with the forward warp-specialised (flash_attention.TMA_WS)."""
    from tokenlabel.kernels import flash_attention as fa

    return within(_ATTN_TMA(case), lambda: fa.use_tma(fa.TMA_WS), f"attention: tma, {fa.TMA_WS}")


register("step", "compile_graphs_ours_sdpa")(_backend_provider("sdpa", True, "reduce-overhead", **OUR_BLOCK_KERNELS))
# ... and with inductor's combo kernels: the profile of compile_graphs_ours has 108 small pointwise kernels in the
# forward (the Linears' weights cast to bf16, transposed: 48 `triton_poi_fused__to_copy_t_7` alone) and 73 in the
# backward, 0.665 ms per step at ~3.7 us each; independent ones (the forward's casts read only parameters) can run
# as one launch. H100, against compile_graphs_ours in the same run: 21.50 / 21.74 ms (2026-12-05), 21.31 / 21.51
# (2026-12-06); `tokenlabel train --combo-kernels` takes the same options.
register("step", "compile_graphs_ours_combo")(_backend_provider("triton", True, options=COMBO_OPTIONS,
                                                                **OUR_BLOCK_KERNELS))
# ... and with cuDNN's weight gradient of the s2d conv1 instead of kernels/conv_wgrad.py (cuDNN's heuristics put it
# on a cutlass 5.x kernel: 464 us per step in the H100 profile, 454-480 in the H200 ones; ours 168 us on the H100).
# Until 2026-12-05 16:00 UTC this was compile_graphs_ours, and ours was the opt-in compile_graphs_ours_c1w (H100,
# 2026-12-05: 21.68 ms against 21.76; the tenth session: 0.06 ms apart).
register("step", "compile_graphs_ours_cudnn_wgrad")(_backend_provider(
    "triton", True, "reduce-overhead", **{**OUR_BLOCK_KERNELS, "conv1_wgrad": "cudnn"}))

# ... and with fc1's bias + GELU in the epilogue of fc1's GEMM and GELU's backward in the epilogue of fc2's
# input-gradient GEMM (kernels/linear_gelu.py, gelu="gemm"): pointer-load GEMMs (the MLP alone on an H100,
# 2026-12-05: 0.470 ms against 0.402 with cuBLAS + bias_gelu, so not expected to win), and the persistent TMA GEMMs
# (linear_gelu impl "tma"; not measured)
_MLP_GEMM = _backend_provider("triton", True, "reduce-overhead", **{**OUR_BLOCK_KERNELS, "gelu": "gemm"})
register("step", "compile_graphs_ours_mlp_gemm")(_MLP_GEMM)


@register("step", "compile_graphs_ours_mlp_tma")
def compile_graphs_ours_mlp_tma(case: Case) -> Prepared:
    """compile_graphs_ours_mlp_gemm with linear_gelu's persistent TMA GEMMs (impl "tma")."""
    from tokenlabel.kernels import linear_gelu as lg

    return within(_MLP_GEMM(case), lambda: lg.use_impl("tma"), "linear_gelu impl: tma")


@register("step", "compile_graphs_ours_mlp_tma_ws")
def compile_graphs_ours_mlp_tma_ws(case: Case) -> Prepared:
    """compile_graphs_ours_mlp_tma with the TMA GEMMs warp-specialised (linear_gelu.use_ws; not measured)."""
    from tokenlabel.kernels import linear_gelu as lg

    return within(_MLP_GEMM(case), lg.use_ws, f"linear_gelu warp-specialised: {lg.WS_TILING}")


def _timm(case: Case, compile_: bool) -> Prepared:
    if case.device.type != "cuda":
        raise Skip("timm ViT-S step runs on CUDA only")
    try:
        import timm
    except Exception as e:  # noqa: BLE001
        raise Skip(f"timm not importable: {type(e).__name__}: {e}")
    p = case.params
    B = p["B"]
    model = timm.create_model("vit_small_patch16_224", num_classes=p["C"]).to(case.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if compile_:
        model = torch.compile(model)
    images = torch.randn(B, 3, 224, 224, device=case.device)
    classes = torch.randint(0, p["C"], (B,), device=case.device)

    def step():
        with _autocast(case):
            loss = torch.nn.functional.cross_entropy(model(images), classes, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def check():
        loss = float(step())
        if not math.isfinite(loss):
            raise CheckFailed(f"timm step loss {loss}")
        return {}

    gflop = GFLOP_PER_IMAGE["vit_small_patch16_224"]
    return Prepared(modes={"train_step": step}, check=check, items=B, flops=gflop * 1e9 * B, mfu=True,
                    notes=f"timm {timm.__version__} vit_small_patch16_224, CE with smoothing 0.1, AdamW fused, "
                          f"{'compiled' if compile_ else 'eager'}; {_cudnn_note(case)}; {gflop} GFLOP/image (training)")


@register("step", "timm_vit_s_eager")
def timm_vit_s_eager(case: Case) -> Prepared:
    """timm vit_small_patch16_224 training step, eager."""
    return _timm(case, False)


@register("step", "timm_vit_s_compile")
def timm_vit_s_compile(case: Case) -> Prepared:
    """timm vit_small_patch16_224 training step, torch.compile."""
    return _timm(case, True)


def _fed_provider(setting: str, doc: str, kernels: bool = False, cuda_only: str | None = None):
    """A loader-fed step provider: the loader with bench/loader.py's ``setting`` (a dict of its loader arguments,
    looked up when the provider runs), our kernels in the step with ``kernels``; ``cuda_only``: why it skips
    without CUDA."""
    def fn(case: Case) -> Prepared:
        if cuda_only and case.device.type != "cuda":
            raise Skip(cuda_only)
        from . import loader

        return _loader_fed(case, kernels=kernels, **getattr(loader, setting))
    fn.__doc__ = doc
    return fn


_HW = "the hardware JPEG decoder needs CUDA"
register("step", "loader_fed")(_fed_provider(
    "HYBRID", "LV-ViT-S (attn auto, compiled with CUDA graphs on CUDA) fed by the real DALI loader, one pipeline on "
    "nvJPEG's hybrid path (the default before lanes): images/s and data-wait share."))
register("step", "loader_fed_ours")(_fed_provider(
    "HYBRID", "loader_fed (one hybrid pipeline) feeding the step with our kernels, as loader_fed_lanes_ours: whether "
    "the hybrid path alone keeps up with the faster step (H100, 2026-11-25: 2.0% GPU idle beside the torch step of "
    "then, 25.7 ms; ours is 21.7 ms).", kernels=True))
register("step", "loader_fed_hw")(_fed_provider(
    "HW_DECODER", "loader_fed with the DALI loader on nvJPEG's hardware decoder (90%, 8 threads: the loader bench's "
    "dali_hw), the configuration fastest alone.", cuda_only=_HW))
register("step", "loader_fed_lanes")(_fed_provider(
    "HW_LANES", "loader_fed with two DALI pipelines sharing the batches by what each delivers, one on nvJPEG's "
    "hardware engines and one on the hybrid path (the loader bench's dali_lanes).", cuda_only=_HW))
register("step", "loader_fed_lanes_ours")(_fed_provider(
    "HW_LANES", "loader_fed_lanes feeding the step as `tokenlabel train` runs it by default (attn auto and "
    "OUR_BLOCK_KERNELS): the faster step asks more of the loader. The default loader from 2026-12-05 to 2026-12-06.",
    kernels=True, cuda_only=_HW))
register("step", "loader_fed_lanes3")(_fed_provider(
    "HW_LANES3", "loader_fed_lanes with two hardware-engine pipelines beside the hybrid one (the loader bench's "
    "dali_lanes3).", cuda_only=_HW))
register("step", "loader_fed_lanes3_ours")(_fed_provider(
    "HW_LANES3", "loader_fed_lanes3 feeding the step with our kernels, as loader_fed_lanes_ours (H200, 2026-12-05: "
    "GPU idle 5.6 / 6.1% against the two lanes' 4.0 / 5.9%).", kernels=True, cuda_only=_HW))
register("step", "loader_fed_ours_deep")(_fed_provider(
    "HYBRID_DEEP", "loader_fed_ours with DALI preparing 4 batches ahead instead of 2, the default loader on CUDA "
    "before 'auto' (H100: 2.6% GPU idle against the lanes' 5.4% in the same call; 2026-11-25, 40 steps against "
    "the torch step: 1.8 / 2.1% at 4 against 5.3 / 4.8% at 2 in one call, 5.1 / 4.0% in another).",
    kernels=True))
register("step", "loader_fed_hybrid_lanes_ours")(_fed_provider(
    "HYBRID_LANES", "two hybrid pipelines (8 threads each, the loader bench's dali_hybrid_lanes) feeding the step "
    "with our kernels: while one pipeline's threads wait on its GPU work, the other's decode.", kernels=True))
register("step", "loader_fed_lanes_ours_deep")(_fed_provider(
    "HW_LANES_DEEP", "loader_fed_lanes_ours (the default lanes) with 4 batches prepared ahead per pipeline instead "
    "of 2.", kernels=True, cuda_only=_HW))
register("step", "loader_fed_auto_ours")(_fed_provider(
    "HW_AUTO", "the lanes with hw_decoder_load='auto' feeding the step with our kernels: the engines' pipeline is "
    "switched off while it delivers under its share of the batches (beside the step: ~30-40% on an H100), leaving the "
    "hybrid pipeline 4 ahead, run by the consumer itself as in loader_fed_ours_deep.", kernels=True, cuda_only=_HW))
register("step", "loader_fed_cpu_decode")(_fed_provider(
    "CPU_DECODE_GPU_RESIZE", "loader_fed with DALI decoding in its CPU threads and resizing each batch on the GPU "
    "(the loader bench's dali_cpu_decode_gpu_resize): no per-image decoder work on the GPU beside the step; the "
    "CIFAR configs' setting, here on full-size JPEGs, where the CPU's decoding rate decides.",
    cuda_only="resizes on the GPU: needs CUDA"))


def _loader_fed(case: Case, kernels: bool = False, **loader_kw) -> Prepared:
    """The step fed by the real loader, attn "auto"; ``kernels``: with OUR_BLOCK_KERNELS on CUDA (the train CLI's
    defaults there), else the torch modules."""
    data = case.options.get("data")
    if data is None:
        raise Skip("needs --data (a folder or .tar of JPEGs) to feed the step from the real loader")
    from .data import image_folder, label_store
    from .loader import make_loader

    root = image_folder(data, 4096)
    store = label_store(root, case.options.get("labels"))
    from dataclasses import replace

    from tokenlabel.dataloading import LabelStore

    case = replace(case, params={**case.params, "C": LabelStore.open(store).num_classes})  # the model fits the store
    p = case.params
    cuda = case.device.type == "cuda"
    # without CUDA the PIL loader feeds the step (a smoke run of the fed timing): the DALI settings are for the GPU
    loader = make_loader("dali" if cuda else "torch", root, store, p["B"], p["img"], case.device,
                         **(loader_kw if cuda else {}))
    ours = OUR_BLOCK_KERNELS if kernels and cuda else {}
    return _lvvit_prepare(case, "auto", cuda, loader=loader, compile_mode="reduce-overhead" if cuda else None, **ours)


def block_means(per_step: list[float], block: int = 8) -> list[float]:
    """Wall ms per step as means over blocks of ``block`` consecutive steps (the last block takes the rest).

    A fed step's single wall intervals are not its rate: the host alternates between a long wait in
    next() and steps that return at once (the loader hands over batches in bursts), so the median of
    single steps read 19.2 ms where the run took 27-31 ms per step (H100, 2026-11-25). Block means
    average those bursts out; their median is the rate and their spread the run's steadiness."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n = len(per_step)
    if n <= block:
        return [sum(per_step) / n] if n else []
    cut = list(range(0, n - n % block if n % block < block // 2 else n, block))
    out = []
    for i, start in enumerate(cut):
        end = cut[i + 1] if i + 1 < len(cut) else n
        out.append(sum(per_step[start:end]) / (end - start))
    return out


def _attach_loader(prep: Prepared, step, loader, device, whole_epochs: bool) -> None:
    """Time the step fed by ``loader``: wall time per step; the share of it the GPU's stream sat idle
    between steps (``data_wait_gpu``, see ``timing.StepGaps``); and the share the host spent blocked in
    next() (``data_wait``, which also counts GPU time of the previous step when the step is asynchronous)."""
    stats = {}

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()

    def timer(fn, warmup, reps):
        # a training run is mostly later epochs: the untimed steps cover the loader's first epoch (files
        # seen for the first time are probed and read then), and the timed ones at least one epoch
        n_epoch = len(loader) if whole_epochs else 1
        warmup, reps = max(1, warmup, n_epoch), max(reps, n_epoch)
        stats["warmup"] = warmup
        for _ in range(warmup):
            step(next(it))
        sync(device)
        gaps = StepGaps(device)
        lanes_before[:] = lane_snapshot(loader.backend)
        waits, per_step = [], []
        t_start = time.perf_counter()
        last = t_start
        for _ in range(reps):
            t0 = time.perf_counter()
            batch = next(it)
            waits.append(time.perf_counter() - t0)
            gaps.begin()
            step(batch)
            gaps.end()
            now = time.perf_counter()
            per_step.append((now - last) * 1e3)
            last = now
        idle_ms, span_ms = gaps.result()  # waits for the last step
        total = time.perf_counter() - t_start
        per_step[-1] += (time.perf_counter() - last) * 1e3  # the tail the wait covered
        stats["wait"] = 100.0 * sum(waits) / total
        stats["gpu_wait"] = 100.0 * idle_ms / max(span_ms, 1e-9)
        stats["n"] = reps
        stats["ms_run"] = 1e3 * total / reps
        lane_counts[:] = [a - b for a, b in zip(lane_snapshot(loader.backend), lanes_before)]
        return block_means(per_step)

    prep.timer = timer
    prep.check = None   # the same step is checked by the synthetic-input providers
    prep.notes += ("; fed by the real loader (data_wait_gpu = the step stream's idle time between steps / the "
                   "steps' span; data_wait = host time blocked in next(loader) / wall time)")
    from .loader import lane_rows, lane_snapshot

    lanes_before, lane_counts = [], []
    prep.extra_rows = lambda: lane_rows(loader.backend, lane_counts, "train_step") + [
        ("train_step", "data_wait_gpu", stats["gpu_wait"], None, None, "%",
         f"share of the steps' GPU span the step stream sat idle waiting for the next batch, over {stats['n']} steps "
         f"after {stats['warmup']} untimed ones"),
        # the run's own rate: the block means' median above can sit below the synthetic step's time when the
        # loader delivers in bursts (H200, 2026-12-05: 17.24 ms against 18.91 synthetic), this one cannot
        ("train_step", "ms_run", stats["ms_run"], None, None, "ms",
         f"wall ms per step over the whole timed run ({stats['n']} steps after {stats['warmup']} untimed ones): "
         "its total time / its steps"),
        ("train_step", "data_wait", stats["wait"], None, None, "%",
         f"share of wall time the host was blocked in next(loader) over {stats['n']} steps after {stats['warmup']} "
         "untimed ones")]


def yardsticks(device, quick: bool, context: dict) -> list[dict]:
    """The dense bf16 matmul rate measured on this GPU, which the MFU rows are computed against."""
    from . import timing

    n = 8192 if device.type == "cuda" else 256
    p50, p20, p80 = timing.matmul_peak_tflops(device, n)
    return [dict(provider="matmul_peak", mode="matmul", shape=f"{n}^3", dtype="bf16" if device.type == "cuda" else "fp32",
                 metric="TFLOP/s", p50=p50, p20=p20, p80=p80, unit="TFLOP/s",
                 notes="torch.matmul of two n x n matrices, 2n^3 FLOP; the measured peak of the MFU rows")]

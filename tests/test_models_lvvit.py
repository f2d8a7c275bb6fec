"""LV-ViT: parameter counts, shapes, MixToken, eval combination, backends, training, compile (CPU)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenlabel.models import LVViT, create_model, list_models, mix_box_mask, xformers_status

# The reference README's counts at 224 (reference §5), and its formula for any resolution.
README_M = {"lvvit_t": 8.53, "lvvit_s": 26.15, "lvvit_m": 55.83, "lvvit_l": 150.02}
ARCH = {"t": (12, 240, 64), "s": (16, 384, 64), "m": (20, 512, 64), "l": (24, 768, 128)}


def formula_params(size, img):
    depth, D, stem = ARCH[size]
    stem_params = 83_520 + 4_097 * D if stem == 64 else 314_496 + 8_193 * D
    N = (img // 16) ** 2
    return depth * (10 * D * D + 9 * D) + stem_params + D + (N + 1) * D + 2 * D + 2 * (1000 * D + 1000)


def tiny(gen, **kw):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    args = dict(num_classes=7, img_size=64, depth=2, embed_dim=48, num_heads=2, stem_channels=8,
                drop_path_rate=0.0, attn="sdpa")
    args.update(kw)
    return create_model("lvvit_t", **args)


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("lvvit")])
def test_param_counts_match_reference(name):
    size = name.split("_")[1]
    img = int(name.split("_")[2]) if name.count("_") == 2 else 224
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == formula_params(size, img)
    if img == 224:
        assert round(count / 1e6, 2) == README_M[name]
    assert model.patch_grid == img // 16 and model.img_size == img
    assert model.default_cfg["input_size"] == (3, img, img)


def test_reference_architecture_details():
    with torch.device("meta"):
        m = create_model("lvvit_l")
    blk = m.blocks[0]
    assert len(m.blocks) == 24 and blk.attn.num_heads == 12 and blk.skip_lam == 3.0
    assert blk.attn.qkv.bias is None and blk.attn.proj.bias is not None
    assert blk.mlp.fc1.out_features == 3 * 768
    assert m.patch_embed.conv1.out_channels == 128 and m.patch_embed.proj.kernel_size == (8, 8)
    dprs = [b.drop_path.p for b in m.blocks[1:]]
    assert np.allclose(dprs, np.linspace(0, 0.3, 24)[1:])
    nwd = m.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "head.bias", "patch_embed.bn1.weight"} <= nwd
    assert "blocks.0.attn.qkv.weight" not in nwd and "patch_embed.conv1.weight" not in nwd


def test_shapes_train_eval_and_dense(gen):
    m = tiny(gen)
    x = torch.randn(3, 3, 64, 64, generator=gen)
    cls, aux, box = m(x)
    assert cls.shape == (3, 7) and aux.shape == (3, 16, 7)
    assert isinstance(box, tuple) and len(box) == 4 and all(type(v) is int for v in box)
    m.eval()
    assert m(x).shape == (3, 7)
    assert m.dense_logits(x).shape == (3, 7, 4, 4)
    m.mix_token = False
    m.train()
    assert m(x)[2] is None
    assert create_model("lvvit_t", num_classes=5, img_size=64, depth=1, mix_token=False).train()(x)[2] is None


def reference_box(seed, h, w):
    """The reference's rand_bbox, written out again from reference §3."""
    rs = np.random.RandomState(seed)
    lam = rs.beta(1.0, 1.0)
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(h * cut_rat), int(w * cut_rat)
    cx, cy = rs.randint(h), rs.randint(w)
    return (int(np.clip(cx - cut_w // 2, 0, h)), int(np.clip(cy - cut_h // 2, 0, w)),
            int(np.clip(cx + cut_w // 2, 0, h)), int(np.clip(cy + cut_h // 2, 0, w)))


def test_mix_box_matches_reference_draws(gen):
    m = tiny(gen, img_size=96)  # 6 x 6 tokens
    x = torch.randn(2, 3, 96, 96, generator=gen)
    seeds = torch.randint(0, 2**31 - 1, (6,), generator=gen).tolist()
    for seed in seeds:
        m.seed_mix_token(seed)
        assert m(x)[2] == reference_box(seed, 6, 6)
    m.seed_mix_token(seeds[0])
    boxes = [m.sample_mix_box() for _ in range(50)]
    assert len(set(boxes)) > 5 and all(0 <= r0 <= r1 <= 6 and 0 <= c0 <= c1 <= 6 for r0, c0, r1, c1 in boxes)


def test_mixtoken_against_reference_recomputation(gen):
    m = tiny(gen)
    x = torch.randn(4, 3, 64, 64, generator=gen)
    box = (1, 0, 4, 3)
    cls, aux, ret = m(x, mix_box=box)
    assert ret == box
    # The reference's forward, step by step, on our modules.
    r0, c0, r1, c1 = box
    f = m.patch_embed(x)
    mixed = f.clone()
    mixed[:, :, r0:r1, c0:c1] = f.flip(0)[:, :, r0:r1, c0:c1]
    t = mixed.flatten(2).transpose(1, 2)
    t = torch.cat((m.cls_token.expand(4, -1, -1), t), 1) + m.pos_embed
    for blk in m.blocks:
        t = blk(t)
    t = m.norm(t)
    ref_cls = m.head(t[:, 0])
    a = m.aux_head(t[:, 1:]).reshape(4, 4, 4, -1)
    un = a.clone()
    un[:, r0:r1, c0:c1, :] = a.flip(0)[:, r0:r1, c0:c1, :]
    torch.testing.assert_close(cls, ref_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, un.reshape(4, 16, -1), rtol=1e-5, atol=1e-5)
    # The same box given as a tensor gives the same result.
    cls_t, aux_t, _ = m(x, mix_box=torch.tensor(box))
    torch.testing.assert_close(aux_t, aux)


def test_mixtoken_round_trip_token_wise_model(gen):
    # Without blocks every token is processed on its own: mixing then un-mixing must give back the
    # unmixed predictions exactly, whatever the box.
    m = tiny(gen, depth=0)
    x = torch.randn(5, 3, 64, 64, generator=gen)
    _, plain, _ = m(x, mix_box=False)
    for _ in range(4):
        cls, aux, box = m(x)
        torch.testing.assert_close(aux, plain, rtol=0, atol=0)
    # ...while the mixed tokens, before being swapped back, really differ inside the box.
    box = (0, 1, 3, 4)
    tokens = m.patch_embed(x).flatten(2).transpose(1, 2)
    tokens = torch.where(mix_box_mask(box, 4, 4, "cpu"), tokens.flip(0), tokens)
    t = m.norm(torch.cat((m.cls_token.expand(5, -1, -1), tokens), 1) + m.pos_embed)
    mixed = m.aux_head(t[:, 1:])
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[0:3, 1:4] = True
    inside = inside.flatten()
    assert not torch.allclose(mixed[:, inside], plain[:, inside])
    torch.testing.assert_close(mixed[:, ~inside], plain[:, ~inside])


def test_eval_combination(gen):
    m = tiny(gen).eval()
    x = torch.randn(3, 3, 64, 64, generator=gen)
    t = m.forward_features(x)
    cls, aux = m.head(t[:, 0]), m.aux_head(t[:, 1:])
    torch.testing.assert_close(m(x), cls + 0.5 * aux.max(dim=1).values)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backend_matches_math_forward_backward(gen, backend):
    """sdpa, and our Triton flash attention (interpreted on the CPU; heads of 24 here), against "math"."""
    m = tiny(gen, drop_path_rate=0.0)
    x = torch.randn(4, 3, 64, 64, generator=gen)
    results = {}
    for backend in ("math", backend):
        m.zero_grad()
        m.set_attention(backend)
        cls, aux, _ = m(x, mix_box=(0, 1, 2, 4))
        (cls.square().mean() + aux.square().mean()).backward()
        results[backend] = (cls, aux, {n: p.grad.clone() for n, p in m.named_parameters()})
    (c0, a0, g0), (c1, a1, g1) = results["math"], results[backend]
    torch.testing.assert_close(c1, c0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-6, msg=n)


def test_every_parameter_gets_a_gradient(gen):
    # DDP without find_unused_parameters needs both heads used in the train forward.
    m = tiny(gen, drop_path_rate=0.1)
    cls, aux, _ = m(torch.randn(2, 3, 64, 64, generator=gen))
    (cls.sum() + aux.sum()).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("attn", ["sdpa", "triton"])
def test_grad_checkpointing_same_gradients(gen, attn):
    m = tiny(gen, drop_path_rate=0.2, attn=attn)
    x = torch.randn(3, 3, 64, 64, generator=gen)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(seed)
        cls, aux, _ = m(x, mix_box=(1, 1, 3, 3))
        (cls.square().sum() + aux.square().sum()).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "triton"])
def test_bf16_autocast_cpu(gen, attn):
    m = tiny(gen, attn=attn)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    ref = m(x, mix_box=(0, 0, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, mix_box=(0, 0, 2, 2))
    assert out[1].dtype == torch.bfloat16
    (out[0].float().sum() + out[1].float().sum()).backward()
    torch.testing.assert_close(out[1].float(), ref[1], rtol=0.1, atol=0.1)


def _loss_grads(m, x, seed, autocast=False):
    torch.manual_seed(seed)  # the drop-path draws
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        cls, aux, _ = m(x, mix_box=(1, 0, 3, 2))
        loss = cls.float().square().mean() + aux.float().square().mean()
    return loss.detach(), {n: g for n, g in zip(
        [n for n, _ in m.named_parameters()], torch.autograd.grad(loss, list(m.parameters())))}


# the blocks' Triton paths (LVViT.set_impl): each alone and both
BLOCK_KERNELS = {"residual_norm": dict(residual_norm="triton"), "gelu": dict(gelu="triton"),
                 "both": dict(residual_norm="triton", gelu="triton"), "gemm": dict(gelu="gemm"),
                 "both_gemm": dict(residual_norm="triton", gelu="gemm")}
TORCH_BLOCKS = dict(residual_norm="torch", gelu="torch")


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kernels", list(BLOCK_KERNELS))
def test_block_kernels_match_torch(gen, kernels, ckpt):
    """set_impl(residual_norm="triton") (each residual add with drop path, 1 / skip_lam and the proj / fc2 bias
    fused with the LayerNorm after it) and set_impl(gelu="triton" | "gemm") (fc1's bias + GELU, in its own kernel or
    in the GEMMs' epilogues), interpreted on the CPU: the torch path's loss and every gradient (fp32, drop path on,
    the same draws), with and without activation checkpointing; eval too."""
    m = tiny(gen, drop_path_rate=0.3, depth=3)
    x = torch.randn(4, 3, 64, 64, generator=gen)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    m.set_grad_checkpointing(ckpt)
    results = []
    for impls in (TORCH_BLOCKS, BLOCK_KERNELS[kernels]):
        m.set_impl(**impls)
        results.append(_loss_grads(m, x, seed))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    m.eval()
    ref = m(x)
    m.set_impl(**TORCH_BLOCKS)
    torch.testing.assert_close(ref, m(x), rtol=1e-5, atol=1e-6)


def test_block_kernel_names_checked(gen):
    m = tiny(gen)
    with pytest.raises(ValueError, match="residual_norm must be one of torch, triton"):
        m.set_impl(residual_norm="apex")
    with pytest.raises(ValueError, match="gelu must be one of torch, triton"):
        m.set_impl(gelu="tanh")
    assert (m.residual_norm_impl, m.gelu_impl) == ("torch", "torch")  # nothing changed by the refused calls
    m.set_impl(gelu="triton")
    assert (m.residual_norm_impl, m.gelu_impl) == ("torch", "triton")


def test_fused_blocks_hand_bf16_to_the_linears_under_autocast(gen):
    """Under bf16 autocast with residual_norm="triton" every block's norm2 output (fc1's input) and every norm1
    output after the first (qkv's input) arrive in bf16, straight from the fused kernel, and the final norm's
    tokens in fp32 as nn.LayerNorm gives them (the heads' input)."""
    m = tiny(gen, depth=3)
    m.set_impl(residual_norm="triton")
    seen = {}

    def record(name):
        def hook(mod, args):
            seen.setdefault(name, args[0].dtype)
        return hook

    for i, blk in enumerate(m.blocks):
        blk.mlp.fc1.register_forward_pre_hook(record(f"fc1.{i}"))
        blk.attn.qkv.register_forward_pre_hook(record(f"qkv.{i}"))
    m.head.register_forward_pre_hook(record("head"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(2, 3, 64, 64, generator=gen))
    want = {f"fc1.{i}": torch.bfloat16 for i in range(3)} | {"qkv.1": torch.bfloat16, "qkv.2": torch.bfloat16,
                                                              "qkv.0": torch.float32, "head": torch.float32}
    assert seen == want


@pytest.mark.parametrize("kernels", ["residual_norm", "gelu", "both_gemm"])
def test_block_kernels_bf16_autocast(gen, kernels):
    """Under bf16 autocast (bf16 normalised tokens straight from the kernel, the stream in fp32; GELU's input and
    output in bf16, fc1's bias added in fp32): every gradient within 2x the torch path's distance from the fp32 run,
    plus bf16's rounding."""
    m = tiny(gen, drop_path_rate=0.2)
    x = torch.randn(3, 3, 64, 64, generator=gen)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    l32, g32 = _loss_grads(m, x, seed)
    err = {}
    for name, impls in (("torch", TORCH_BLOCKS), ("triton", BLOCK_KERNELS[kernels])):
        m.set_impl(**impls)
        loss, grads = _loss_grads(m, x, seed, autocast=True)
        err[name] = {n: float((grads[n] - g32[n]).abs().max() / g32[n].abs().max().clamp_min(1e-12)) for n in g32}
        err[name]["loss"] = float(abs(loss - l32) / abs(l32))
    eps = torch.finfo(torch.bfloat16).eps
    bad = {n: (err["triton"][n], err["torch"][n]) for n in err["torch"] if err["triton"][n] > 2 * err["torch"][n] + eps}
    assert not bad, bad


def test_block_kernels_under_compile(gen):
    """Both block kernels compiled fullgraph (the custom ops; aot_eager on the CPU) against the eager torch path:
    loss and gradients."""
    torch._dynamo.reset()
    m = tiny(gen)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    l0, g0 = _loss_grads(m, x, 0)
    m.set_impl(**BLOCK_KERNELS["both"])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    l1, g1 = _loss_grads(compiled, x, 0)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    for n in g0:
        torch.testing.assert_close(g1.get(n, g1.get("_orig_mod." + n)), g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_tiny_model_trains(gen):
    m = tiny(gen, num_classes=4, img_size=32, patch_size=8, drop_path_rate=0.0)  # 4 x 4 tokens
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 4, (8,), generator=gen)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):  # 12 steps fell short of -30% for about 1 seed in 30 (MixToken boxes); 20: none in 360
        cls, aux, box = m(x)
        # Soft CE with the MixToken-mixed cls target (reference §3.5) and per-token class targets.
        t = F.one_hot(y, 4).float()
        lam = 1.0 - (box[2] - box[0]) * (box[3] - box[1]) / 16
        t_cls = lam * t + (1 - lam) * t.flip(0)
        loss = -(t_cls * cls.log_softmax(-1)).sum(-1).mean() + F.cross_entropy(
            aux.reshape(-1, 4), y.repeat_interleave(16))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile", "torch.compile attn=triton"])
def test_compile_fullgraph_no_recompiles(gen, how):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    m = tiny(gen, attn="triton" if how.endswith("triton") else "sdpa")
    # A fixed box sequence (5 distinct boxes, 2 of them empty): with the model's random seed all 5 draws
    # coincide for ~4e-6 of seeds, and then "no recompile across boxes" would go unchecked.
    m.seed_mix_token(0)
    x = torch.randn(4, 3, 64, 64, generator=gen)
    if how.startswith("torch.compile"):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    else:  # in place: the MixToken box is drawn outside the compiled frames either way
        compiled = m
        m.compile(fullgraph=True, backend="aot_eager")
    counters.clear()
    boxes = []
    for _ in range(5):
        cls, aux, box = compiled(x)
        (cls.sum() + aux.sum()).backward()
        boxes.append(box)
        with torch.compiler.set_stance("force_eager"):
            ref = m(x, mix_box=box)
        torch.testing.assert_close(aux, ref[1], rtol=1e-5, atol=1e-5)
    assert len(set(boxes)) == 5  # a new box per call, none baked into the compiled graph
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"]
    m.eval()
    with torch.compiler.set_stance("force_eager"):
        ref = m(x)
    torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "triton"])
def test_ddp_single_process_gloo(gen, tmp_path, attn):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = DDP(tiny(gen, drop_path_rate=0.1, attn=attn))
        cls, aux, box = m(torch.randn(2, 3, 64, 64, generator=gen))
        (cls.sum() + aux.sum()).backward()
        assert all(p.grad is not None for p in m.parameters())
    finally:
        # the DDP wrapper (and the outputs' graph) must go before its process group: freed after
        # destroy_process_group, its Reducer drops the last reference to the group, whose destructor
        # joins gloo's worker thread while holding the GIL, and that thread needs the GIL to free its
        # last work item: a deadlock (2 of 7 pytest runs hung here for good)
        m = cls = aux = None
        dist.destroy_process_group()


def test_bad_input_messages(gen):
    with pytest.raises(ValueError, match="lvvit_s.*resnet_tiny|valid"):
        create_model("lvvit_x")
    with pytest.raises(ValueError, match="auto, xformers, sdpa, triton, math"):
        create_model("lvvit_t", attn="flash")
    with pytest.raises(ValueError, match="unknown override"):
        create_model("lvvit_t", widths=3)
    m = tiny(gen)
    with pytest.raises(ValueError, match=r"96x96.*64x64"):
        m(torch.randn(1, 3, 96, 96, generator=gen))
    with pytest.raises(ValueError, match="images must be"):
        m(torch.randn(1, 1, 64, 64, generator=gen))


@pytest.mark.skipif(xformers_status()[0], reason="xformers imports here")
def test_xformers_missing_says_why():
    with pytest.raises(RuntimeError, match="torch 2.10.*CUDA 12"):
        create_model("lvvit_t", attn="xformers", depth=1)
    assert isinstance(LVViT(img_size=32, depth=1, embed_dim=16, num_heads=2, attn="auto"), LVViT)


def test_timm_registry():
    timm = pytest.importorskip("timm")
    m = timm.create_model("lvvit_t", num_classes=10, img_size=64, depth=1)
    assert isinstance(m, LVViT) and m.num_classes == 10 and len(m.blocks) == 1


def test_flops_per_image_matches_reference_formula():
    # The reference's flops_computation.py (MACs, with a few elementwise terms): T 2.87G, S 6.57G, S@384 22.17G.
    with torch.device("meta"):
        for name, gmacs in (("lvvit_t", 2.87), ("lvvit_s", 6.57), ("lvvit_s_384", 22.17), ("lvvit_m", 12.74)):
            m = create_model(name)
            fwd = m.flops_per_image(train=False) / 2e9
            assert 0.98 * gmacs < fwd <= gmacs, (name, fwd)
            assert m.flops_per_image(train=True) == 3 * m.flops_per_image(train=False)


def test_deepcopy_for_ema(gen):
    import copy

    m = tiny(gen)
    ema = copy.deepcopy(m).eval()
    m.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    torch.testing.assert_close(ema(x), m(x))


def test_reset_classifier_and_heads(gen):
    m = tiny(gen)
    m.reset_classifier(3)
    cls, aux, _ = m(torch.randn(2, 3, 64, 64, generator=gen))
    assert cls.shape == (2, 3) and aux.shape == (2, 16, 3) and m.num_classes == 3
    assert m.get_classifier() is m.head


def test_aux_features_give_the_aux_logits(gen):
    # The fused aux-head loss takes the patch features; aux_head applied to them is the aux output.
    m = tiny(gen)
    x = torch.randn(3, 3, 64, 64, generator=gen)
    cls, aux, box = m(x, mix_box=(1, 1, 4, 3))
    cls_f, feats, box_f = m(x, mix_box=(1, 1, 4, 3), aux_features=True)
    assert feats.shape == (3, 16, 48) and box_f == box
    torch.testing.assert_close(m.aux_head(feats), aux)
    torch.testing.assert_close(cls_f, cls)


def test_attention_function_on_cpu(gen):
    from tokenlabel.models.attention import attention, attention_qkv, select_backend

    q, k, v = (torch.randn(2, 9, 3, 8, generator=gen, requires_grad=True) for _ in range(3))
    assert select_backend(q.shape, q.dtype, "cpu") == "sdpa"
    m = create_model("lvvit_t", img_size=32, attn="auto")
    assert m.measure_attention(2, torch.float32, "cpu") == "sdpa"  # nothing to time off CUDA
    m.set_attention("math")
    assert m.measure_attention(2, torch.float32, "cpu") is None
    out = attention(q, k, v, "auto")
    assert out.shape == (2, 9, 24)
    # Written out from the definition: softmax(q k^T / sqrt(Dh)) v per head, in float64 so that the
    # tolerance covers only the fp32 rounding of the function under test (against an fp32 reference
    # the two roundings added up to 0.86 of it in 1e5 seeds; against float64: 0.50)
    w = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()).div(8 ** 0.5).softmax(-1)
    ref = torch.einsum("bhnm,bmhd->bnhd", w, v.double()).reshape(2, 9, 24)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention(q, k, v, "math").double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention(q, k, v, "triton").double(), ref, rtol=1e-5, atol=1e-6)
    # the model's path: one qkv tensor, every backend
    qkv = torch.stack([q, k, v], dim=2).detach().reshape(2, 9, 72).requires_grad_()
    for backend in ("auto", "sdpa", "triton", "math"):
        torch.testing.assert_close(attention_qkv(qkv, 3, backend).double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_heads=5"):
        attention_qkv(qkv, 5)
    with pytest.raises(ValueError, match=r"\[B, N, H, Dh\]"):
        attention(q, k[:, :5], v)
    with pytest.raises(ValueError, match="valid: auto, xformers, sdpa, triton, math"):
        attention(q, k, v, "flash")


@pytest.mark.parametrize("name", list_models())
def test_shapes_all_variants_full_size_on_meta(name):
    # Full-size models, shapes only (meta tensors carry no data, so this is cheap on the CPU).
    with torch.device("meta"):
        m = create_model(name, num_classes=1000)
        x = torch.empty(2, 3, m.img_size, m.img_size)
        L = m.patch_grid
        out = m(x)
        m.eval()
        assert m(x).shape == (2, 1000)
        assert m.dense_logits(x).shape == (2, 1000, L, L)
    if name == "resnet_tiny":
        assert out.shape == (2, 1000) and L == m.img_size // 8
    else:
        cls, aux, box = out
        assert cls.shape == (2, 1000) and aux.shape == (2, L * L, 1000) and L == m.img_size // 16
        assert 0 <= box[0] <= box[2] <= L and 0 <= box[1] <= box[3] <= L


def test_auto_times_each_backend_with_the_host_ahead(monkeypatch, gen):
    """"auto"'s per-backend timing goes through bench.timing.time_calls with the host ahead of the GPU (the events
    then time the GPU's work, not launch latency, as the bench does) and returns the median of the calls; with
    gradients each call is forward + backward into the qkv Linear's output."""
    from tokenlabel.bench import timing
    from tokenlabel.models import attention as attn_mod

    seen = {}

    def fake_time_calls(fn, device, **kw):
        seen.update(kw, device=device)
        fn()
        return [3.0, 1.0, 2.0]

    monkeypatch.setattr(timing, "time_calls", fake_time_calls)
    qkv = torch.randn(2, 5, 3 * 2 * 4, generator=gen, requires_grad=True)
    assert attn_mod._time_backend("sdpa", qkv, 2, grad=True) == 2.0
    assert seen.get("host_ahead", True) is True and seen["device"] == qkv.device
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape

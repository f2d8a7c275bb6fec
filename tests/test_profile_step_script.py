"""scripts/profile_step.py: kernel names fall into the categories models/NOTES.md uses, the summary's arithmetic,
a CPU smoke run of a bench step provider writing its three files, and bad input refused with a message."""
import pytest

from script_helpers import load_script


def _script():
    return load_script("profile_step")


@pytest.mark.parametrize("name,cat", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "gemm"),
    ("cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "convolution"),
    ("triton_per_fused__to_copy_add_div_native_layer_norm_0", "layernorm"),
    ("triton_red_fused__native_batch_norm_legit_functional_1", "batchnorm"),
    ("triton_poi_fused_gelu_gelu_backward_2", "gelu"),
    ("triton_red_fused_sum_3", "fused reductions (inductor)"),
    ("triton_poi_fused_add_mul_4", "fused pointwise (inductor)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copies"),
    ("aten::mm", "gemm"),
    ("aten::native_layer_norm", "layernorm"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "gemm"),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)", "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)", "attention"),
    ("triton_poi_fused__native_batch_norm_legit_functional_convolution_backward_native_batch_norm_backward_1",
     "batchnorm"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_256x64_32x4_nhwc_align8>",
     "convolution"),
    ("_add_ln_bwd", "layernorm"),
    ("_bn_relu_bwd_apply", "batchnorm"),
    ("_bias_gelu_fwd", "gelu"),
    ("_sum_partials", "partial sums (ours)"),
    ("_attn_fwd", "attention"),
    ("something_else", "other"),
])
def test_categories(name, cat):
    assert _script().category(name) == cat


def test_annotations_are_not_kernels():
    ps = _script()
    assert ps.is_annotation("## Call CompiledFxGraph fu7v6hwbbvbrwxfj2unar5jtsiq4o5luv742unxkqavw5ofrfzr7 ##")
    assert ps.is_annotation("ProfilerStep#3")
    assert ps.is_annotation("Optimizer.step#AdamW.step")
    assert not ps.is_annotation("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN")
    assert not ps.is_annotation("triton_poi_fused_gelu_view_16")


def test_summary_arithmetic():
    ps = _script()
    text = ps.summarize([("nvjet_a", 3000.0), ("nvjet_a", 1000.0), ("triton_poi_fused_add_0", 4000.0)], 2, "GPU")
    assert "GPU per step: 4.000 ms over 2 steps (3 records)" in text
    lines = {l.split()[0]: l.split()[1:] for l in text.splitlines() if l.startswith(("gemm", "fused"))}
    assert lines["gemm"][:3] == ["2.000", "1.0", "50.0%"]
    with pytest.raises(ValueError):
        ps.summarize([], 0, "GPU")


def test_launchers_attribute_kernels_to_their_operators():
    """launchers(): kernel time grouped by category, then by the operator that launched it, per step."""
    from types import SimpleNamespace as NS

    ps = _script()
    reduce_k = "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>"
    events = [NS(name="aten::sum", kernels=[NS(name=reduce_k, duration=8.0)] * 4),
              NS(name="aten::mm", kernels=[NS(name="nvjet_sm90_tst_x", duration=30.0)] * 2),
              NS(name="aten::add_", kernels=[]), NS(name="ProfilerStep#1", kernels=None),
              NS(name="aten::copy_", kernels=[NS(name=reduce_k, duration=2.0)])]
    text = ps.launchers(events, 2)
    blocks = text.strip().split("\n\n")
    assert blocks[0].startswith("gemm: 0.030 ms per step") and "aten::mm" in blocks[0]
    other = blocks[1].splitlines()
    assert other[0] == "other: 0.017 ms per step"
    assert "0.016 ms     2.0/step  aten::sum" in other[1] and "aten::copy_" in other[2]
    assert "no kernel has a launching operator" in ps.launchers([NS(name="x", kernels=[])], 1)
    with pytest.raises(ValueError):
        ps.launchers(events, 0)


def test_cpu_smoke_run_and_bad_input(tmp_path, capsys):
    ps = _script()
    out = tmp_path / "p"
    assert ps.main(["--out", str(out), "--quick", "--device", "cpu", "--provider", "eager_sdpa",
                    "--warmup", "1", "--steps", "1"]) == 0
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("provider eager_sdpa, shape tiny")
    gemm = [l for l in summary.splitlines() if l.startswith("gemm ")]
    assert gemm and float(gemm[0].split()[1]) > 0            # the linears' aten::mm/addmm
    assert (out / "ops_by_shape.txt").stat().st_size > 0 and (out / "trace.json.gz").stat().st_size > 0
    assert "no kernel has a launching operator" in (out / "launchers.txt").read_text()  # a CPU run: no kernels
    capsys.readouterr()
    with pytest.raises(SystemExit, match="unknown provider 'nope'; valid: .*compile_graphs_auto"):
        ps.main(["--out", str(tmp_path / "q"), "--quick", "--device", "cpu", "--provider", "nope"])
    with pytest.raises(SystemExit, match="unknown shape 'S999'; valid: tiny"):
        ps.main(["--out", str(tmp_path / "q"), "--quick", "--device", "cpu", "--provider", "eager_sdpa",
                 "--shape", "S999"])
    with pytest.raises(SystemExit):
        ps.main(["--out", str(out), "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    before = (out / "summary.txt").read_text()
    with pytest.raises(SystemExit):  # the earlier profile stays
        ps.main(["--out", str(out), "--quick", "--device", "cpu", "--provider", "eager_sdpa"])
    assert "is not an empty folder" in capsys.readouterr().err and (out / "summary.txt").read_text() == before

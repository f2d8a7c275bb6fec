"""kernels/_common.py: the interpreter's fp32 -> bf16 conversion rounds as the GPU does (CPU: interpreted)."""
import pytest
import torch

from tokenlabel.kernels import _common


def test_interpreted_bf16_stores_round_to_nearest_even(gen):
    """A kernel storing fp32 values into bf16 gives torch's (and the GPU's cvt.rn) bits: halfway cases to even,
    carries into the exponent, signs, infinities, NaN, subnormals, and random values; Triton 3.6's interpreter
    alone truncated (1.3203117 -> 1.3125 instead of 1.3203125)."""
    if not _common.INTERPRET:
        pytest.skip("the interpreter's conversion (on the GPU the hardware rounds)")
    import triton
    import triton.language as tl

    @triton.jit
    def store_bf16(X, Y, N: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)

    special = [1.3203116900621779, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-12, 1.9999999, -1.3203116900621779,
               float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, 3.0e38, -2.5e-39]
    x = torch.cat([torch.tensor(special), torch.randn(1000, generator=gen) * 10 ** torch.randint(-30, 30, (1000,),
                                                                                                 generator=gen)])
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    store_bf16[(1,)](x, y, N=x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert _common.interpreter_rounds_bf16_to_nearest()  # idempotent: applied once at import

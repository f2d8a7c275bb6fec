"""StepGaps: the idle time between steps as the step stream sees it (wall clock on the CPU)."""
import time

import pytest
import torch

from tokenlabel.bench.timing import StepGaps


def _run(gaps, n, pause_s, work_s):
    for _ in range(n):
        time.sleep(pause_s)  # the "loader": nothing of the step is queued meanwhile
        gaps.begin()
        time.sleep(work_s)
        gaps.end()


def test_step_gaps_counts_only_time_between_steps():
    g = StepGaps(torch.device("cpu"))
    assert g.result() == (0.0, 0.0)
    _run(g, 4, 0.03, 0.01)
    idle, span = g.result()
    assert len(g) == 4
    # three gaps of at least 30 ms each; the pause before the first step is not inside the span
    assert idle >= 3 * 30.0 - 1e-6
    assert span >= idle + 4 * 10.0 - 1e-6
    g.reset()
    assert len(g) == 0 and g.result() == (0.0, 0.0)


def test_step_gaps_rejects_unbalanced_calls():
    g = StepGaps("cpu")
    with pytest.raises(RuntimeError, match="without begin"):
        g.end()
    g.begin()
    with pytest.raises(RuntimeError, match="twice"):
        g.begin()


@pytest.mark.gpu
def test_step_gaps_sees_a_stream_waiting_for_the_host():
    dev = torch.device("cuda")
    g = StepGaps(dev)
    x = torch.randn(2048, 2048, device=dev)
    for _ in range(3):
        torch.cuda.synchronize()
        time.sleep(0.02)  # the stream is empty while the host "loads": an idle gap of >= 20 ms
        g.begin()
        for _ in range(5):
            x = (x @ x).clamp_(-1, 1)
        g.end()
    idle, span = g.result()
    assert idle >= 2 * 20.0 * 0.9 and span > idle
    # host ahead (no sleep, no sync): the stream never runs dry between steps
    g.reset()
    torch.cuda._sleep(50_000_000)
    for _ in range(5):
        g.begin()
        x = (x @ x).clamp_(-1, 1)
        g.end()
    idle2, span2 = g.result()
    assert idle2 < 0.05 * span2


def test_block_means_give_the_fed_rate_not_single_steps():
    """A fed step alternates a long wait with an instant return: the single steps' median says 0.1 ms, the
    run took 30.05 ms per step; block means say the run's figure, and every step counts once."""
    import statistics

    from tokenlabel.bench.step import block_means

    per_step = [0.1, 60.0] * 16 + [0.1]
    blocks = block_means(per_step)
    assert statistics.median(per_step) == 0.1
    assert len(blocks) == 4 and abs(statistics.median(blocks) - 30.05) < 0.01
    assert abs(sum(b * n for b, n in zip(blocks, (8, 8, 8, 9))) - sum(per_step)) < 1e-9
    assert block_means([2.0, 4.0]) == [3.0] and block_means([]) == []
    assert block_means(list(range(21)), block=8)[-1] == sum(range(16, 21)) / 5  # a rest of >= half a block stands
    with pytest.raises(ValueError, match="block"):
        block_means([1.0], block=0)

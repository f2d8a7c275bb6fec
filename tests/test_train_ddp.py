"""DDP on CPU processes (gloo): the training step agrees with one process on the same global batch, and
`torchrun -m tokenlabel train` runs, writes from rank 0 only, and resumes on a different process count."""
import io
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from test_train_helpers import make_data, read_csv, tiny_args
from tokenlabel import train as T
from tokenlabel.cli import main

STEPS, B, C, L, K, S = 3, 4, 5, 2, 2, 6  # B samples per rank, 2 ranks -> global batch 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        n = 2 * B
        out.append({
            "images": torch.randn(n, 3, 32, 32, generator=g),
            "classes": torch.randint(0, C, (n,), generator=g),
            "label_values": torch.randn(n, K, S, S, generator=g).sort(1, descending=True).values.half(),
            "label_indices": torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(n * S * S)])
                                  .reshape(n, S, S, K).permute(0, 3, 1, 2).contiguous(),
            "boxes": torch.tensor([[0.1, 0.2, 0.7, 0.6]]).repeat(n, 1) + 0.05 * torch.rand(n, 4, generator=g),
            "flips": torch.rand(n, generator=g) < 0.5,
        })
    return out


def _cfg():
    cfg = dict(T.DEFAULTS, lr=1e-3, epochs=1, warmup_epochs=0.0, ema_decay=0.9, amp="fp32", clip_grad=1.0,
               mix_token=False)
    return cfg


def _model():
    from tokenlabel.models import create_model

    torch.manual_seed(0)
    return create_model("lvvit_t", num_classes=C, depth=1, embed_dim=32, num_heads=2, img_size=32,
                        drop_path_rate=0.0, mix_token=False, attn="math")


def _record_first_grads(tr):
    """Capture the gradients the optimizer's first step sees (both runs start from the same weights)."""
    got, step = {}, tr.optimizer.step

    def first(*a, **k):
        if not got:
            got.update({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    tr.optimizer.step = first
    return got


def _split(batch, rank, world=2):
    return {k: v[rank::world] for k, v in batch.items()}


def _ddp_worker(rank, port, seed, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        d = T.Dist(rank=rank, world=2, distributed=True)
        tr = T.Trainer(_cfg(), _model(), d, steps_per_epoch=STEPS, global_batch=2 * B)
        grads = _record_first_grads(tr)
        losses = []
        for i, batch in enumerate(_global_batches(seed)):
            tr.set_lr(i / STEPS)
            loss = tr.step([_split(batch, rank)])
            losses.append((T._all_reduce(loss.clone(), d) / 2).item())
        if rank == 0:  # as bytes: shared-memory tensors would die with this process
            buf = io.BytesIO()
            torch.save((losses, grads, tr.model.state_dict(), tr.ema.module.state_dict()), buf)
            q.put(buf.getvalue())
        # both ranks leave together: a rank tearing gloo down while its peer is still in the group
        # was seen to abort at exit (SIGABRT, "terminate called without an active exception")
        torch.distributed.barrier()
    finally:
        tr = None  # the DDP model goes before its process group (freed after it, gloo can hang)
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process(gen, monkeypatch):
    """Each rank takes half of every global batch; one process accumulating the same two halves must
    reach the same losses, weights and EMA (the mean of per-rank gradients is what DDP computes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager loss here: the kernel has its own tests
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, seed, q)) for r in range(2)]
    for p in procs:
        p.start()
    ddp_losses, ddp_grads, ddp_w, ddp_ema = torch.load(io.BytesIO(q.get(timeout=300)), weights_only=True)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    tr = T.Trainer(dict(_cfg(), accum_steps=2), _model(), T.Dist(), steps_per_epoch=STEPS, global_batch=2 * B)
    grads = _record_first_grads(tr)
    losses = []
    for i, batch in enumerate(_global_batches(seed)):
        tr.set_lr(i / STEPS)
        losses.append(tr.step([_split(batch, 0), _split(batch, 1)]).item())
    assert losses == pytest.approx(ddp_losses, rel=1e-5)
    # The first step's gradients (same weights on both sides) are the averaging check: they agree to the
    # summation order's rounding, <= 9.1e-7 of each parameter's largest gradient over 10 seeds. AdamW would
    # hide a wrong scale (sum instead of mean) in the weights; here it is a factor of 2.
    assert grads.keys() == ddp_grads.keys() and grads
    for k, g in grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(g, ddp_grads[k], rtol=0, atol=1e-5 * scale + 1e-12, msg=lambda m: f"{k}: {m}")
    # After 3 steps, single weights can differ by up to ~6e-4 (46 seeds): AdamW's first step is
    # lr * g / (|g| + 1e-8), so where a gradient element is ~1e-9 the rounding above moves that weight by up
    # to ~1e-4, and from the second step on some of the stem's gradients differ by up to 10%. So each
    # tensor is compared by how far it moved from the start: ||accumulation - DDP|| / ||accumulation - init||
    # was at most 4.6e-3 for the weights (46 seeds) and 5.4e-3 for the EMA (20 seeds); a rank that trained on
    # its own half of the batch gives >= 0.95 for both.
    init = _model().state_dict()
    for name, ours, theirs in (("weights", tr.model.state_dict(), ddp_w),
                               ("EMA", tr.ema.module.state_dict(), ddp_ema)):
        assert ours.keys() == theirs.keys()
        for k, v in ours.items():
            if k.endswith("num_batches_tracked"):
                continue
            if "running_" in k:  # DDP keeps rank 0's BN statistics (broadcast_buffers); accumulation saw both
                continue
            moved = (v - init[k]).norm().item()
            off = (v - theirs[k]).norm().item()
            assert off <= 0.05 * moved + 1e-12, f"{name} {k}: differs by {off:.3g}, moved {moved:.3g} from init"
    assert losses[0] != losses[-1]  # the weights moved


def test_torchrun_two_processes_then_resume_on_one(tmp_path):
    data = make_data(tmp_path / "data")  # 32 training images
    out = tmp_path / "run"
    args = tiny_args(data, out, "--max-steps", 3, "--log-every", 1)  # 2 x batch 4 = 8 -> 4 steps/epoch
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("NCCL_NVLS_ENABLE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tokenlabel",
           *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("stopped (max steps)") == 1, res.stdout  # rank 0 alone prints
    assert "2 process(es) (DDP) x batch 4 = 8" in res.stdout
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    st = ck["train_state"]
    assert (st["world_size"], st["samples_in_epoch"], st["global_step"]) == (2, 24, 3)
    assert ck["config"]["loader"] == "torch"
    # the same global batch on one process: batch 8, position 24 samples -> batch 3 of 4
    one = tiny_args(data, out, "--batch-size", 8, "--resume", "auto", "--log-every", 1)
    assert main(one) == 0
    rows = read_csv(out / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * 4 + 1))  # no step lost or repeated, one writer
    assert len(read_csv(out / "summary.csv")) == 2


def test_multicast_switches_default_off(monkeypatch):
    for k in T.MULTICAST_OFF:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "0")  # a user's own choice stays
    monkeypatch.setenv("WORLD_SIZE", "1")
    T.setup_distributed()  # one process: no group, no env changes needed
    assert "NCCL_NVLS_ENABLE" not in os.environ
    T.apply_multicast_defaults()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert os.environ["NVSHMEM_DISABLE_NVLS"] == "0"

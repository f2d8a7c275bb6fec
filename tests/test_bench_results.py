"""bench/: results writer/reader, table, plot, --compare and the provider registry (CPU, fast)."""
import math
import random

import pytest

from tokenlabel.bench import compare, registry, results
from tokenlabel.bench.plot import main as plot_main
from tokenlabel.bench.plot import plot_rows

ENV = {"gpu": "TestGPU", "torch": "2.x", "triton": "3.x", "dali": "", "xformers": "", "cuda": "12.8"}


def sample_rows(rng, date="2026-01-01T00:00:00Z", scale=1.0):
    rows = []
    for shape in ("S224", "C21841"):
        for prov, base in (("reference_eager", True), ("fused", False)):
            ms = rng.uniform(0.05, 9.0) * scale
            rows.append(results.make_row(ENV, date, op="loss", provider=prov, baseline=base, mode="fwd+bwd",
                                         shape=shape, dtype="bf16", metric="ms", p50=ms, p20=ms * 0.97,
                                         p80=ms * 1.05, unit="ms", notes="n=20, with \"quotes\", commas"))
            rows.append(results.make_row(ENV, date, op="loss", provider=prov, baseline=base, mode="fwd+bwd",
                                         shape=shape, dtype="bf16", metric="GB/s", p50=rng.uniform(10, 3000),
                                         unit="GB/s"))
    rows.append(results.make_row(ENV, date, op="loss", provider="fused_linear", mode="-", shape="S224",
                                 dtype="bf16", metric="status", notes="skipped: not available"))
    return rows


def test_round_trip(tmp_path):
    rng = random.Random()
    rows = sample_rows(rng)
    path = results.append_rows(tmp_path / "loss.csv", rows)
    results.append_rows(path, rows[:2])                      # appending keeps one header
    back = results.read_rows(path)
    assert len(back) == len(rows) + 2
    for a, b in zip(rows, back):
        assert set(b) == set(results.COLUMNS)
        for c in results.COLUMNS:
            if c in results.NUMERIC:
                if a[c] == "":
                    assert b[c] is None
                else:
                    assert math.isclose(b[c], a[c], rel_tol=1e-5)
            else:
                assert str(b[c]) == str(a[c]), c
    assert back[0]["baseline"] is True and back[2]["baseline"] is False


def test_bad_rows_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown result column"):
        results.make_row(ENV, "d", op="loss", speed=3)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected"):
        results.append_rows(other, sample_rows(random.Random()))
    with pytest.raises(ValueError, match="not a results CSV"):
        results.read_rows(other)
    with pytest.raises(ValueError, match="does not exist"):
        results.read_rows(tmp_path / "missing.csv")


def test_table_shows_each_provider(tmp_path):
    rows = sample_rows(random.Random())
    text = results.format_table(rows)
    assert "== loss" in text
    for name in ("reference_eager *", "fused", "fused_linear", "skipped: not available"):
        assert name in text
    assert text.count("\n") >= 6


def test_latest_keeps_newest(tmp_path):
    rng = random.Random()
    old = sample_rows(rng, date="2026-01-01T00:00:00Z")
    new = sample_rows(rng, date="2026-02-01T00:00:00Z")
    kept = results.latest(old + new)
    assert len(kept) == len(new)
    assert all(r["date"] == "2026-02-01T00:00:00Z" for r in kept)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = sample_rows(random.Random())
    png = plot_rows(rows, tmp_path / "loss.png", title="loss")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    csv = results.append_rows(tmp_path / "r" / "loss.csv", results.read_rows(results.append_rows(
        tmp_path / "tmp.csv", rows)))
    assert plot_main([str(csv)]) == 0
    assert (tmp_path / "r" / "loss.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="no timed rows"):
        plot_rows([r for r in rows if r["metric"] == "status"], tmp_path / "x.png")


def test_compare_two_files(tmp_path, capsys):
    rng = random.Random()
    old = sample_rows(rng, date="2026-01-01T00:00:00Z")
    new = [dict(r) for r in old]
    for r in new:
        r["date"] = "2026-02-01T00:00:00Z"
        if r["metric"] == "ms":
            r["p50"] = r["p50"] / 2          # twice as fast
    a = results.append_rows(tmp_path / "old.csv", old)
    b = results.append_rows(tmp_path / "new.csv", new)
    entries = compare.compare_rows(results.read_rows(a), results.read_rows(b))
    ms = [e for e in entries if e["metric"] == "ms"]
    assert len(ms) == 4
    assert all(math.isclose(e["ratio"], 0.5, rel_tol=1e-4) and e["better"] for e in ms)
    gbs = [e for e in entries if e["metric"] == "GB/s"]
    assert all(math.isclose(e["ratio"], 1.0, rel_tol=1e-4) and e["better"] is None for e in gbs)
    assert compare.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "-50.0% better" in out and "fused" in out
    assert "no (op, provider" in compare.format_comparison([])


@pytest.mark.parametrize("op", registry.OPS)
def test_registry_one_baseline(op):
    provs = registry.providers(op)
    assert len(provs) >= 2
    assert sum(p.baseline for p in provs) == 1
    assert provs[0].baseline and registry.baseline(op) is provs[0]
    assert len({p.name for p in provs}) == len(provs)


def test_registry_rejects_second_baseline_and_unknown_op():
    registry.providers("loss")
    with pytest.raises(ValueError, match="already has baseline"):
        registry.register("loss", "another_baseline", baseline=True)(lambda case: None)
    with pytest.raises(ValueError, match="op must be one of"):
        registry.register("nope", "x")
    assert "another_baseline" not in {p.name for p in registry.providers("loss")}


def _case(B=8):
    import torch

    return registry.Case(op="loss", shape="T", params={"B": B}, dtype=torch.float32, device=torch.device("cpu"))


def test_runner_check_failure_is_not_timed_and_oom_halves_batch():
    import torch

    from tokenlabel.bench.registry import CheckFailed, Prepared, Provider, Skip
    from tokenlabel.bench.runner import sweep

    calls = {"bad": 0, "oom": []}

    def bad(case):
        def fn():
            calls["bad"] += 1

        def check():
            raise CheckFailed("off by a lot")
        return Prepared(modes={"fwd": fn}, check=check)

    def oom(case):
        calls["oom"].append(case.params["B"])
        if case.params["B"] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return Prepared(modes={"fwd": lambda: sum(range(100))}, items=case.params["B"])

    def skip(case):
        raise Skip("no such GPU")

    base = Provider("loss", "base", lambda case: Prepared(modes={"fwd": lambda: sum(range(1000))}), baseline=True)
    provs = [base, Provider("loss", "bad", bad), Provider("loss", "oom", oom), Provider("loss", "skip", skip)]
    rows = sweep("loss", [_case(8)], provs, warmup=1, reps=3, gpu_name="cpu")
    assert calls["bad"] == 0
    status = {r["provider"]: r["notes"] for r in rows if r["metric"] == "status"}
    assert status["bad"].startswith("failed: correctness check failed") and "off by a lot" in status["bad"]
    assert status["skip"].startswith("skipped: no such GPU")
    assert calls["oom"] == [8, 4, 2]
    oom_rows = [r for r in rows if r["provider"] == "oom"]
    assert {r["metric"] for r in oom_rows} >= {"ms", "img/s", "speedup"}
    assert all("OOM at B=8" in r["notes"] and "B=2" in r["notes"] for r in oom_rows)
    assert [r["p50"] for r in rows if r["provider"] == "base" and r["metric"] == "speedup"] == [1.0]


def test_loader_quotes_step_rate_from_results_folder(tmp_path):
    from tokenlabel.bench import loader

    env = results.environment()
    rows = [results.make_row(env, "2026-01-01T00:00:00Z", op="step", provider=p, mode="train_step", shape="S224",
                             dtype="bf16", metric="img/s", p50=v, p20=v * 0.9, p80=v * 1.1, unit="img/s")
            for p, v in (("eager_sdpa", random.uniform(3000, 5000)), ("compile_auto", random.uniform(6000, 9000)),
                         ("timm_vit_s_compile", 20000.0))]
    results.append_rows(tmp_path / "step.csv", rows)
    got = loader.yardsticks(None, False, {"rows": [], "out_dir": tmp_path})
    assert len(got) == 1 and got[0]["p50"] == pytest.approx(rows[1]["p50"], rel=1e-5)
    assert "compile_auto" in got[0]["notes"]
    assert loader.yardsticks(None, False, {"rows": [], "out_dir": tmp_path / "none"}) == []


def test_attention_auto_vs_fastest_rows():
    from tokenlabel.bench import attention

    ms = {"math": random.uniform(2, 3), "sdpa": random.uniform(0.5, 1), "auto": random.uniform(0.5, 1.5)}
    current = [dict(provider=p, mode="fwd", shape="S224", dtype="bf16", metric="ms", p50=v) for p, v in ms.items()]
    current.append(dict(provider="xformers", mode="-", shape="S224", dtype="bf16", metric="status", p50=None))
    (row,) = attention.yardsticks(None, False, {"current": current})
    assert row["metric"] == "auto_vs_fastest" and row["p50"] == pytest.approx(ms["auto"] / ms["sdpa"])
    assert "sdpa" in row["notes"]


def test_loader_cifar_shapes_only_when_named(tmp_path):
    """The CIFAR loader shapes run only when --shapes names them; they build a C 10 / k 5 / S 8 random store
    (cifar128) or a loader without label maps (cifar64), and their batches pass the bench's check."""
    import torch

    from tokenlabel.bench import loader
    from tokenlabel.bench.cli import build_cases
    from tokenlabel.bench.registry import Case
    from tokenlabel.dataloading import LabelStore, make_synthetic_imagefolder

    cpu = torch.device("cpu")
    assert [c.shape for c in build_cases("loader", loader, False, None, None, "cpu", {})] == ["imagenet334"]
    named = build_cases("loader", loader, False, ["cifar128", "cifar64"], None, "cpu", {})
    assert {c.shape: (c.params["B"], c.params["img"]) for c in named} == {"cifar128": (512, 128), "cifar64": (1024, 64)}
    with pytest.raises(ValueError, match="only when named.*cifar128"):
        build_cases("loader", loader, False, ["cifar32"], None, "cpu", {})

    make_synthetic_imagefolder(tmp_path / "d", num_classes=2, per_class=6, size=40, seed=random.randrange(2**31))
    root = tmp_path / "d" / "train"
    small = dict(B=4, min_images=0, epochs=1)  # the named shapes' own keys, at a size the CPU runs quickly
    with_maps = Case(op="loader", shape="cifar128", params={**loader.NAMED_SHAPES["cifar128"][0], **small, "img": 32},
                     dtype=None, device=cpu, options={"data": str(root)})
    prep = loader.pil(with_maps)
    try:
        prep.check()
        from tokenlabel.bench.data import _CACHE, label_store

        assert ("store", str(root), 0, 10, 5, 8) in _CACHE  # the provider made its store with the shape's C, k, S
        store = LabelStore.open(label_store(root, None, num_classes=10, k=5, size=8))  # the provider's (cached)
        assert (store.num_classes, store.k, store.size, len(store)) == (10, 5, 8, 12)
        n, seconds = prep.modes["epoch"]()
        assert n == 8 and seconds > 0   # 3 batches of 4: the first one's arrival starts the clock
        assert "label maps k=5 S=8" in prep.notes
    finally:
        prep.cleanup()
    no_maps = Case(op="loader", shape="cifar64", params={**loader.NAMED_SHAPES["cifar64"][0], **small, "img": 24},
                   dtype=None, device=cpu, options={"data": str(root)})
    prep = loader.pil(no_maps)
    try:
        prep.check()
        assert "no label maps" in prep.notes
    finally:
        prep.cleanup()


def test_loader_lanes_provider_reports_each_pipelines_share(tmp_path):
    """bench loader's dali_lanes (two DALI pipelines sharing the batches; on the CPU with --quick) times its
    epochs and adds one row per pipeline with the share of the timed batches it delivered, summing to 100%."""
    pytest.importorskip("nvidia.dali")
    import torch

    from tokenlabel.bench import loader
    from tokenlabel.bench.registry import Case
    from tokenlabel.dataloading import make_synthetic_imagefolder

    make_synthetic_imagefolder(tmp_path / "d", num_classes=2, per_class=12, size=40, seed=random.randrange(2**31))
    case = Case(op="loader", shape="tiny", params=dict(loader.QUICK_SHAPES["tiny"][0]), dtype=None,
                device=torch.device("cpu"), quick=True, options={"data": str(tmp_path / "d" / "train")})
    prep = loader.dali_lanes(case)
    try:
        prep.check()
        assert "2 DALI pipelines sharing the batches" in prep.notes and "load 1 with 4 threads" in prep.notes
        times = prep.timer(prep.modes["epoch"], 0, 1)
        assert len(times) == 2 and all(t > 0 for t in times)
        rows = prep.extra_rows()
        assert [r[1] for r in rows] == ["lane0_share", "lane1_share"]
        assert sum(r[2] for r in rows) == pytest.approx(100.0)
    finally:
        prep.cleanup()
    with pytest.raises(Exception, match="needs CUDA"):
        loader.dali_lanes(Case(op="loader", shape="imagenet334", params={}, dtype=None, device=torch.device("cpu")))
    prep = loader.dali_lanes3(case)  # two engine pipelines + the hybrid one: a row per pipeline
    try:
        prep.timer(prep.modes["epoch"], 0, 1)
        assert [r[1] for r in prep.extra_rows()] == ["lane0_share", "lane1_share", "lane2_share"]
    finally:
        prep.cleanup()
    prep = loader.dali_hybrid_lanes(case)  # two hybrid pipelines of 8 threads: runs on the CPU too (no engines)
    try:
        assert "load 0 with 8 threads, 2 ahead + load 0 with 8 threads, 2 ahead" in prep.notes
        prep.timer(prep.modes["epoch"], 0, 1)
        assert sum(r[2] for r in prep.extra_rows()) == pytest.approx(100.0)
    finally:
        prep.cleanup()
    prep = loader.dali_auto(case)  # "auto": the lanes' rows, then the switch's share of batches while on, switches
    try:
        assert "'auto': the load-1 pipeline paused while it delivers under 40% of the last 32 batches" in prep.notes
        prep.timer(prep.modes["epoch"], 0, 1)
        rows = {r[1]: r[2] for r in prep.extra_rows()}
        assert set(rows) == {"lane0_share", "lane1_share", "auto_on_share", "auto_switches"}
        assert rows["lane0_share"] + rows["lane1_share"] == pytest.approx(100.0)
        assert 0.0 <= rows["auto_on_share"] <= 100.0 and rows["auto_switches"] >= 0
    finally:
        prep.cleanup()


def test_deeper_fed_settings_are_loader_arguments():
    """The fed providers' settings (prefetch 2 or 4, two hybrid pipelines) are arguments build_loader takes: a
    misspelt key would only fail on the GPU, after the device time was spent. The older one-pipeline rows keep 2
    batches ahead now that the default on CUDA is 4."""
    import inspect

    from tokenlabel.bench import loader
    from tokenlabel.bench.registry import providers
    from tokenlabel.dataloading import build_loader

    params = inspect.signature(build_loader).parameters
    for setting in (loader.HYBRID, loader.HW_DECODER, loader.HYBRID_DEEP, loader.HYBRID_LANES, loader.HW_LANES_DEEP,
                    loader.HW_AUTO):
        assert set(setting) <= set(params), set(setting) - set(params)
    assert loader.HYBRID["prefetch"] == loader.HW_DECODER["prefetch"] == 2 and loader.HYBRID_DEEP["prefetch"] == 4
    assert loader.HW_LANES_DEEP["prefetch"] == 4 and loader.HW_LANES_DEEP["hw_decoder_load"] == (1.0, 0.0)
    names = {p.name for p in providers("step")}
    assert {"loader_fed_ours_deep", "loader_fed_hybrid_lanes_ours", "loader_fed_lanes_ours_deep",
            "loader_fed_auto_ours"} <= names
    assert "dali_auto" in {p.name for p in providers("loader")}


@pytest.mark.parametrize("name", ["cdtune", "combo"])
def test_step_inductor_option_providers_take_inductor_options(name):
    """compile_graphs_auto_cdtune / _combo pass inductor options instead of a mode: torch.compile accepts their
    names (it checks them when the module is wrapped), and the providers are registered and need CUDA."""
    import torch

    from tokenlabel.bench import step
    from tokenlabel.bench.registry import Case, Skip, providers

    from torch._inductor import list_mode_options

    options = {"cdtune": step.CDTUNE_OPTIONS, "combo": step.COMBO_OPTIONS}[name]
    assert list_mode_options("reduce-overhead").items() <= options.items()  # the CUDA graphs kept
    torch.compile(torch.nn.Linear(2, 2), options=options)  # unknown names would raise here
    with pytest.raises(RuntimeError, match="Unexpected optimization option"):
        torch.compile(torch.nn.Linear(2, 2), options={**options, "coordinate_descent_tunning": True})
    prov = {p.name: p for p in providers("step")}[f"compile_graphs_auto_{name}"]
    with pytest.raises(Skip, match="CUDA only"):
        prov.fn(Case(op="step", shape="S224", params=dict(step.SHAPES["S224"][0]), dtype=torch.bfloat16,
                     device=torch.device("cpu")))


def test_within_runs_modes_and_check_inside_the_context():
    """registry.within: every timed mode and the check run inside the context (entered anew per call, left after
    it, also when the call raises), and the note joins the provider's notes."""
    import contextlib

    from tokenlabel.bench.registry import Prepared, within

    depth, seen = [0], []

    @contextlib.contextmanager
    def ctx():
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def boom():
        seen.append(("boom", depth[0]))
        raise RuntimeError("boom")

    prep = within(Prepared(modes={"a": lambda: seen.append(("a", depth[0])), "b": boom},
                           check=lambda: seen.append(("check", depth[0])), notes="x"), ctx, "variant y")
    prep.check()
    prep.modes["a"]()
    with pytest.raises(RuntimeError, match="boom"):
        prep.modes["b"]()
    assert seen == [("check", 1), ("a", 1), ("boom", 1)] and depth[0] == 0
    assert prep.notes == "x; variant y"
    assert within(Prepared(modes={}), ctx, "only").notes == "only"


def _rows_csv(path, rows, env=None):
    env = env or {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0", "dali": "", "xformers": "", "cuda": "13.0"}
    return results.append_rows(path, [results.make_row(env, r[0], op="step", provider=r[1], mode="train_step",
                                                       shape="S224", dtype="bf16", metric=r[2], p50=r[3],
                                                       notes=r[4] if len(r) > 4 else "") for r in rows])


def test_merge_appends_the_device_runs_new_rows(tmp_path, capsys):
    """bench.merge: the fetched file = local rows + new rows -> exactly the new rows appended (a quoted note with a
    comma and a newline kept intact); a killed run's partial rows appended unless a completed run wrote them."""
    from tokenlabel.bench import merge

    old = [("2026-12-01T00:00:00Z", "compile_graphs_auto", "ms", 21.43, "a, b")]
    new = [("2026-12-06T00:00:00Z", "compile_graphs_triton", "ms", 19.9, "line one\nline two"),
           ("2026-12-06T00:00:00Z", "compile_graphs_triton", "img/s", 6432.0)]
    local, fetched, partial = tmp_path / "step.csv", tmp_path / "fetched.csv", tmp_path / ".step.partial.csv"
    _rows_csv(local, old)
    _rows_csv(fetched, old + new)
    _rows_csv(partial, [new[1], ("2026-12-06T00:00:00Z", "compile_graphs_triton_head", "ms", 19.7)])
    assert merge.main([str(fetched), str(local), "--partial", str(partial)]) == 0
    rows = results.read_rows(local)
    assert [(r["provider"], r["metric"], r["p50"]) for r in rows] == [
        ("compile_graphs_auto", "ms", 21.43), ("compile_graphs_triton", "ms", 19.9),
        ("compile_graphs_triton", "img/s", 6432.0), ("compile_graphs_triton_head", "ms", 19.7)]
    assert rows[0]["notes"] == "a, b" and rows[1]["notes"] == "line one\nline two"
    assert "3 rows appended" in capsys.readouterr().out
    assert merge.main([str(fetched), str(fetched)]) == 0  # nothing new
    assert "0 rows appended" in capsys.readouterr().out
    first = tmp_path / "blocks.csv"  # an op's first device run: no committed file yet
    assert merge.main([str(fetched), str(first)]) == 0
    assert results.read_rows(first) == results.read_rows(fetched)
    assert first.read_text() == fetched.read_text()


def test_merge_refuses_a_file_the_device_did_not_start_from(tmp_path, capsys):
    from tokenlabel.bench import merge

    local, fetched = tmp_path / "step.csv", tmp_path / "fetched.csv"
    _rows_csv(local, [("2026-12-01T00:00:00Z", "a", "ms", 1.0), ("2026-12-02T00:00:00Z", "b", "ms", 2.0)])
    _rows_csv(fetched, [("2026-12-01T00:00:00Z", "a", "ms", 1.0), ("2026-12-03T00:00:00Z", "c", "ms", 3.0)])
    before = local.read_text()
    assert merge.main([str(fetched), str(local)]) == 2
    assert "is not a prefix" in capsys.readouterr().err and local.read_text() == before
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert merge.main([str(tmp_path / "other.csv"), str(local)]) == 2
    assert "not a results CSV" in capsys.readouterr().err
    assert merge.main([str(tmp_path / "missing.csv"), str(local)]) == 2
    assert "does not exist" in capsys.readouterr().err and local.read_text() == before

"""tokenlabel.bench: every implementation side by side (``tokenlabel bench``).

Two faces over one set of providers:

* the CLI (``tokenlabel bench {loss,attention,step,loader,all}``, module :mod:`.cli`): correctness
  check, timing, long-format CSV rows appended to ``bench/results/<op>.csv``, a table, one PNG per op;
* pytest-benchmark (``pytest bench/ --benchmark-only``, file ``bench/test_bench_ops.py``).

Module map: ``registry`` (providers by decorator, one baseline per op), ``timing`` (CUDA-event
quantiles, peak memory, copy bandwidth, matmul peak), ``runner`` (the sweep: check, time, derived
metrics, OOM halving), ``results`` (CSV rows, table), ``compare`` (change vs an earlier CSV),
``plot`` (PNG from CSV rows), and one module per op: ``loss``, ``attention``, ``step``, ``loader``.
"""

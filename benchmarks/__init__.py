"""The benchmarks, a package: run each script from the repository root as a module, e.g.
``python -m benchmarks.harness`` (the root then comes first on ``sys.path``, so the harness measures
this checkout's ``lightning_dsgd``, not an installed one).

* ``harness``: the benchmark page (docs/benchmarks.md): cost (``bench_cost``), profile
  (``bench_profile``), distributed runs (``bench_distributed``), quality (``bench_quality`` on the
  tasks of ``bench_tasks``), written by ``bench_report``; shared helpers in ``bench_common``;
* ``bench_polar``: the crossover table behind the matmul path's size threshold (docs/theory.md);
* ``callback_overhead``: the monitor's cost per step (docs/guide/callback.md).
"""

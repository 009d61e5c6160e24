"""Benchmarks: ``python -m bench.step`` (the cost of one distillation step, issue 5),
``python -m bench.quality`` (methods × seeds, issue 6), ``python -m bench.api_load`` (API and
SSE latency).

Why a separate package and not timed tests: timings depend on the machine, its load and the
card, so they are measured and recorded (``docs/performance.md``, ``docs/results.md``, with the
command, the machine and the versions) rather than asserted. The tests only check that the
benchmark machinery runs and reports a well-formed result (``tests/test_bench.py``,
``tests/test_quality.py``, ``tests/test_api_load.py``).

Layers inside: `configs` and `machine` (shared by both benchmarks) at the bottom; the `step`
and `quality` packages above them, each importing only downwards. Both reach sharp_core through
its public names only (issue 13; tests/test_bench.py checks it), so its internals can change
without breaking a benchmark.
"""

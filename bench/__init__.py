"""Benchmarks of the distillation step (issue 5): ``python -m bench.step --preset NAME``.

Why a separate package and not timed tests: timings depend on the machine, its load and the
card, so they are measured and recorded (``docs/performance.md``, with the command, the machine
and the versions) rather than asserted. The tests only check that the benchmark machinery runs
and reports a well-formed result (``tests/test_bench.py``).
"""

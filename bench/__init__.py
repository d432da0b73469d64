"""Benchmarks of DESIGN §8: ``python -m bench.e2e`` (end to end, against the real local stack)
and ``bench/test_micro.py`` (pytest-benchmark, no services). Outside the default pytest run."""

"""deer's benchmarks (pytest-benchmark suites, run explicitly: `pytest bench/bench_<op>.py`) and the report script."""

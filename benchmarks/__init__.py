"""Benchmarks of ghost-buildpackd against the real LXD and the tests' MongoDB (run with scripts/bench)."""

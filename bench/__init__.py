"""Benchmarks: scripts run by hand (python3 -m bench.NAME), results go to BENCHMARKS.md."""

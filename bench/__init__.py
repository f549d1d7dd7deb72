"""alignrl vs TRL benchmark harness: `python -m bench.compare`, the grid `python -m bench.grid` (BENCHMARKS.md)."""

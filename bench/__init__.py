"""alignrl vs TRL benchmark harness: `python -m bench.compare` (see BENCHMARKS.md)."""

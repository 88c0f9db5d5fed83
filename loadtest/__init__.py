"""Load generator and benchmarks of cortexlens (``python -m loadtest``; see loadtest/README.md)."""

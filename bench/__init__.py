"""fastmomentum's benchmarks and demos (run from the repository root: ``python -m bench.demo``)."""

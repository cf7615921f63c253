"""Development tooling, apart from the running worker (which never imports it): the benchmarks, the demo
with its local broker, sample images, the tiny test model and the docs' generated configuration table."""

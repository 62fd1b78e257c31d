"""Benchmarks behind ``python -m vpd_ray.bench <name>``; each module has a ``main(argv)``."""

"""Benchmarks behind ``python -m vpd_ray.bench``; each module has ``main(argv) -> int``."""

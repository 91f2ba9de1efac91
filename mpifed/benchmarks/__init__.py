"""Benchmarks behind `mpifed bench ...` and the scripts in bench/."""

"""Benchmarking: one engine per subprocess, methods compared within one run."""

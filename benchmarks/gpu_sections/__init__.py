"""Sections of benchmarks/gpu_suite.py, one module per op."""

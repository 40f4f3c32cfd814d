"""Helpers of benchmarks/serving_peers.py: the workload, the driver processes, the report."""

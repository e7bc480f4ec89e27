"""Experiment suites: named grids of params overrides with seeds, run as real pipeline runs and
compared in MLflow."""

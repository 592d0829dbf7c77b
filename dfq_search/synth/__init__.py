"""Synthetic samples from P alone: BN-statistics hooks, sample losses, generators, direct optimisation."""

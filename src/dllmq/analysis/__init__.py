"""Activation analysis: outlier profiling and its plots."""

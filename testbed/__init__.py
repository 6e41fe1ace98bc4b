"""Reference testbed: a small adaLN-Zero DiT trained on scikit-learn's digits, its samplers and metrics.

It exists to measure the caching engine honestly; nothing in `calibration/` depends on it.
"""

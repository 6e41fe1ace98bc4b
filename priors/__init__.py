"""Calibration prior files (safetensors + provenance metadata)."""

"""Prior files: format, validation against a run, model fingerprints and summaries. Pure torch; never imports comfy."""

from .fingerprint import model_fingerprint
from .format import PriorFile, PriorFileError, file_hash, load_priors, read_metadata, save_priors
from .validate import PriorMismatch, check_model, check_policy, check_schedule, run_warnings

__all__ = [
    "PriorFile",
    "PriorFileError",
    "PriorMismatch",
    "check_model",
    "check_policy",
    "check_schedule",
    "file_hash",
    "load_priors",
    "model_fingerprint",
    "read_metadata",
    "run_warnings",
    "save_priors",
]

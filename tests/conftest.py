import sys
from pathlib import Path

import pytest
import torch

from calibrated_cache.testbed.model import DiT, DiTConfig

sys.path.insert(0, str(Path(__file__).parent))  # helpers shared by test modules and scripts (prior_cases.py)


@pytest.fixture(scope="session")
def random_dit() -> DiT:
    """A randomly initialised testbed DiT with non-zero gates, so every block really contributes."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(patch=2, width=64, depth=6, heads=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model

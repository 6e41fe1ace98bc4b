import os
import sys
from pathlib import Path

# Few threads for the whole session (default 1; CC_TEST_THREADS overrides), set before torch is imported and inherited
# by the subprocesses tests start: on a 2-core machine shared with another busy process, OpenMP workers contending for
# the cores made the default tier take 28 minutes instead of under 3 (issue 31); one thread per process avoids that.
THREADS = max(1, int(os.environ.get("CC_TEST_THREADS", "1")))
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

from calibrated_cache.testbed.model import DiT, DiTConfig  # noqa: E402

torch.set_num_threads(THREADS)
sys.path.insert(0, str(Path(__file__).parent))  # helpers shared by test modules and scripts (prior_cases.py)
pytest_plugins = ("ci_skips",)  # the tiers' skip rules: needs_gpu, CC_NO_SKIPS=1, the per-tier count


@pytest.fixture(scope="session")
def random_dit() -> DiT:
    """A randomly initialised testbed DiT with non-zero gates, so every block really contributes."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(patch=2, width=64, depth=6, heads=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model

"""The test tiers' skip rules, as a pytest plugin (tests/conftest.py loads it; `-p ci_skips` loads it elsewhere).

* ``@pytest.mark.needs_gpu("why")`` skips a test on a machine without CUDA: the only skip CI allows.
* With ``CC_NO_SKIPS=1`` (set by .ci/run) any other skip is a failure, whether a test skips or a whole module skips at
  collection (a missing browser, say), so CI cannot pass with part of a tier silently left out. A module marked
  ``comfyui_tier`` that was not collected for want of ComfyUI (tests/comfyui/conftest.py) belongs to the other tier
  and is not counted as a skip of this one.
* At the end, with ``CC_NO_SKIPS=1`` or ``CC_TIER`` set, one line counts the run: ``tier NAME: ...`` (NAME from
  ``CC_TIER``, default "tests"); it is also appended to the file ``CC_TIER_SUMMARY`` names, where .ci/run collects
  one line per tier run.
"""

from __future__ import annotations

import os

import pytest

NO_SKIPS_ENV, TIER_ENV, SUMMARY_ENV = "CC_NO_SKIPS", "CC_TIER", "CC_TIER_SUMMARY"
GPU, OTHER_TIER = "needs_gpu", "comfyui_tier"
_KEY = pytest.StashKey[dict]()


def strict() -> bool:
    return os.environ.get(NO_SKIPS_ENV) == "1"


class SkippedAtCollection(pytest.Item):
    """Stands in, when skips are failures, for a module that skipped while being collected: it fails with the reason,
    and the rest of the tier still runs."""

    def __init__(self, *, reason: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self) -> None:
        pytest.fail(f"the module skipped ({self.reason}); with {NO_SKIPS_ENV}=1 (CI) a skip is a failure",
                    pytrace=False)

    def reportinfo(self):
        return self.path, None, f"{self.path.name} (skipped at collection)"


def _reason(longrepr) -> str:
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{GPU}(why): needs a CUDA GPU; skipped without one, the one skip CI allows")
    config.addinivalue_line("markers", f"{OTHER_TIER}: a ComfyUI-tier module not collected in this run (no ComfyUI)")
    config.stash[_KEY] = {GPU: 0, OTHER_TIER: 0}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        mark = item.get_closest_marker(GPU)
        if mark is not None and not _gpu_available():
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU ({mark.args[0] if mark.args else 'CUDA'}); this "
                                                    "machine has none"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        if item.get_closest_marker(GPU) is not None and not _gpu_available():
            item.config.stash[_KEY][GPU] += 1
        elif strict():
            report.outcome = "failed"
            report.longrepr = f"skipped ({_reason(report.longrepr)}); with {NO_SKIPS_ENV}=1 (CI) a skip is a failure"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    if report.skipped:
        if collector.get_closest_marker(OTHER_TIER) is not None:
            collector.config.stash[_KEY][OTHER_TIER] += 1
        elif strict():
            report.outcome, report.result = "passed", [
                SkippedAtCollection.from_parent(collector, name="skipped_at_collection",
                                                reason=_reason(report.longrepr))]
            report.longrepr = None
    return report


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if not strict() and TIER_ENV not in os.environ:
        return
    line = summary(os.environ.get(TIER_ENV, "tests"), terminalreporter.stats, config.stash[_KEY])
    terminalreporter.write_line(line)
    if os.environ.get(SUMMARY_ENV):
        with open(os.environ[SUMMARY_ENV], "a") as out:
            out.write(line + "\n")


def summary(tier: str, stats: dict, allowed: dict) -> str:
    """`tier NAME: 10 passed, 0 failed, 0 errors, 1 skipped (allowed: 1 needs a GPU)`, and the modules of the other
    tier that were not collected. Collection reports are not tests: only test reports are counted."""
    def tests(key: str) -> int:
        return sum(1 for r in stats.get(key, []) if getattr(r, "when", None) in ("setup", "call", "teardown"))

    line = (f"tier {tier}: {tests('passed')} passed, {tests('failed')} failed, {len(stats.get('error', []))} errors, "
            f"{tests('skipped')} skipped (allowed: {allowed[GPU]} needs a GPU)")
    other = allowed[OTHER_TIER]
    if other:
        line += f"; {other} ComfyUI-tier module{'s' if other != 1 else ''} not collected (no COMFYUI_PATH)"
    return line

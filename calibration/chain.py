"""Correctors applied one after another at each reuse site, e.g. GOC's push, then TCC priors fitted with it active.

Each link sees the previous link's output as the value to correct; every link is told the value finally used, which
is what GOC's gradient must be taken from.
"""

from __future__ import annotations

from torch import Tensor

from .calibrator import Calibrator, Reused, Site


class Chain(Calibrator):
    """Behaves as one calibrator: it needs what any link needs, and costs what the links that acted cost."""

    def __init__(self, links: list[Calibrator]) -> None:
        self.links = links
        self.flops = 0.0

    @property
    def reference(self) -> bool:  # a fit's reference run turns into cache-side runs: ask every time
        return any(link.reference for link in self.links)

    @property
    def records_anchors(self) -> bool:
        return any(link.records_anchors for link in self.links)

    def anchor(self, sites: list[Site], values: list[Tensor]) -> None:
        for link in self.links:
            if link.records_anchors:
                link.anchor(sites, values)

    @property
    def anchors(self) -> int:
        return max(link.anchors for link in self.links)

    @property
    def needs_truth(self) -> bool:
        return any(link.needs_truth for link in self.links)

    @property
    def nbytes(self) -> int:
        return sum(link.nbytes for link in self.links)

    def start(self) -> None:
        for link in self.links:
            link.start()

    def forget(self, roles: tuple[str, ...]) -> None:
        for link in self.links:
            link.forget(roles)

    def observe(self, site: Site, value: Tensor) -> None:
        for link in self.links:
            link.observe(site, value)

    def calibrate(self, sites: list[Site], reused: Reused) -> Tensor:
        value, self.flops = reused.value, 0.0
        for link in self.links:
            out = link.calibrate(sites, Reused(value, reused.anchors, reused.truth if link.needs_truth else None))
            if out is not value:
                self.flops += link.flops
            value = out
        return value

    def settle(self, sites: list[Site], value: Tensor) -> None:
        for link in self.links:
            link.settle(sites, value)


def chained(first: Calibrator | None, then: Calibrator | None) -> Calibrator | None:
    """`first` then `then`, either of which may be absent."""
    links = [c for c in (first, then) if c is not None]
    return links[0] if len(links) == 1 else Chain(links) if links else None

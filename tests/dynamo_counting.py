"""A dynamo backend for the compile tests (both tiers): it runs each graph as traced and counts what it compiled."""

from __future__ import annotations

from typing import Any, Callable

import torch


class Counting:
    """Counts the graphs dynamo compiles and the calls they get."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1

        def run(*args: Any) -> Any:
            self.calls += 1
            return gm.forward(*args)

        return run

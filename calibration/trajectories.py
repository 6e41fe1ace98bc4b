"""Reference trajectories of every block site, kept as Gram matrices over steps: what the plan search reads.

A weighted forecaster's value at step s is Σ_a w_a·v(a) over anchor steps a, so its squared error against the
computed value is wᵀG[A, A]w − 2wᵀG[A, s] + G[s, s] with G[i, j] = ⟨v(i), v(j)⟩ summed over samples and branches:
one S × S matrix per block answers every plan and forecaster exactly. Values larger than `SKETCH` elements are
count-sketched first (a fixed random hash and sign per element), which keeps inner products unbiased and the memory
at `SKETCH` floats per site, step and branch, whatever the latent size (in CPU memory: about 1.4 GB for Flux's 57
blocks at 28 steps with CFG).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .calibrator import Calibrator, Reused, Site

SKETCH = 1 << 16


class Sketcher:
    """Flattens a value, count-sketched to `dims` entries when it is larger."""

    def __init__(self, dims: int = SKETCH) -> None:
        self.dims = dims
        self._hashes: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def __call__(self, value: Tensor) -> Tensor:
        flat = value.detach().reshape(-1).float()
        if flat.numel() <= self.dims:
            return flat
        key = (flat.numel(), flat.device)
        if key not in self._hashes:
            gen = torch.Generator(device="cpu").manual_seed(flat.numel())
            index = torch.randint(0, self.dims, (flat.numel(),), generator=gen)
            sign = torch.randint(0, 2, (flat.numel(),), generator=gen).float() * 2 - 1
            self._hashes[key] = index.to(flat.device), sign.to(flat.device)
        index, sign = self._hashes[key]
        return flat.new_zeros(self.dims).index_add_(0, index, flat * sign)


class TrajectoryRecorder(Calibrator):
    """Reference runs of a plan that computes only the first step: the engine computes every block, hands this
    recorder the first step's values through `anchor` and every later one through `observe`. Each run's values are
    folded into per-site Grams (float64, on the CPU) when the next run starts or `grams()` is asked for."""

    reference = True
    records_anchors = True

    def __init__(self, steps: int, sketcher: Sketcher | None = None, outputs: bool = False) -> None:
        """`outputs`: record the model's output too (block -1), for plans that forecast whole steps."""
        self.steps = steps
        self.records_output = outputs
        self.sketch = sketcher or Sketcher()
        self._run: dict[tuple[int, str, str], dict[int, Tensor]] = {}
        self._grams: dict[tuple[int, str], Tensor] = {}
        self.elements: dict[tuple[int, str], int] = {}  # per sample and branch

    def start(self) -> None:
        self._fold()

    def anchor(self, sites: list[Site], values: list[Tensor]) -> None:
        for site, value in zip(sites, values):
            self._keep(site, value)

    def observe(self, site: Site, value: Tensor) -> None:
        self._keep(site, value)

    def _keep(self, site: Site, value: Tensor) -> None:
        # kept in CPU memory until the run ends: every site at every step, SKETCH floats each at most
        self._run.setdefault((site.block, site.name, site.role), {})[site.step] = self.sketch(value).cpu()
        self.elements[(site.block, site.name)] = value[0].numel()

    def calibrate(self, sites: list[Site], reused: Reused) -> Tensor:
        raise RuntimeError("a trajectory recorder only observes reference runs")

    def _fold(self) -> None:
        for (block, name, _), values in self._run.items():
            if len(values) != self.steps:  # a site computed on every step (or dropped mid-run) has no trajectory
                continue
            x = torch.stack([values[s] for s in range(self.steps)]).to("cpu", torch.float64)
            gram = x @ x.T
            key = (block, name)
            self._grams[key] = self._grams[key] + gram if key in self._grams else gram
        self._run = {}

    def grams(self) -> dict[int, Tensor]:
        """Per block, the Gram of its sites summed (a skipped block misses all of them at once)."""
        self._fold()
        out: dict[int, Tensor] = {}
        for (block, _), gram in self._grams.items():
            out[block] = out[block] + gram if block in out else gram.clone()
        return out

    def block_elements(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (block, _), n in self.elements.items():
            out[block] = out.get(block, 0) + n
        return out

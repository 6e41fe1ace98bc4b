"""Procedural text-to-image data: small RGB scenes of coloured shapes on textured or gradient backgrounds, each with a
short prompt over a fixed vocabulary. Seeded and made on the fly; nothing is downloaded.

A scene is drawn from a prompt *spec* (what the prompt promises), so the evaluator can check an image against it:
- single:   "a large red triangle"            one object of that colour, shape and size
- relation: "a red triangle left of a blue circle"   both objects, the first's centre clearly on that side
- count:    "three yellow squares"             exactly that many objects of that colour and shape

Images are 32×32, RGB in [−1, 1], rendered at 4× and box-filtered, so edges are anti-aliased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

SIZE = 32
SUPER = 4
COLORS = {"red": (0.90, 0.15, 0.15), "green": (0.15, 0.75, 0.20), "blue": (0.20, 0.30, 0.95),
          "yellow": (0.95, 0.88, 0.15), "purple": (0.62, 0.20, 0.85), "white": (0.97, 0.97, 0.97)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 4.0, "large": 6.5}  # radius in pixels
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis: 0 x / 1 y, sign)
NUMBERS = {"two": 2, "three": 3}
KINDS = (("single", 0.4), ("relation", 0.4), ("count", 0.2))
MARGIN = 6.0  # pixels between the centres along a relation's axis
PAIRS = [(c, s) for c in COLORS for s in SHAPES]  # the evaluator's 18 (colour, shape) classes


@dataclass
class Thing:
    color: str
    shape: str
    radius: float
    x: float
    y: float


@dataclass
class Spec:
    kind: str
    objects: list[tuple[str, str]]  # (colour, shape) the prompt names, in order
    size: str | None = None  # single
    relation: str | None = None  # relation
    count: int = 1  # count
    prompt: str = ""
    things: list[Thing] = field(default_factory=list)  # what was drawn


def prompt_of(spec: Spec) -> str:
    if spec.kind == "single":
        (c, s), = spec.objects
        return f"a {spec.size} {c} {s}"
    if spec.kind == "relation":
        (c1, s1), (c2, s2) = spec.objects
        return f"a {c1} {s1} {spec.relation} a {c2} {s2}"
    (c, s), = spec.objects
    word = next(w for w, n in NUMBERS.items() if n == spec.count)
    return f"{word} {c} {s}s"


def random_spec(g: torch.Generator) -> Spec:
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    r = float(torch.rand((), generator=g))
    kind = "single" if r < KINDS[0][1] else "relation" if r < KINDS[0][1] + KINDS[1][1] else "count"
    if kind == "single":
        spec = Spec(kind, [(pick(list(COLORS)), pick(SHAPES))], size=pick(list(SIZES)))
    elif kind == "relation":
        first = (pick(list(COLORS)), pick(SHAPES))
        second = first
        while second == first:
            second = (pick(list(COLORS)), pick(SHAPES))
        spec = Spec(kind, [first, second], relation=pick(list(RELATIONS)))
    else:
        spec = Spec(kind, [(pick(list(COLORS)), pick(SHAPES))], count=pick(list(NUMBERS.values())))
    spec.prompt = prompt_of(spec)
    return spec


def place(spec: Spec, g: torch.Generator, tries: int = 200) -> list[Thing]:
    """Objects for a spec: inside the frame, not overlapping, a relation's centres MARGIN apart on its axis."""
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    for _ in range(tries):
        if spec.kind == "single":
            (c, s), = spec.objects
            radii = [SIZES[spec.size] * uniform(0.9, 1.1)]
            kinds = [(c, s)]
        elif spec.kind == "relation":
            kinds = spec.objects
            radii = [uniform(3.5, 6.0) for _ in kinds]
        else:
            kinds = spec.objects * spec.count
            radii = [uniform(3.0, 4.5)] * spec.count
        things = [Thing(c, s, r, uniform(r + 1, SIZE - r - 1), uniform(r + 1, SIZE - r - 1))
                  for (c, s), r in zip(kinds, radii)]
        if any(math.hypot(a.x - b.x, a.y - b.y) < a.radius + b.radius + 1.5
               for i, a in enumerate(things) for b in things[i + 1:]):
            continue
        if spec.kind == "relation":
            axis, sign = RELATIONS[spec.relation]
            a, b = ((t.x, t.y)[axis] for t in things)
            if sign * (a - b) < MARGIN:
                continue
        return things
    raise RuntimeError(f"could not place {spec.prompt!r}")


def background(g: torch.Generator) -> Tensor:
    """Muted, low-saturation: a linear gradient between two greys-with-a-tint, or a smooth texture."""
    base = 0.25 + 0.3 * torch.rand(2, 1, generator=g)
    tint = base + 0.06 * (torch.rand(2, 3, generator=g) - 0.5)
    if float(torch.rand((), generator=g)) < 0.5:
        angle = 2 * math.pi * float(torch.rand((), generator=g))
        coords = torch.linspace(-1, 1, SIZE)
        ramp = (math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]) * 0.5 + 0.5
        return tint[0][:, None, None] * (1 - ramp) + tint[1][:, None, None] * ramp
    coarse = torch.rand(1, 1, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=True)[0, 0]
    smooth = smooth.clamp(0, 1)
    return tint[0][:, None, None] * (1 - smooth) + tint[1][:, None, None] * smooth


def mask(thing: Thing) -> Tensor:
    """Coverage of one shape on the 32×32 grid, from a 4× supersampled inside test."""
    n = SIZE * SUPER
    centres = (torch.arange(n) + 0.5) / SUPER
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    dx, dy, r = x - thing.x, y - thing.y, thing.radius
    if thing.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif thing.shape == "square":
        half = r * 0.85
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    else:  # an upright equilateral triangle with its centroid at the centre
        inside = (dy <= 0.5 * r) & (2 * dx.abs() <= (dy + r) * 1.1547)
    return torch.nn.functional.avg_pool2d(inside.float()[None, None], SUPER)[0, 0]


def render(things: list[Thing], g: torch.Generator) -> Tensor:
    image = background(g)
    for thing in things:
        cover = mask(thing)
        colour = torch.tensor(COLORS[thing.color])[:, None, None]
        image = image * (1 - cover) + colour * cover
    return image * 2 - 1


def scenes(n: int, seed: int) -> tuple[Tensor, list[Spec]]:
    """n scenes from one seed: images (n, 3, 32, 32) in [−1, 1] and their specs (prompt and objects drawn)."""
    g = torch.Generator().manual_seed(seed)
    images, specs = [], []
    for _ in range(n):
        spec = random_spec(g)
        spec.things = place(spec, g)
        images.append(render(spec.things, g))
        specs.append(spec)
    return torch.stack(images), specs


def prompts(n: int, seed: int) -> list[Spec]:
    """n prompt specs without images (what a benchmark samples from)."""
    g = torch.Generator().manual_seed(seed)
    return [random_spec(g) for _ in range(n)]


def targets(specs: list[Spec]) -> tuple[Tensor, Tensor]:
    """Per scene and (colour, shape) class: how many were drawn (0–3), and their mean centre in [0, 1]² (0 if none)."""
    counts = torch.zeros(len(specs), len(PAIRS), dtype=torch.long)
    centres = torch.zeros(len(specs), len(PAIRS), 2)
    for i, spec in enumerate(specs):
        for t in spec.things:
            k = PAIRS.index((t.color, t.shape))
            counts[i, k] += 1
            centres[i, k] += torch.tensor([t.x, t.y]) / SIZE
    centres /= counts.clamp_min(1)[..., None]
    return counts, centres

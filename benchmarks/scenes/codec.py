"""The stand-ins for a VAE and a text encoder, fixed and documented, so that the benchmark model sees latents and text
contexts of the shapes a Flux model takes.

Pixels ↔ latent (the VAE's place): a 32×32×3 image in [−1, 1] is folded 2×2 into 12 channels at 16×16
(pixel_unshuffle), mapped by a fixed orthonormal 16×12 matrix Q into 16 channels, scaled by 2 and set in ComfyUI's
Flux latent convention, `latent = 2·Q·fold(image) / 0.3611 + 0.1159`, whose `process_in` (`(latent − 0.1159)·0.3611`)
gives the model `2·Q·fold(image)`, about unit variance. Decoding is the exact inverse on Q's span (QᵀQ = I).

Prompt → context (the text encoder's place): each word of the fixed vocabulary has a fixed random embedding
(seeded, 64-dimensional, unit variance), plus a sinusoidal position code, since Flux gives text tokens no position of
their own (its txt_ids are zero) and "a red circle left of a blue square" needs word order. Prompts are padded to 8
tokens with a zero embedding; the empty prompt (the negative branch of CFG) is all padding. The pooled vector is the
mean of the prompt's word embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import COLORS, NUMBERS, RELATIONS, SHAPES, SIZES

LATENT_CHANNELS, CONTEXT_DIM, TOKENS = 16, 64, 8
SCALE, SHIFT = 0.3611, 0.1159  # comfy.latent_formats.Flux
GAIN = 2.0
WORDS = ["a", *SIZES, *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBERS,
         *{w for r in RELATIONS for w in r.split()}]
VOCAB = {w: i for i, w in enumerate(sorted(set(WORDS)))}


def _fixed(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


Q = torch.linalg.qr(_fixed(1, LATENT_CHANNELS, 12))[0]  # 16×12, orthonormal columns
EMBED = _fixed(2, len(VOCAB), CONTEXT_DIM)
POSITION = torch.stack([torch.tensor([math.sin(p / 10 ** (2 * (i // 2) / CONTEXT_DIM) + (i % 2) * math.pi / 2)
                                      for i in range(CONTEXT_DIM)]) for p in range(TOKENS)]) * 0.5


def encode(images: Tensor) -> Tensor:
    """(n, 3, 32, 32) in [−1, 1] → (n, 16, 16, 16) latents in ComfyUI's Flux convention."""
    folded = torch.nn.functional.pixel_unshuffle(images.float(), 2)
    return torch.einsum("ck,nkhw->nchw", Q, folded) * (GAIN / SCALE) + SHIFT


def decode(latents: Tensor) -> Tensor:
    folded = torch.einsum("ck,nchw->nkhw", Q, (latents.float() - SHIFT) * (SCALE / GAIN))
    return torch.nn.functional.pixel_shuffle(folded, 2)


def model_input(images: Tensor) -> Tensor:
    """What the diffusion model sees of an image: `process_in(encode(image))`."""
    return (encode(images) - SHIFT) * SCALE


def tokens(prompt: str) -> list[int]:
    words = prompt.split()
    unknown = [w for w in words if w not in VOCAB]
    if unknown or len(words) > TOKENS:
        raise ValueError(f"prompt {prompt!r}: the scene vocabulary is {sorted(VOCAB)}, at most {TOKENS} words")
    return [VOCAB[w] for w in words]


def context(prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(n, 8, 64) contexts and (n, 64) pooled vectors; "" is the empty prompt."""
    ctx = torch.zeros(len(prompts), TOKENS, CONTEXT_DIM)
    pooled = torch.zeros(len(prompts), CONTEXT_DIM)
    for i, prompt in enumerate(prompts):
        ids = tokens(prompt)
        if ids:
            words = EMBED[ids]
            ctx[i, :len(ids)] = words + POSITION[:len(ids)]
            pooled[i] = words.mean(0)
    return ctx, pooled

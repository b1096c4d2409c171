"""Tiny random LVLMs built from configs (no downloads), and batches shaped like a processor's output."""

from __future__ import annotations

import pytest
import torch

from visiondrop.testing import BOS, EOS, IMAGE_TOKEN, PAD
from visiondrop.testing import tiny_llava as _tiny_llava

__all__ = ["BOS", "EOS", "IMAGE_TOKEN", "PAD"]
SIDE = 112  # 8 x 8 = 64 patches of 14 px
N_TOKENS = (SIDE // 14) ** 2


def tiny_llava(attn: str = "sdpa", *, layers: int = 8, kv_heads: int = 2, seed: int = 0, dtype=torch.float32):
    """A LLaVA-1.5-shaped model small enough for CPU tests (8 x 8 = 64 patches, 8 LLM layers, GQA).

    One unpatched call with ``output_hidden_states`` installs the output-capturing hooks transformers adds lazily, so
    that snapshots of the model's hooks (``model_state``) only change when visiondrop changes them.
    """
    model = _tiny_llava(seed=seed, dtype=dtype, image_size=SIDE, layers=layers, kv_heads=kv_heads, attn=attn)
    warm = make_batch([[BOS, *image(), 5]], dtype=dtype)
    with torch.no_grad():
        model(**warm, output_hidden_states=True)
        model.model.vision_tower(warm["pixel_values"], output_hidden_states=True)
    return model


def image(n: int = 1) -> list[int]:
    return [IMAGE_TOKEN] * (N_TOKENS * n)


def make_batch(rows: list[list[int]], side: str = "left", seed: int = 1, dtype=torch.float32) -> dict:
    """Pad ``rows`` (token lists with image placeholders) into a batch with one random image per image run."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        cols = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    num_images = int((ids == IMAGE_TOKEN).sum()) // N_TOKENS
    batch = {"input_ids": ids, "attention_mask": mask}
    if num_images:
        gen = torch.Generator().manual_seed(seed)
        batch["pixel_values"] = torch.randn(num_images, 3, SIDE, SIDE, generator=gen).to(dtype)
    return batch


#: A ragged batch: one image, two images (separated by text), and a prompt without an image.
RAGGED = [
    [BOS, 5, *image(), 7, 8],
    [BOS, 5, 6, 9, *image(), 3, *image(), 7, 8, 9],
    [BOS, 4, 4, 4, 4, 4, 4],
]


@pytest.fixture(scope="session")
def llava():
    return tiny_llava("sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    return tiny_llava("eager")


@pytest.fixture(params=["sdpa", "eager"], scope="session")
def llava_any(request, llava, llava_eager):
    return llava if request.param == "sdpa" else llava_eager


def model_state(model: torch.nn.Module) -> list:
    """Everything visiondrop could leave behind: per-module attributes and hooks, and per-instance overrides."""
    state = []
    for name, module in model.named_modules():
        hooks = (
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._forward_hooks_with_kwargs),
            len(module._backward_hooks),
        )
        state.append((name, type(module).__name__, tuple(sorted(module.__dict__)), hooks))
    return state


def generate(model, batch: dict, **kwargs) -> torch.Tensor:
    """Greedy generation of a few tokens, deterministic."""
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("do_sample", False)
    # A random model can emit the placeholder id as text, which no real model does and which would make the
    # placeholder count of a use_cache=False recomputation wrong for any model, pruned or not.
    kwargs.setdefault("suppress_tokens", [IMAGE_TOKEN])
    with torch.no_grad():
        return model.generate(**batch, **kwargs)


NEXT_SIZES = [(50, 100), (100, 60), (80, 80)]


def next_batch(model, sizes=NEXT_SIZES, side: str = "left", seed: int = 1) -> dict:
    """A ragged LLaVA-NeXT batch: one image; two images of other sizes; a prompt without an image."""
    from visiondrop.testing import llava_next_placeholders

    n = [llava_next_placeholders(model, s) for s in sizes]
    rows = [
        [BOS, 5, *[IMAGE_TOKEN] * n[0], 7, 8],
        [BOS, 5, 6, *[IMAGE_TOKEN] * n[1], 3, *[IMAGE_TOKEN] * n[2], 9],
        [BOS, 4, 4, 4],
    ]
    batch = make_batch(rows, side=side)
    gen = torch.Generator().manual_seed(seed)
    batch["pixel_values"] = torch.randn(len(sizes), 5, 3, 56, 56, generator=gen)
    batch["image_sizes"] = torch.tensor(sizes)
    return batch


#: On :func:`visiondrop.testing.tiny_llava_onevision`: one image whose 1 x 2 grid stays as it is (4 x 8 cells), one whose
#: 2 x 2 grid AnyRes-Max downscales (8 x 8 -> 6 x 6), one whose 3 x 3 grid is unpadded and downscaled (12 x 10 -> 7 x 6).
ONEVISION_SIZES = [(50, 100), (100, 100), (150, 120)]


def onevision_batch(
    model, sizes=ONEVISION_SIZES, side: str = "left", seed: int = 1, several: bool = False
) -> dict:
    """A ragged LLaVA-OneVision batch: one image; two images of other sizes; a prompt without an image.

    ``several``: as the processor sends it, with ``batch_num_images`` [1, 2, 0], so the second prompt's two images
    get their base view only and one newline each (transformers' multi-image layout)."""
    from visiondrop.testing import llava_onevision_placeholders

    n = [llava_onevision_placeholders(model, s) for s in sizes]
    if several:
        vision = model.config.vision_config
        n[1] = n[2] = (vision.image_size // vision.patch_size) ** 2 + 1
    rows = [
        [BOS, 5, *[IMAGE_TOKEN] * n[0], 7, 8],
        [BOS, 5, 6, *[IMAGE_TOKEN] * n[1], 3, *[IMAGE_TOKEN] * n[2], 9],
        [BOS, 4, 4, 4],
    ]
    batch = make_batch(rows, side=side)
    gen = torch.Generator().manual_seed(seed)
    batch["pixel_values"] = torch.randn(
        len(sizes), 10, 3, 56, 56, generator=gen
    )  # padded: base + 3 x 3 tiles
    batch["image_sizes"] = torch.tensor(sizes)
    if several:
        batch["batch_num_images"] = torch.tensor([1, 2, 0])
    return batch

"""``visiondrop flops``: analytic prefill FLOPs and KV-cache bytes of a pruning method, per stage and in total.

The counting rules are those of :mod:`visiondrop.flops` (SPEC §9): a multiply-add is 2 FLOPs, prefill only, every
matrix product of the vision tower, the projector, the LLM layers and the LM head. This module adds what a user asks
for: the image a model receives (LLaVA-1.5's one 336 px crop, LLaVA-NeXT's any-resolution crops, Qwen2-VL's dynamic
resolution), a method's schedule (``method.schedule``), and a side-by-side breakdown of the unpruned model and the
pruned one, with the LLM layers grouped by the method's stages.

Conventions (those of the published figures, which ``tests/test_costs.py`` reproduces):

- the vision tower and the projector are counted at full size for every method: the tower always sees every patch,
  and the published figures count the projector over every feature too. In visiondrop's runtime the projector of a
  method that selects before it (VisionDrop, VisionZip, random) only sees the kept tokens; ``run.report.flops`` counts
  that, so it can be lower than this command by up to 1 % (LLaVA-1.5-7B at budget 64: 0.02 T);
- the LM head is applied to every prompt position, as in the published figures (``generate`` computes the last
  position only: ``visiondrop bench`` counts it that way, because it times ``generate``);
- a LLaVA-NeXT image is one image of all its tokens (base view, high-resolution grid and newlines: 2,928 for the
  maximal 672 × 672 grid), and an int budget is tokens per image, a float a fraction of them.

Example
-------
>>> report = estimate_costs("llava-1.5-7b", "visiondrop", budget=64)    # doctest: +SKIP
>>> round(report.unpruned_tflops, 2), round(report.tflops, 2)           # doctest: +SKIP
(9.08, 2.1)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .. import flops
from ..flops import DEFAULT_IMAGE_SIZE, ImageShape, image_shape
from ..methods import build
from ..report import jsonable
from ..schedule import Schedule
from .common import (
    add_model_options,
    dtype_bytes,
    format_bytes,
    format_table,
    parse_budget,
    parse_image_size,
    parse_settings,
)

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "CostReport",
    "ImageShape",
    "PartCost",
    "add_parser",
    "estimate_costs",
    "image_shape",
    "run_flops",
]


# ---------------------------------------------------------------------------------------------------------------
# the breakdown
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartCost:
    """One row of the breakdown: a part of the model, unpruned and pruned.

    Attributes
    ----------
    part : str
        ``"vision tower"``, ``"projector"``, ``"LLM stage k"`` or ``"LM head"``.
    layers : (int, int), optional
        For LLM stages: the first and last layer index (0-based, inclusive).
    unpruned_tokens, tokens : int
        Tokens each layer of the part sees per image: ViT tokens per pass for the tower, features for the
        projector, *visual* tokens for the LLM stages (every layer also sees the prompt's text tokens), and for the
        LM head the visual tokens leaving the last layer.
    unpruned_flops, flops : float
        FLOPs of the part over the whole batch.
    unpruned_kv_bytes, kv_bytes : int
        KV-cache bytes of the part's layers after prefill (0 outside the LLM).
    """

    part: str
    layers: tuple[int, int] | None
    unpruned_tokens: int
    tokens: int
    unpruned_flops: float
    flops: float
    unpruned_kv_bytes: int = 0
    kv_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "layers": list(self.layers) if self.layers is not None else None,
            "unpruned_tokens": self.unpruned_tokens,
            "tokens": self.tokens,
            "unpruned_flops": self.unpruned_flops,
            "flops": self.flops,
            "unpruned_kv_bytes": self.unpruned_kv_bytes,
            "kv_bytes": self.kv_bytes,
        }


@dataclass(frozen=True)
class CostReport:
    """What ``visiondrop flops`` prints: the schedule and the per-part costs, unpruned and pruned.

    Attributes
    ----------
    model : str
        Shipped config name or path.
    arch : ArchSpec
        The dimensions the costs were computed from.
    method : str
        Registry name of the method.
    settings : dict
        The method's fields (budget included).
    image : ImageShape
        The image the counts are for.
    schedule : Schedule
        The method's per-stage token counts for that image.
    text_tokens, batch : int
        Prompt text tokens per sequence, and identical sequences.
    dtype : str
        Element type of the KV cache.
    parts : list of PartCost
        Vision tower, projector, one row per LLM stage, LM head.
    """

    model: str
    arch: flops.ArchSpec
    method: str
    settings: dict[str, Any]
    image: ImageShape
    schedule: Schedule
    text_tokens: int
    batch: int
    dtype: str
    parts: list[PartCost] = field(default_factory=list)

    @property
    def unpruned_tflops(self) -> float:
        return math.fsum(p.unpruned_flops for p in self.parts) / 1e12

    @property
    def tflops(self) -> float:
        return math.fsum(p.flops for p in self.parts) / 1e12

    @property
    def ratio(self) -> float:
        """How many times fewer FLOPs the pruned prefill needs."""
        return self.unpruned_tflops / self.tflops

    @property
    def unpruned_kv_bytes(self) -> int:
        return sum(p.unpruned_kv_bytes for p in self.parts)

    @property
    def kv_bytes(self) -> int:
        return sum(p.kv_bytes for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``unpruned_tflops``, ``tflops`` and ``ratio`` are the headline numbers."""
        return {
            "model": self.model,
            "family": self.arch.family,
            "num_layers": self.arch.num_layers,
            "method": self.method,
            "budget": self.settings.get("budget"),
            "budget_mode": self.settings.get("budget_mode"),
            "settings": {k: jsonable(v) for k, v in self.settings.items()},
            "text_tokens": self.text_tokens,
            "image_tokens": self.image.tokens,
            "vision_tokens": list(self.image.vit_tokens),
            "image_size": list(self.image.size) if self.image.size else None,
            "batch": self.batch,
            "dtype": self.dtype,
            "schedule": self.schedule.describe(),
            "counts": self.schedule.counts(),
            "input_count": self.schedule.input_count,
            "layer_average": self.schedule.layer_average,
            "final_count": self.schedule.final_count,
            "unpruned_tflops": self.unpruned_tflops,
            "tflops": self.tflops,
            "ratio": self.ratio,
            "unpruned_kv_bytes": self.unpruned_kv_bytes,
            "kv_bytes": self.kv_bytes,
            "kv_ratio": self.unpruned_kv_bytes / self.kv_bytes,
            "parts": [p.to_dict() for p in self.parts],
        }

    def table(self) -> str:
        """The breakdown as a markdown table."""
        name = self.method
        headers = [
            "part",
            "layers",
            "tokens, unpruned",
            f"tokens, {name}",
            "TFLOPs, unpruned",
            f"TFLOPs, {name}",
            "KV cache, unpruned",
            f"KV cache, {name}",
        ]
        rows = []
        for p in self.parts:
            kv = p.unpruned_kv_bytes or p.kv_bytes
            rows.append(
                [
                    p.part,
                    "-" if p.layers is None else f"{p.layers[0]}-{p.layers[1]}",
                    str(p.unpruned_tokens),
                    str(p.tokens),
                    f"{p.unpruned_flops / 1e12:.3f}",
                    f"{p.flops / 1e12:.3f}",
                    format_bytes(p.unpruned_kv_bytes) if kv else "-",
                    format_bytes(p.kv_bytes) if kv else "-",
                ]
            )
        rows.append(
            [
                "**total**",
                "",
                "",
                "",
                f"**{self.unpruned_tflops:.2f}**",
                f"**{self.tflops:.2f}** ({self.ratio:.2f}x fewer)",
                f"**{format_bytes(self.unpruned_kv_bytes)}**",
                f"**{format_bytes(self.kv_bytes)}** ({self.unpruned_kv_bytes / self.kv_bytes:.2f}x less)",
            ]
        )
        return format_table(headers, rows)

    def __str__(self) -> str:
        arch = self.arch
        kv_heads = arch.num_kv_heads
        attention = "MHA" if kv_heads == arch.num_heads else f"GQA, {kv_heads} KV heads"
        budget = self.settings.get("budget")
        lines = [
            f"model:  {self.model} ({arch.family}; LLM {arch.num_layers} layers, hidden {arch.hidden_size}, "
            f"{arch.num_heads} heads ({attention}), FFN {arch.ffn_size}; vision tower {arch.vit_layers} layers)",
            f"image:  {self.image.description}",
            f"prompt: {self.text_tokens} text tokens per sequence; batch {self.batch}; KV cache in {self.dtype}",
            f"method: {self.method}"
            + ("" if self.method == "none" else f", budget {budget} ({self.settings.get('budget_mode')})")
            + f": {self.schedule.describe()}",
            "",
            self.table(),
            "",
            "Prefill FLOPs, a multiply-add = 2 (SPEC §9). Tokens: per ViT pass for the vision tower, visual tokens "
            f"per layer for the LLM (each layer also sees the {self.text_tokens} text tokens). The vision tower and "
            "the projector are counted at full size and the LM head over every prompt position, as in the "
            "published figures.",
        ]
        return "\n".join(lines)


def video_schedule(pruner: Any, image: ImageShape, num_layers: int) -> Schedule:
    """The method's schedule for ``image``, summed over a video's frames per its ``pool`` (one image: as is).

    ``pool="frame"``: every frame gets the frame's schedule (an int budget per frame), so each stage keeps
    ``frames x`` the frame's count; ``pool="video"``: one schedule for the whole video (``budget x frames`` tokens,
    or the fraction of all of them), as the runtime schedules a video unit.
    """
    if image.frames <= 1:
        return pruner.schedule(image.tokens, num_layers, image.grids)
    from ..schedule import Stage
    from ..tokens import ImageInfo

    frames = image.frames
    grids = image.grids or ()
    if pruner.pool == "video":
        info = ImageInfo(image.tokens, grids, image.vit_tokens, video=0, frames=tuple(range(frames)))
        return pruner.for_unit(info).schedule(image.tokens, num_layers, grids or None)
    per_frame = image.tokens // frames
    frame = pruner.schedule(per_frame, num_layers, grids[:1] or None)
    stages = tuple(Stage(s.layer, s.dominant * frames, s.contextual * frames) for s in frame.stages)
    return Schedule(stages, image.tokens, num_layers)


def estimate_costs(
    model: str,
    method: str = "visiondrop",
    *,
    budget: int | float = 64,
    budget_mode: str = "average",
    text_tokens: int = flops.DEFAULT_TEXT_TOKENS,
    image_size: tuple[int, int] | None = None,
    batch: int = 1,
    dtype: str = "bfloat16",
    settings: Mapping[str, Any] | None = None,
) -> CostReport:
    """Analytic prefill FLOPs and KV-cache bytes of ``method`` at ``budget`` on ``model``, next to the unpruned ones.

    Parameters
    ----------
    model : str
        A shipped config (``llava-1.5-7b``, ``llava-1.5-13b``, ``llava-next-7b``, ``qwen2-vl-7b``) or a path to a
        ``config.json`` (see :func:`visiondrop.flops.load_arch`).
    method : str
        Registry name (``visiondrop.available_methods()``); ``"none"`` for the unpruned model alone.
    budget, budget_mode : int or float, str
        As for :func:`visiondrop.build`.
    text_tokens : int
        Prompt text tokens per sequence (default 64).
    image_size : (int, int), optional
        Height and width in pixels, for LLaVA-NeXT and Qwen2-VL (default 672 × 672).
    batch : int
        Identical sequences; FLOPs and bytes scale with it.
    dtype : str
        Element type of the KV cache.
    settings : mapping, optional
        Other method fields (``layer`` for FastV, ``boundaries`` for VisionDrop, ``pool`` for a video model:
        ``frame`` or ``video``, see :func:`video_schedule`).

    Returns
    -------
    CostReport

    Raises
    ------
    ValueError
        Unknown model or method, a budget the method cannot meet on this model, bad counts.
    """
    arch = flops.load_arch(model)
    for what, value in (("--text-tokens", text_tokens), ("--batch", batch)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (0 if what == "--text-tokens" else 1)
        ):
            raise ValueError(
                f"{what} must be an integer >= {0 if what == '--text-tokens' else 1}, got {value!r}"
            )
    element = dtype_bytes(dtype)
    image = image_shape(arch, image_size)
    fields = dict(settings or {})
    fields.update(budget=budget, budget_mode=budget_mode)
    pruner = build(method, **fields)
    schedule = video_schedule(pruner, image, arch.num_layers)

    per_layer = schedule.tokens_per_layer()
    full = [image.tokens] * arch.num_layers
    common = {"text_tokens": text_tokens, "vision_tokens": list(image.vit_tokens), "batch_size": batch}
    pruned_flops = flops.prefill_flops(arch, visual_tokens_per_layer=per_layer, **common)
    base_flops = flops.prefill_flops(arch, visual_tokens_per_layer=full, **common)

    parts = [
        PartCost(
            "vision tower",
            None,
            max(image.vit_tokens),
            max(image.vit_tokens),
            base_flops.vision,
            pruned_flops.vision,
        ),
        PartCost(
            "projector",
            None,
            image.tokens,
            image.tokens,
            base_flops.projector,
            pruned_flops.projector,
        ),
    ]
    starts = [0, *(s.layer for s in schedule.boundaries), arch.num_layers]
    for k, (stage, begin, end) in enumerate(zip(schedule.stages, starts[:-1], starts[1:], strict=True)):
        width = end - begin
        stage_arch = replace(arch, num_layers=width)
        parts.append(
            PartCost(
                f"LLM stage {k}",
                (begin, end - 1),
                image.tokens,
                stage.tokens,
                math.fsum(base_flops.llm_layers[begin:end]),
                math.fsum(pruned_flops.llm_layers[begin:end]),
                batch * flops.kv_cache_bytes(stage_arch, text_tokens + image.tokens, element),
                batch * flops.kv_cache_bytes(stage_arch, text_tokens + stage.tokens, element),
            )
        )
    parts.append(
        PartCost("LM head", None, image.tokens, per_layer[-1], base_flops.lm_head, pruned_flops.lm_head)
    )
    return CostReport(
        model=str(model),
        arch=arch,
        method=pruner.name,
        settings=pruner.settings(),
        image=image,
        schedule=schedule,
        text_tokens=text_tokens,
        batch=batch,
        dtype=dtype,
        parts=parts,
    )


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register ``visiondrop flops`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "flops",
        help="analytic prefill FLOPs and KV-cache bytes, unpruned and pruned, per stage",
        description=(
            "Analytic prefill FLOPs (multiply-add = 2) and KV-cache bytes of a model, unpruned and under a pruning "
            "method at a budget, per stage and in total. Nothing is loaded but the config."
        ),
    )
    add_model_options(parser, flops.SHIPPED_CONFIGS)
    parser.add_argument(
        "--method", default="visiondrop", help="registry name (`visiondrop methods`); none = unpruned only"
    )
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=flops.DEFAULT_TEXT_TOKENS,
        help=f"prompt text tokens per sequence (default {flops.DEFAULT_TEXT_TOKENS})",
    )
    parser.add_argument(
        "--image-size",
        help="HEIGHTxWIDTH in pixels for LLaVA-NeXT and Qwen2-VL (default 672x672; LLaVA-1.5 always uses one crop)",
    )
    parser.add_argument("--batch", type=int, default=1, help="identical sequences (default 1)")
    parser.add_argument("--dtype", default="bfloat16", help="KV-cache element type (default bfloat16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=run_flops)


def run_flops(args: argparse.Namespace) -> int:
    """Entry point of ``visiondrop flops``: prints the breakdown (or ``--json``); returns the exit status."""
    report = estimate_costs(
        args.model,
        args.method,
        budget=parse_budget(args.budget),
        budget_mode=args.budget_mode,
        text_tokens=args.text_tokens,
        image_size=parse_image_size(args.image_size) if args.image_size else None,
        batch=args.batch,
        dtype=args.dtype,
        settings=parse_settings(args.settings),
    )
    print(json.dumps(report.to_dict()) if args.json else report)
    return 0

"""What a pruned call kept: visual tokens per stage, the three budget conventions, kept positions in the patch grid."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .ops import Selection

__all__ = ["ImageReport", "Report", "SampleReport", "StageView", "selection_maps"]


@dataclass
class StageView:
    """One image after one stage.

    Attributes
    ----------
    layer : int
        0 for the vision stage, ``l`` for the boundary after LLM layer ``l``.
    tokens : int
        Visual tokens the image has after the stage.
    contextual : int
        How many of them are merged (contextual) tokens.
    token_patch : list of int
        For each surviving token, the grid patch it stands at (its anchor for a merged token); -1 for [CLS].
    patch_owner : list of int
        For each grid patch (raster order), the surviving token that carries it, or -1 if it was dropped.
    """

    layer: int
    tokens: int
    contextual: int
    token_patch: list[int]
    patch_owner: list[int]

    @property
    def name(self) -> str:
        return "vision" if self.layer == 0 else f"after L{self.layer}"

    def kept_patches(self) -> list[int]:
        """Grid patches kept as they are (dominant tokens), in token order."""
        return [p for p in self.token_patch[: self.tokens - self.contextual] if p >= 0]


@dataclass
class ImageReport:
    """One image of one sample; patch ``p`` is cell ``p`` of its ``grids`` laid end to end."""

    sample: int
    index: int
    grids: tuple[tuple[int, int], ...]
    image_tokens: int
    stages: list[StageView]
    num_layers: int

    def counts(self) -> list[int]:
        return [s.tokens for s in self.stages]

    def tokens_per_layer(self) -> list[int]:
        per_layer = []
        starts = [0] + [s.layer for s in self.stages[1:]] + [self.num_layers]
        for stage, begin, end in zip(self.stages, starts[:-1], starts[1:], strict=True):
            per_layer += [stage.tokens] * (end - begin)
        return per_layer

    @property
    def input_count(self) -> int:
        return self.stages[0].tokens

    @property
    def layer_average(self) -> float:
        return sum(self.tokens_per_layer()) / self.num_layers

    @property
    def final_count(self) -> int:
        return self.stages[-1].tokens


@dataclass
class SampleReport:
    """One prompt of the batch: its images and the budget conventions per image (averaged over its images)."""

    sample: int
    images: list[ImageReport]

    @property
    def input_count(self) -> float:
        return _mean([im.input_count for im in self.images])

    @property
    def layer_average(self) -> float:
        return _mean([im.layer_average for im in self.images])

    @property
    def final_count(self) -> float:
        return _mean([im.final_count for im in self.images])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass
class Report:
    """The report of the last call made under a method.

    Attributes
    ----------
    method : str
        Registry name of the method.
    settings : dict
        The method's fields.
    schedules : dict
        ``image_tokens -> Schedule.describe()`` for every image size seen.
    samples : list of SampleReport
        One per row of the batch (rows without images have no images).
    flops : dict, optional
        Analytic prefill cost of this call (``unpruned_tflops``, ``tflops``, ``ratio``), when computed.
    """

    method: str
    settings: dict[str, Any]
    schedules: dict[int, str]
    samples: list[SampleReport]
    num_layers: int
    flops: dict[str, float] | None = field(default=None)

    @property
    def images(self) -> list[ImageReport]:
        return [im for s in self.samples for im in s.images]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (kept positions included)."""
        out = {
            "method": self.method,
            "settings": {k: _jsonable(v) for k, v in self.settings.items()},
            "schedules": {str(k): v for k, v in self.schedules.items()},
            "num_layers": self.num_layers,
            "flops": self.flops,
            "samples": [],
        }
        for s in self.samples:
            out["samples"].append(
                {
                    "sample": s.sample,
                    "input_count": s.input_count,
                    "layer_average": s.layer_average,
                    "final_count": s.final_count,
                    "images": [
                        {
                            "index": im.index,
                            "grids": [list(g) for g in im.grids],
                            "image_tokens": im.image_tokens,
                            "counts": im.counts(),
                            "input_count": im.input_count,
                            "layer_average": im.layer_average,
                            "final_count": im.final_count,
                            "stages": [asdict(st) for st in im.stages],
                        }
                        for im in s.images
                    ],
                }
            )
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        lines = [f"method: {self.method}"]
        for tokens, desc in self.schedules.items():
            lines.append(f"schedule ({tokens} tokens/image): {desc}")
        for s in self.samples:
            if not s.images:
                lines.append(f"sample {s.sample}: no image")
                continue
            per_image = "; ".join(
                " -> ".join(str(c) for c in [im.image_tokens, *im.counts()]) for im in s.images
            )
            lines.append(
                f"sample {s.sample}: {per_image} | input {s.input_count:g}, layer-avg {s.layer_average:.1f}, "
                f"final {s.final_count:g}"
            )
        if self.flops:
            f = self.flops
            lines.append(
                f"prefill FLOPs: {_flops_text(f['tflops'])} vs {_flops_text(f['unpruned_tflops'])} unpruned "
                f"({f['ratio']:.2f}x fewer); KV cache: {_bytes_text(f['kv_bytes'])} vs "
                f"{_bytes_text(f['unpruned_kv_bytes'])}"
            )
        return "\n".join(lines)


def _flops_text(tflops: float) -> str:
    return f"{tflops:.2f} TFLOPs" if tflops >= 0.1 else f"{tflops * 1e3:.2f} GFLOPs"


def _bytes_text(count: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def selection_maps(selection: Selection, num_tokens: int) -> torch.Tensor:
    """For each of the ``num_tokens`` input tokens, the output token that carries it, or -1 if dropped.

    Returns
    -------
    LongTensor, shape (I, num_tokens)
    """
    num_images = selection.num_images
    device = selection.keep.device
    out = torch.full((num_images, num_tokens), -1, dtype=torch.long, device=device)
    k = selection.num_kept
    out.scatter_(1, selection.keep, torch.arange(k, device=device).expand(num_images, -1))
    if selection.anchors is not None:
        c = selection.num_merged
        slot = selection.assign
        member = slot >= 0
        out = torch.where(member, k + slot.clamp(min=0), out)
        out.scatter_(1, selection.anchors, (k + torch.arange(c, device=device)).expand(num_images, -1))
    return out

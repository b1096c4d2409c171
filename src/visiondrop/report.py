"""What a pruned call kept: visual tokens per stage, the three budget conventions, kept positions in the patch grid."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .ops import Selection

__all__ = ["ImageReport", "Report", "SampleReport", "StageView", "jsonable", "selection_maps"]


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
    """One image of one sample; patch ``p`` is cell ``p`` of its ``grids`` laid end to end.

    A video is reported per pruning unit (``pool="frame"``: one entry per frame, ``pool="video"``: one per video):
    ``video`` is the video's number among the call's videos (None for an image) and ``frames`` the frames the entry
    covers; :meth:`Report.videos` gathers them per video.
    """

    sample: int
    index: int
    grids: tuple[tuple[int, int], ...]
    image_tokens: int
    stages: list[StageView]
    num_layers: int
    video: int | None = None
    frames: tuple[int, ...] = ()

    def counts(self) -> list[int]:
        return [s.tokens for s in self.stages]

    def tokens_per_layer(self) -> list[int]:
        per_layer = []
        starts = [0] + [s.layer for s in self.stages[1:]] + [self.num_layers]
        for stage, begin, end in zip(self.stages, starts[:-1], starts[1:], strict=True):
            per_layer += [stage.tokens] * (end - begin)
        return per_layer

    def frame_counts(self) -> list[list[int]]:
        """Per stage, the tokens standing at each of :attr:`frames` (by the patch a token stands at: its anchor for
        a merged token); tokens at no patch ([CLS]) count for the frame whose placeholders they took. An image has
        one frame. With ``pool="frame"`` every stage has one entry equal to :meth:`counts`; with ``pool="video"`` it
        shows how the video's one pool fell across its frames."""
        grids = self.grids or ((0, 0),)
        bounds = []
        total = 0
        for rows, cols in grids:
            total += rows * cols
            bounds.append(total)
        frames = max(1, len(self.frames))
        per_grid = max(1, len(grids) // frames)  # grids per frame (one for every video family here)
        out = []
        for stage in self.stages:
            counts = [0] * frames
            last = 0
            for patch in stage.token_patch:
                if patch >= 0:
                    grid = next((g for g, end in enumerate(bounds) if patch < end), len(bounds) - 1)
                    last = min(frames - 1, grid // per_grid)
                counts[last] += 1
            out.append(counts)
        return out

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

    def videos(self) -> list[dict[str, Any]]:
        """Every video of the call, with its counts per stage in total and per frame.

        Returns
        -------
        list of dict
            In video order: ``sample``, ``video``, ``frames`` (the frames, Qwen-VL: temporal patches),
            ``video_tokens`` (unpruned), ``counts`` (per stage, the video's tokens in total) and ``frame_counts``
            (per stage, one count per frame). Under ``pool="frame"`` each frame met its own schedule; under
            ``pool="video"`` the total did.
        """
        found: dict[int, dict[str, Any]] = {}
        for im in self.images:
            if im.video is None:
                continue
            entry = found.setdefault(
                im.video,
                {"sample": im.sample, "video": im.video, "frames": [], "video_tokens": 0, "units": []},
            )
            entry["frames"] += list(im.frames)
            entry["video_tokens"] += im.image_tokens
            entry["units"].append(im)
        out = []
        for video in sorted(found):
            entry = found[video]
            units = entry.pop("units")
            stages = len(units[0].stages)
            entry["counts"] = [sum(u.stages[s].tokens for u in units) for s in range(stages)]
            per_unit = [u.frame_counts() for u in units]
            entry["frame_counts"] = [[c for fc in per_unit for c in fc[s]] for s in range(stages)]
            out.append(entry)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (kept positions included)."""
        out = {
            "method": self.method,
            "settings": {k: jsonable(v) for k, v in self.settings.items()},
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
                            "video": im.video,
                            "frames": list(im.frames),
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
                _unit_label(im) + " -> ".join(str(c) for c in [im.image_tokens, *im.counts()])
                for im in s.images
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


def _unit_label(im: ImageReport) -> str:
    """``""`` for an image; ``"video 0 frame 3: "`` or ``"video 0 frames 0-3: "`` for a video's unit."""
    if im.video is None:
        return ""
    if len(im.frames) == 1:
        return f"video {im.video} frame {im.frames[0]}: "
    return f"video {im.video} frames {im.frames[0]}-{im.frames[-1]}: "


def _flops_text(tflops: float) -> str:
    return f"{tflops:.2f} TFLOPs" if tflops >= 0.1 else f"{tflops * 1e3:.2f} GFLOPs"


def _bytes_text(count: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def jsonable(value: Any) -> Any:
    """A setting's value as JSON keeps it: None, strings, numbers and booleans as they are, lists and tuples as lists
    (item by item), anything else as its ``str`` (a :class:`~visiondrop.schedule.Stage` as ``"vision: 12 (10+2)"``).

    The one JSON helper of the package: the run report, ``visiondrop flops`` and ``visiondrop bench`` use it.
    """
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
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

"""Qwen2-VL and Qwen2.5-VL: a ViT without [CLS], a 2x2 patch merger, window attention (2.5), M-RoPE positions.

- Scoring: visual-to-visual attention at the last full-attention block of the ViT (every block in Qwen2-VL, the
  ``fullatt_block_indexes`` ones in 2.5), computed from that block's own q/k (with its 2-D rotary embedding) over each
  image's patches; a merged token's score is the sum of its 2x2 patches' scores, its merge metric their mean key.
- Granularity: the LLM sees one token per 2x2 patch group, so methods choose among those *merged units*. Contextual
  merging happens before the merger's MLP (on the normalised, concatenated 2x2 patch vectors), as LLaVA merges before
  its projector.
- Window attention (2.5): blocks run on patches permuted window by window; scores and features are put back in raster
  order before any choice is made.
- Positions: M-RoPE gives every visual token a (t, h, w) position, so only ``positions="preserve"`` has a meaning:
  the 3-D positions are computed on the unpruned sequence (as the unpatched model would) and gathered for the tokens
  that survive. ``compact`` is refused.
- Video inputs are refused with a clear error (images only).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import cached_property

import torch
from torch import nn

from .. import ops
from ..compat import qwen_window_index
from .base import ImageInfo, ModelAdapter, TextStack, VisionTokens, register_adapter

__all__ = ["Qwen2VLAdapter"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class QwenVisionTokens(VisionTokens):
    """One Qwen image: its merged units (2x2 patches) in raster order; no [CLS]."""

    def __init__(
        self,
        units: torch.Tensor,
        scores: torch.Tensor,
        keys: torch.Tensor,
        grid: tuple[int, int],
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """
        Parameters
        ----------
        units : Tensor, shape (1, n, 4 * Dv)
            Normalised, concatenated patch vectors of every merged unit (the merger MLP's input).
        scores : Tensor, shape (1, n)
            Visual attention received by each unit (sum over its patches).
        keys : Tensor, shape (1, n, d)
            Mean pre-RoPE key of each unit's patches, averaged over heads.
        """
        super().__init__(units, has_cls=False, grids=(grid,))
        self._scores = scores
        self._keys = keys
        self._project = project

    def visual_attention(self) -> torch.Tensor:
        return self._scores

    def keys(self) -> torch.Tensor:
        return self._keys

    def projected(self) -> torch.Tensor:
        return self._project(self.hidden)


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``."""

    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    family = "Qwen2-VL"
    supports_compact_positions = False
    has_cls = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = model.model.visual
        vision = self.config.vision_config
        self.merge = vision.spatial_merge_size
        full = getattr(vision, "fullatt_block_indexes", None)
        self.windowed = full is not None
        last_full = max(full) if full else len(self.visual.blocks) - 1
        self.scoring_index = last_full
        self.scoring_block = self.visual.blocks[last_full]
        self.last_block = len(self.visual.blocks) - 1

    @cached_property
    def text(self) -> TextStack:
        return TextStack(self.model.model.language_model)

    def vision_kwargs(self) -> tuple[str, ...]:
        return ("pixel_values", "image_grid_thw")

    def aligned_kwargs(self) -> tuple[str, ...]:
        return ("mm_token_type_ids",)

    def check_call(self, kwargs: dict) -> None:
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError(
                "pixel_values_videos: visiondrop prunes images only; video inputs are not supported"
            )

    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        if kwargs.get("pixel_values") is None:
            return []
        grid_thw = kwargs.get("image_grid_thw")
        if grid_thw is None:
            raise ValueError(
                "image_grid_thw is missing: Qwen2-VL needs each image's patch grid (the processor returns it)"
            )
        infos = []
        for t, h, w in grid_thw.tolist():
            rows, cols = h // self.merge, w // self.merge
            infos.append(
                ImageInfo(tokens=t * rows * cols, grids=((t * rows, cols),), vit_tokens=(t * h * w,))
            )
        return infos

    def _project(self, units: torch.Tensor) -> torch.Tensor:
        return self.visual.merger.mlp(units)

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        grid_thw = kwargs["image_grid_thw"]
        pixel_values = kwargs["pixel_values"].type(self.visual.dtype)
        captured: dict[str, object] = {}

        def grab_input(module, args, hook_kwargs):
            captured["input"] = args[0] if args else hook_kwargs["hidden_states"]
            captured["rope"] = hook_kwargs["position_embeddings"]
            captured["cu_seqlens"] = hook_kwargs["cu_seqlens"]

        def grab_output(module, args, output):
            captured["output"] = output

        handles = [self.scoring_block.register_forward_pre_hook(grab_input, with_kwargs=True)]
        handles.append(self.visual.blocks[self.last_block].register_forward_hook(grab_output))
        try:
            self.visual(pixel_values, grid_thw=grid_thw)
        finally:
            for handle in handles:
                handle.remove()

        unit = self.merge * self.merge
        scores_w, keys_w = self._patch_scores(captured)  # window order when windowed
        units_w = self.visual.merger.ln_q(captured["output"]).view(-1, unit * captured["output"].shape[-1])
        unit_scores = scores_w.view(-1, unit).sum(1)
        unit_keys = keys_w.view(-1, unit, keys_w.shape[-1]).mean(1)
        if self.windowed:  # blocks ran window by window: back to raster order of the merged units
            restore = torch.argsort(qwen_window_index(self.visual, grid_thw).to(unit_scores.device))
            unit_scores, unit_keys, units_w = unit_scores[restore], unit_keys[restore], units_w[restore]
        counts = (grid_thw.prod(-1) // unit).tolist()
        groups = []
        for image, (s, k, u, (t, h, w)) in enumerate(
            zip(
                unit_scores.split(counts),
                unit_keys.split(counts),
                units_w.split(counts),
                grid_thw.tolist(),
                strict=True,
            )
        ):
            grid = (t * h // self.merge, w // self.merge)
            groups.append(([image], QwenVisionTokens(u[None], s[None], k[None], grid, self._project)))
        return groups

    def _patch_scores(self, captured: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per patch: attention received from its image's patches, and its pre-RoPE key averaged over heads."""
        block = self.scoring_block
        attn = block.attn
        x = block.norm1(captured["input"])
        length = x.shape[0]
        q, k, _ = (
            attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )  # (S, H, d)
        keys = k.float().mean(1)
        cos, sin = captured["rope"]
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = q.float() * cos + _rotate_half(q.float()) * sin
        k = k.float() * cos + _rotate_half(k.float()) * sin
        bounds = captured["cu_seqlens"].tolist()
        scores = []
        for start, end in itertools.pairwise(bounds):
            qi = q[start:end].transpose(0, 1)[None]  # (1, H, n, d)
            ki = k[start:end].transpose(0, 1)[None]
            cols = torch.arange(end - start, device=q.device)[None]
            scores.append(ops.visual_attention(qi, ki, None, cols, causal=False, scale=attn.scaling)[0])
        return torch.cat(scores), keys

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        if selection is None:
            return self._project(tokens.hidden)
        if selection.space == "projected":
            return selection.apply(tokens.projected())
        return self._project(selection.apply(tokens.hidden))

    def positions(self, kwargs: dict, *, generate: bool) -> torch.Tensor | None:
        """M-RoPE positions of the unpruned sequence, as the unpatched model computes them.

        ``generate()`` hands the model ``[text; t; h; w]`` positions (4, B, L); a plain forward computes (3, B, L).
        """
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"]
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        types = kwargs.get("mm_token_type_ids")
        if types is None:
            raise ValueError(
                "mm_token_type_ids is missing: Qwen2-VL needs it for M-RoPE (the processor returns it)"
            )
        vision, _deltas = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=types,
            image_grid_thw=kwargs.get("image_grid_thw"),
            attention_mask=mask,
        )
        if not generate:
            return vision
        text = (
            mask.long().cumsum(-1) - 1
            if mask is not None
            else torch.arange(input_ids.shape[1]).expand_as(input_ids)
        )
        if mask is not None:
            text = text.masked_fill(mask == 0, 0)
        return torch.cat([text[None].to(vision.device), vision], dim=0)

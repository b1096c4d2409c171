"""Qwen3-VL: Qwen2-VL's recipe (no [CLS], 2x2 merged units, M-RoPE) plus DeepStack.

What differs from :mod:`.qwen2_vl` (transformers 5.24, ``models/qwen3_vl/modeling_qwen3_vl.py``):

- DeepStack: the outputs of the ViT blocks listed in ``vision_config.deepstack_visual_indexes`` go through their own
  patch mergers (``deepstack_merger_list``) and are *added* to the hidden states of the visual positions after each of
  the first ``D = len(deepstack_visual_indexes)`` LLM layers (level ``j`` after layer index ``j``). The model takes
  them precomputed: ``mm_encoder_outputs["image"]`` is a ``BaseModelOutputWithDeepstackFeatures`` whose
  ``pooler_output`` holds one (k_i, D) tensor per image and whose ``deepstack_features`` holds, per level, one
  (k_i, D) tensor per image; the model finds the visual positions from the (shrunk) ``input_ids`` placeholders.
  That is the attach point: the vision stage hands over the main *and* the DeepStack features of exactly the tokens
  that survive, in the same order, so no forward is copied.
- Merge rule: every DeepStack level is reduced with the *same* :class:`~visiondrop.ops.Selection` as the main
  features — the same kept units and, for contextual tokens, the same anchors and member assignment — at the same
  point of its merger: after the merger's norm (each DeepStack merger normalises the concatenated 2x2 vector,
  the main one each patch) and before its MLP. A kept unit therefore receives exactly the DeepStack features the
  unpruned model gives it. Selections made in the projected space (DivPrune) are applied to each level's projected
  features likewise.
- In-LLM boundaries: the model adds DeepStack features at a mask computed once for the whole LLM pass, so the
  sequence must not change while levels are still to be added. A boundary after LLM layer ``l`` (``Stage.layer``,
  before layer index ``l``) comes after the additions of layer indices ``< l``; it is allowed when ``l >= D`` and
  refused with one line otherwise (:meth:`Qwen3VLAdapter.check_schedule`). Boundaries that keep every token are
  allowed anywhere (they change nothing).
- Patch merger layout: ``merger.norm`` + ``linear_fc1``/``act_fn``/``linear_fc2`` (Qwen2-VL: ``ln_q`` + ``mlp``); no
  window attention; 16-px patches. Scoring, positions (interleaved M-RoPE computed by the model's own
  ``get_rope_index`` and gathered, ``compact`` refused) and refusals are Qwen2-VL's.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .. import ops
from ..schedule import Schedule
from .base import VisionTokens, register_adapter
from .family import Family, register_family
from .qwen2_vl import Qwen2VLAdapter, QwenVisionTokens
from .qwen2_vl import _arch_fields as qwen2_vl_arch_fields
from .qwen2_vl import _bench_image as qwen2_vl_bench_image
from .qwen2_vl import _image_shape as qwen2_vl_image_shape

__all__ = ["FAMILY", "Qwen3VLAdapter"]


class Qwen3VisionTokens(QwenVisionTokens):
    """One Qwen3-VL image: its merged units, plus the pre-MLP units of every DeepStack level."""

    def __init__(self, *args, deepstack: list[torch.Tensor], **kwargs) -> None:
        """
        Parameters
        ----------
        deepstack : list of Tensor, each of shape (1, n, 4 * Dv)
            Per DeepStack level, the normalised concatenated patch vectors of every unit (its merger MLP's input).
        """
        super().__init__(*args, **kwargs)
        self.deepstack = deepstack


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    """``Qwen3VLForConditionalGeneration`` (images and videos)."""

    model_classes = ("Qwen3VLForConditionalGeneration",)
    family = "Qwen3-VL"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.deepstack_indexes: list[int] = list(self.config.vision_config.deepstack_visual_indexes)
        self.deepstack_mergers: nn.ModuleList = self.visual.deepstack_merger_list

    @property
    def deepstack_layers(self) -> int:
        """``D``: the first ``D`` LLM layers (indices ``0..D-1``) receive DeepStack features after running."""
        return len(self.deepstack_indexes)

    def check_schedule(self, schedule: Schedule) -> None:
        """Refuse an in-LLM boundary that prunes while DeepStack levels are still to be added (one line)."""
        previous = schedule.vision.tokens
        for stage in schedule.boundaries:
            if stage.layer < self.deepstack_layers and stage.tokens < previous:
                raise ValueError(
                    f"boundary after layer {stage.layer}: Qwen3-VL adds DeepStack features to the visual tokens "
                    f"after each of its first {self.deepstack_layers} LLM layers; in-LLM boundaries must be at "
                    f"layer >= {self.deepstack_layers}"
                )
            previous = stage.tokens

    @staticmethod
    def _run_merger(merger: nn.Module, units: torch.Tensor) -> torch.Tensor:
        """A Qwen3-VL patch merger's MLP on already normalised, concatenated units (..., 4 * Dv)."""
        return merger.linear_fc2(merger.act_fn(merger.linear_fc1(units)))

    def _project(self, units: torch.Tensor) -> torch.Tensor:
        return self._run_merger(self.visual.merger, units)

    def _make_tokens(self, parts: list[torch.Tensor], grids: tuple[tuple[int, int], ...]) -> VisionTokens:
        units, scores, keys, *deep = parts
        return Qwen3VisionTokens(units, scores, keys, grids, self._project, deepstack=deep)

    def _tower(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> list[tuple[list[torch.Tensor], tuple[int, int, int]]]:
        """Qwen2-VL's tensors per item, then the pre-MLP units (n, 4 Dv) of every DeepStack level."""
        pixel_values = pixel_values.type(self.visual.dtype)
        captured: dict[str, object] = {}
        levels: dict[int, torch.Tensor] = {}

        def grab_input(module, args, hook_kwargs):
            captured["input"] = args[0] if args else hook_kwargs["hidden_states"]
            captured["rope"] = hook_kwargs["position_embeddings"]
            captured["cu_seqlens"] = hook_kwargs["cu_seqlens"]

        def grab_output(module, args, output):
            captured["output"] = output

        def grab_level(level, module, args, output):
            levels[level] = output

        handles = [self.scoring_block.register_forward_pre_hook(grab_input, with_kwargs=True)]
        handles.append(self.visual.blocks[self.last_block].register_forward_hook(grab_output))
        for level, block in enumerate(self.deepstack_indexes):
            handles.append(self.visual.blocks[block].register_forward_hook(partial(grab_level, level)))
        try:
            self.visual(pixel_values, grid_thw=grid_thw)
        finally:
            for handle in handles:
                handle.remove()

        unit = self.merge * self.merge
        scores, keys = self._patch_scores(captured)
        output = captured["output"]
        units = self.visual.merger.norm(output).view(-1, unit * output.shape[-1])
        # DeepStack mergers normalise the concatenated 2x2 vector (use_postshuffle_norm): view first, then norm.
        deep = [
            merger.norm(levels[level].view(-1, unit * output.shape[-1]))
            for level, merger in enumerate(self.deepstack_mergers)
        ]
        unit_scores = scores.view(-1, unit).sum(1)
        unit_keys = keys.view(-1, unit, keys.shape[-1]).mean(1)
        counts = (grid_thw.prod(-1) // unit).tolist()
        splits = [u.split(counts) for u in (units, unit_scores, unit_keys, *deep)]
        return [([parts[item] for parts in splits], tuple(g)) for item, g in enumerate(grid_thw.tolist())]

    def features(self, tokens: Qwen3VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        """Main features, then every DeepStack level, concatenated on the feature axis: (I, k, (1 + D) * D_llm).

        The runtime hands per-image rows of this tensor to :meth:`mm_encoder_outputs`, which splits them again.
        """
        parts = [super().features(tokens, selection)]
        for units, merger in zip(tokens.deepstack, self.deepstack_mergers, strict=True):
            if selection is None:
                parts.append(self._run_merger(merger, units))
            elif selection.space == "projected":
                parts.append(selection.apply(self._run_merger(merger, units)))
            else:
                parts.append(self._run_merger(merger, selection.apply(units)))
        return torch.cat(parts, dim=-1)

    def mm_encoder_outputs(self, features: list[torch.Tensor]) -> dict:
        """Per-unit (k_i, (1 + D) * D_llm) rows of :meth:`features` as Qwen3-VL's ``mm_encoder_outputs``, images
        under ``"image"`` and video units under ``"video"`` (the model joins both kinds' DeepStack features in
        placeholder order itself)."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        out = {}
        for kind in ("image", "video"):
            chosen = [f for f, k in zip(features, self._kinds, strict=True) if k == kind]
            if not chosen:
                continue
            chunks = [f.chunk(1 + self.deepstack_layers, dim=-1) for f in chosen]
            main = [c[0] for c in chunks]
            deepstack = [[c[1 + level] for c in chunks] for level in range(self.deepstack_layers)]
            out[kind] = BaseModelOutputWithDeepstackFeatures(pooler_output=main, deepstack_features=deepstack)
        return out


def _vision_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The ViT blocks and the main merger's MLP-bearing module (DeepStack mergers are counted by the FLOPs fields)."""
    visual = model.model.visual
    return visual.blocks, visual.merger


FAMILY = register_family(
    Family(
        name=Qwen3VLAdapter.family,
        model_types=("qwen3_vl",),
        model_classes=Qwen3VLAdapter.model_classes,
        has_cls=Qwen3VLAdapter.has_cls,
        arch_fields=qwen2_vl_arch_fields,
        image_shape=qwen2_vl_image_shape,
        bench_image=qwen2_vl_bench_image,
        vision_parts=_vision_parts,
    )
)

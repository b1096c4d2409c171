"""Qwen2-VL and Qwen2.5-VL in vLLM with visiondrop's vision stage, each kept token at its own 3-D M-RoPE position.

Placeholders: vLLM fixes each image's placeholder count when it processes the prompt, from ``image_grid_thw``, and
slices the encoder output by that count. The processor here writes ``schedule.vision.tokens`` placeholders per image
(the schedule the Hugging Face path uses, for the image's ``rows x cols`` merged units) and the image step returns
exactly that many embeddings.

Scoring and merging follow the Hugging Face adapter (:mod:`visiondrop.models.qwen2_vl`): the visual attention each
patch receives at the last full-attention ViT block (Qwen2-VL: the last block), from that block's fused ``qkv`` with
its 2-D rotary embedding, summed over each 2x2 merged unit; methods choose among the units, contextual tokens merge
before the merger's MLP.

Positions (``positions="preserve"``, what ``"auto"`` means for M-RoPE; ``"compact"`` is refused as on the Hugging
Face path): every kept token keeps the ``(t, h, w)`` position it has in the unpruned sequence (a merged token its
anchor's) and the text after an image keeps its unpruned positions, so decoding continues where the unpruned prompt
would. vLLM computes a prompt's M-RoPE positions when the request arrives (``get_mrope_input_positions``), before the
image is encoded, so only the text positions and each image's start are known then; which units survive is known
once the image step ran. vLLM's own hook for this (``SupportsMultiModalPruning.recompute_mrope_positions``) runs only
when ``video_pruning_rate`` > 0, and vLLM 0.32's CPU model runner never runs it (its ``load_model`` leaves
``is_multimodal_pruning_enabled`` False). So the image step appends each kept unit's (row, column) in the image to
its embedding as extra channels, ``embed_input_ids`` splits them off, and ``forward`` adds them to the placeholders'
positions, which ``get_mrope_input_positions`` set to the image's start: one step's embeddings and positions are
the runner's own buffers of that step, on every runner. Videos are not accepted (the processing info declares
images only).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ... import ops
from ...methods.base import PruningMethod, refuse_without_cls
from ...models.qwen2_vl import QwenVisionTokens
from ...schedule import Stage
from ...tokens import ImageInfo
from ...vllm import check_vision_only, method_from_config

__all__ = [
    "VisionDropQwen2VLForConditionalGeneration",
    "VisionDropQwen2_5_VLForConditionalGeneration",
    "checked_method",
    "mrope_positions",
    "vision_stage",
]

FAMILY = "Qwen2-VL"
# Each kept unit's (row, column) rides on its embedding as four extra channels, (row // 256, row % 256,
# col // 256, col % 256): every value below 256 is exact in bf16 and fp16 as well as fp32.
_POSITION_CHANNELS = 4
_BASE = 256


def checked_method(config: Any) -> PruningMethod:
    """The method in ``config.visiondrop``, refused (one-line ValueError naming the value) where the plugin cannot
    run it on Qwen2-VL / Qwen2.5-VL: in-LLM stages, a [CLS]-ranked method, ``positions="compact"``."""
    method = method_from_config(config)
    check_vision_only(method, config.text_config.num_hidden_layers)
    if method.requires_cls:
        refuse_without_cls(method.name, FAMILY)
    if method.positions == "compact":
        raise ValueError(
            f"positions='compact' has no meaning for {FAMILY} (3-D M-RoPE positions); the plugin keeps every kept "
            "token's own position: use positions='preserve' or 'auto'"
        )
    return method


def vision_stage(method: PruningMethod, config: Any, rows: int, cols: int) -> Stage:
    """The vision stage ``method`` runs on an image of ``rows x cols`` merged units (as the Hugging Face path
    schedules one image: ``for_unit``, then ``schedule`` with the image's unit grid).

    Raises ValueError (one line naming the value) when the budget does not fit the image or the schedule prunes
    inside the LLM.
    """
    info = ImageInfo(tokens=rows * cols, grids=((rows, cols),))
    schedule = method.for_unit(info).schedule(info.tokens, config.text_config.num_hidden_layers, info.grids)
    if schedule.boundaries:
        raise ValueError(
            f"{method.name}: schedule {schedule.describe()} prunes inside the LLM, which vLLM cannot run"
        )
    return schedule.vision


def mrope_positions(num_tokens: int, images: Sequence[tuple[int, int, int, int]]) -> tuple[torch.Tensor, int]:
    """M-RoPE positions of a prompt whose images kept some of their units, before the kept units are known.

    Parameters
    ----------
    num_tokens : int
        Prompt length (with each image's kept placeholders).
    images : sequence of (offset, placeholders, rows, cols)
        Per image in prompt order: its first placeholder's index, its placeholder count, its unit grid.

    Returns
    -------
    positions : LongTensor, shape (3, num_tokens)
        Text tokens at their unpruned positions; every placeholder of an image at the image's start ``s`` on all three
        axes (unit ``(r, c)`` belongs at ``(s, s + r, s + c)``; the model adds ``(0, r, c)`` once it is known).
    delta : int
        The position after the prompt minus its length (where decoding continues, as in the unpruned prompt).
    """
    positions = torch.empty(3, num_tokens, dtype=torch.long)
    cursor = position = 0  # next prompt index, next free position
    for offset, placeholders, rows, cols in sorted(images):
        text = offset - cursor
        positions[:, cursor:offset] = torch.arange(position, position + text)
        position += text
        positions[:, offset : offset + placeholders] = position
        position += max(rows, cols)  # the unpruned image spans t = 0, h < rows, w < cols
        cursor = offset + placeholders
    positions[:, cursor:] = torch.arange(position, position + num_tokens - cursor)
    position += num_tokens - cursor
    return positions, position - num_tokens


class _KeptCountInfo:
    """Processing info: one placeholder per kept unit; images only."""

    @cached_property
    def _method(self) -> PruningMethod:
        return checked_method(self.get_hf_config())

    def kept_tokens(self, rows: int, cols: int) -> int:
        return vision_stage(self._method, self.get_hf_config(), rows, cols).tokens

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}

    def get_num_image_tokens(
        self, *, image_width: int, image_height: int, image_processor: Any, mm_kwargs: Mapping[str, object]
    ) -> int:
        size, _ = self._get_vision_info(
            image_width=image_width,
            image_height=image_height,
            num_frames=1,
            image_processor=image_processor,
            mm_kwargs=mm_kwargs,
            modality="image",
        )
        vision = self.get_hf_config().vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        return self.kept_tokens(size.height // unit, size.width // unit)


class _KeptCountProcessor:
    """Processor: each image's placeholder run is its kept count, from its ``image_grid_thw``."""

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Sequence[PromptReplacement]:
        image_token = self.info.get_hf_processor(**hf_processor_mm_kwargs).image_token
        image_id = self.info.get_tokenizer().get_vocab()[image_token]
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def kept(item_idx: int) -> list[int]:
            _, h, w = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            return [image_id] * self.info.kept_tokens(h // merge, w // merge)

        return [PromptReplacement(modality="image", target=[image_id], replacement=kept)]


class _PrunedQwen:
    """The model side, shared by both versions: the image step prunes, positions get the kept units' offsets."""

    def _setup_pruning(self, vllm_config: Any) -> None:
        config = vllm_config.model_config.hf_config
        self.method = checked_method(config)
        rate = vllm_config.model_config.multimodal_config.video_pruning_rate
        if rate:
            raise ValueError(
                f"video_pruning_rate={rate}: vLLM's video pruning does not combine with the visiondrop plugin "
                "(which accepts images only)"
            )
        if not vllm_config.model_config.uses_mrope:
            raise ValueError(
                "the model config has no M-RoPE (rope_parameters without mrope_section): the visiondrop plugin "
                "places kept tokens by their 3-D positions"
            )
        visual = self.visual
        blocks = visual.blocks
        full = getattr(visual, "fullatt_block_indexes", None)  # Qwen2.5-VL: window attention elsewhere
        self.scoring_block = blocks[max(full) if full else len(blocks) - 1]
        self.last_block = blocks[len(blocks) - 1]
        attn = self.scoring_block.attn
        if attn.tp_size != 1:
            raise ValueError(
                f"tensor_parallel_size={attn.tp_size} splits the ViT's heads; the visiondrop plugin scores with all "
                "heads in one process (tensor_parallel_size=1, or mm_encoder_tp_mode='data')"
            )
        self.merge = visual.spatial_merge_size
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- positions ------------------------------------------------------------------------------------------
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        images = []
        for feature in mm_features:
            if feature.modality != "image":
                raise ValueError(f"modality={feature.modality!r}: the visiondrop plugin accepts images only")
            _, h, w = feature.data["image_grid_thw"].data.tolist()
            place = feature.mm_position
            images.append((place.offset, place.length, h // self.merge, w // self.merge))
        return mrope_positions(len(input_tokens), images)

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: Any = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._pending = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        stripped, units = [], []
        for embeds in multimodal_embeddings:
            plain = embeds[:, :-_POSITION_CHANNELS]
            modality = getattr(embeds, "modality", None)
            if modality is not None:
                plain.modality = modality
            stripped.append(plain)
            units.append(embeds[:, -_POSITION_CHANNELS:].round().long())
        channels = torch.cat(units)
        offsets = torch.stack(
            [channels[:, 0] * _BASE + channels[:, 1], channels[:, 2] * _BASE + channels[:, 3]]
        )  # (2, k): row, column of each kept unit, in placeholder order
        self._pending = (torch.nonzero(is_multimodal).flatten(), offsets)
        return super().embed_input_ids(input_ids, stripped, is_multimodal=is_multimodal)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> Any:
        pending, self._pending = self._pending, None
        if pending is not None:
            columns, offsets = pending
            # The runner's position buffer for this step, rewritten from the request's positions every step.
            positions[1:, columns.to(positions.device)] += offsets.to(positions.device)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    # --- the image step -------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError("modality='video': the visiondrop plugin accepts images only")
        image = self._parse_and_validate_image_input(**kwargs)
        if image is None:
            return ()
        if image["type"] != "pixel_values":
            raise ValueError(
                f"image input type {image['type']!r}: the visiondrop plugin prunes from pixels (precomputed image "
                "embeddings have no attention to score)"
            )
        grids = [tuple(int(v) for v in g) for g in image["image_grid_thw"].tolist()]
        out = []
        for (_, h, w), (units, scores, keys) in zip(
            grids, self._tower(image["pixel_values"], grids), strict=True
        ):
            rows, cols = h // self.merge, w // self.merge  # an image is one temporal patch (t = 1)
            features, sources = self._select_one(units, scores, keys, rows, cols)
            out.append(torch.cat([features, self._position_channels(sources, cols, features)], dim=1))
        return tuple(out)

    @staticmethod
    def _position_channels(sources: torch.Tensor, cols: int, like: torch.Tensor) -> torch.Tensor:
        row, col = sources // cols, sources % cols
        channels = torch.stack([row // _BASE, row % _BASE, col // _BASE, col % _BASE], dim=1)
        return channels.to(device=like.device, dtype=like.dtype)

    def _project(self, units: torch.Tensor) -> torch.Tensor:
        """The merger's MLP (after its norm): vLLM's linear layers may return ``(output, bias)``."""
        x = units
        for layer in self.visual.merger.mlp:
            x = layer(x)
            if isinstance(x, tuple):
                x = x[0]
        return x

    def _select_one(
        self, units: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, rows: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision stage on one image of ``rows x cols`` units: its features (kept, D) and the unit each
        stands at (kept,), a merged token at its anchor."""
        stage = vision_stage(self.method, self.config, rows, cols)
        if stage.tokens == rows * cols:
            return self._project(units), torch.arange(rows * cols, device=units.device)
        tokens = QwenVisionTokens(units[None], scores[None], keys[None], ((rows, cols),), self._project)
        selection = self.method.select_vision(tokens, stage)
        if selection.num_out != stage.tokens:
            raise RuntimeError(
                f"{self.method.name} selected {selection.num_out} tokens at the vision stage, its schedule says "
                f"{stage.tokens}"
            )
        if selection.space == "projected":
            features = selection.apply(tokens.projected())
        else:
            features = self._project(selection.apply(tokens.hidden))
        return features[0], selection.sources()[0]

    def _tower(
        self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Run the ViT once on the call's images; per image its merged units (n, 4 Dv), their scores (n,) and mean
        keys (n, d), in raster order."""
        visual = self.visual
        metadata = visual.prepare_encoder_metadata([list(g) for g in grids])
        captured: dict[str, Any] = {}
        # vLLM's vision blocks are called through its compile wrapper, which skips module hooks: the two blocks' own
        # ``forward`` is wrapped for this call instead (their inputs and output are what the blocks computed).
        wrapped = []
        for block, key in ((self.scoring_block, "scoring"), (self.last_block, "last")):
            wrapped.append(block)
            block.forward = _recording(block.forward, captured, key)
        try:
            visual(pixel_values, grid_thw=[list(g) for g in grids], encoder_metadata=metadata)
        finally:
            for block in wrapped:
                block.__dict__.pop("forward", None)
        if "scoring" not in captured or "last" not in captured:
            raise RuntimeError("the ViT ran without calling its blocks' forward (a compiled vision encoder?)")
        args, kwargs, _ = captured["scoring"]
        captured["input"] = args[0] if args else kwargs["x"]
        captured["cos"], captured["sin"] = kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]
        captured["output"] = captured["last"][2]

        unit = self.merge * self.merge
        output = captured["output"]
        units = visual.merger.ln_q(output).reshape(-1, unit * output.shape[-1])
        scores, keys = self._patch_scores(captured, grids)
        scores = scores.view(-1, unit).sum(1)
        keys = keys.view(-1, unit, keys.shape[-1]).mean(1)
        restore = metadata.get("reverse_indices")  # Qwen2.5-VL ran window by window: back to raster order
        if restore is not None:
            units, scores, keys = units[restore], scores[restore], keys[restore]
        counts = [t * h * w // unit for t, h, w in grids]
        return list(zip(units.split(counts), scores.split(counts), keys.split(counts), strict=True))

    def _patch_scores(
        self, captured: dict[str, Any], grids: list[tuple[int, int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per patch (in the order the blocks ran): the attention it receives from its image's patches (the scoring
        block's q/k with its rotary embedding, heads averaged) and its pre-rotary key averaged over heads."""
        block = self.scoring_block
        attn = block.attn
        x = block.norm1(captured["input"]).flatten(0, 1)  # (S, D): the blocks run (S, 1, D)
        qkv, _ = attn.qkv(x)
        heads, dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
        q, k, _ = (part.reshape(-1, heads, dim) for part in qkv.chunk(3, dim=-1))  # (S, H, d)
        keys = k.float().mean(1)
        rotated = attn.apply_rotary_emb(torch.stack([q, k]).contiguous(), captured["cos"], captured["sin"])
        q, k = rotated.float().unbind(0)
        bounds = [0, *itertools.accumulate(t * h * w for t, h, w in grids)]
        scores = []
        for start, end in itertools.pairwise(bounds):  # one image per full-attention sequence (t = 1)
            qi = q[start:end].transpose(0, 1)[None]  # (1, H, n, d)
            ki = k[start:end].transpose(0, 1)[None]
            cols = torch.arange(end - start, device=q.device)[None]
            scores.append(ops.visual_attention(qi, ki, None, cols, causal=False, scale=dim**-0.5)[0])
        return torch.cat(scores), keys


def _recording(forward: Any, captured: dict[str, Any], key: str) -> Any:
    """``forward`` that also stores its ``(args, kwargs, output)`` under ``captured[key]``."""

    def record(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        captured[key] = (args, kwargs, output)
        return output

    return record


class VisionDropQwen2_5_VLProcessingInfo(_KeptCountInfo, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info with one placeholder per unit the vision stage keeps."""


class VisionDropQwen2_5_VLMultiModalProcessor(_KeptCountProcessor, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with each image's kept count of placeholders."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionDropQwen2_5_VLMultiModalProcessor,
    info=VisionDropQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VisionDropQwen2_5_VLForConditionalGeneration(_PrunedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with the vision stage of the method in ``config.visiondrop``."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        checked_method(vllm_config.model_config.hf_config)  # fail before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._setup_pruning(vllm_config)


class VisionDropQwen2VLProcessingInfo(_KeptCountInfo, Qwen2VLProcessingInfo):
    """Qwen2-VL's processing info with one placeholder per unit the vision stage keeps."""


class VisionDropQwen2VLMultiModalProcessor(_KeptCountProcessor, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor with each image's kept count of placeholders."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionDropQwen2VLMultiModalProcessor,
    info=VisionDropQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class VisionDropQwen2VLForConditionalGeneration(_PrunedQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with the vision stage of the method in ``config.visiondrop``."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        checked_method(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._setup_pruning(vllm_config)

"""The vision stage: each image's tokens are scored and reduced before the LLM, and the call's inputs shrink to match.

The adapter describes and encodes the images; the method selects; :func:`run` replaces every image's placeholder
run by the tokens that survive (``layout.py``), with positions per the policy (``positions.py``), and hands the
features to the model as ``mm_encoder_outputs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import ops
from ..layout import Layout, Span, find_image_spans
from ..report import selection_maps
from ..schedule import Schedule, Stage
from ..tokens import ImageInfo, VisionTokens
from . import positions
from .call import ImageOut, VisionOutcome
from .checks import check_selection

if TYPE_CHECKING:
    from .session import Session

__all__ = ["encoded_by_caller", "identity_image", "run"]


def run(session: Session, kwargs: dict, *, generate: bool) -> VisionOutcome:
    """Run the vision stage on the call's images and rewrite ``kwargs`` in place when tokens were removed."""
    adapter = session.adapter
    input_ids = kwargs["input_ids"]
    infos = adapter.image_infos(kwargs)
    spans = find_image_spans(input_ids, adapter.placeholder_ids(infos), [i.tokens for i in infos])
    device = input_ids.device
    for info in infos:
        session.method.for_unit(info)  # raises when the budget does not fit the image (or a video's frame)
    schedules = [session.schedule(info) for info in infos]
    stages = [schedule.vision for schedule in schedules]
    if all(stage.tokens == info.tokens for stage, info in zip(stages, infos, strict=True)):
        images = [identity_image(info, device) for info in infos]
        return VisionOutcome(infos, images, schedules, spans, changed=False)

    outs: list[ImageOut | None] = [None] * len(infos)
    features: list[torch.Tensor | None] = [None] * len(infos)
    for images, tokens in adapter.encode(kwargs):
        stage = stages[images[0]]
        if stage.tokens == infos[images[0]].tokens:
            selection = None
        else:
            with session.timed("vision_select_s"):
                selection = session.method.select_vision(tokens, stage)
            check_selection(selection, stage, "vision stage")
        feats = adapter.features(tokens, selection)
        for row, image in enumerate(images):
            features[image] = feats[row]
            if selection is None:
                outs[image] = identity_image(infos[image], device)
            else:
                outs[image] = _image_out(infos[image], stage, tokens, row, selection)

    with session.timed("vision_select_s"):
        return _shrink_inputs(session, kwargs, spans, infos, schedules, outs, features, generate=generate)


def encoded_by_caller(session: Session, kwargs: dict) -> VisionOutcome:
    """A call whose caller encoded the images (``mm_encoder_outputs``): no vision stage, in-LLM stages only."""
    if kwargs["mm_encoder_outputs"].get("video") is not None:
        raise ValueError(
            "mm_encoder_outputs['video']: videos must come as pixel_values_videos, so that visiondrop splits "
            "them into frames; video features encoded by the caller are not supported"
        )
    feats = kwargs["mm_encoder_outputs"]["image"].pooler_output
    infos = [ImageInfo(f.shape[0]) for f in feats]
    spans = find_image_spans(kwargs["input_ids"], session.adapter.image_token_id, [i.tokens for i in infos])
    images = [identity_image(info, f.device) for info, f in zip(infos, feats, strict=True)]
    schedules = [session.schedule(info) for info in infos]
    return VisionOutcome(infos, images, schedules, spans, changed=False)


def identity_image(info: ImageInfo, device: torch.device) -> ImageOut:
    """An image that kept every token."""
    token_patch = torch.tensor(info.placeholder_patches(), dtype=torch.long, device=device)
    owner = torch.full((info.num_patches,), -1, dtype=torch.long, device=device)
    carried = token_patch >= 0
    owner[token_patch[carried]] = torch.nonzero(carried).flatten()
    return ImageOut(
        info=info,
        stage=Stage(0, info.tokens, 0),
        offsets=torch.arange(info.tokens, device=device),
        token_patch=token_patch,
        patch_owner=owner,
        contextual=0,
        projected=info.tokens,
    )


def _image_out(
    info: ImageInfo, stage: Stage, tokens: VisionTokens, row: int, selection: ops.Selection
) -> ImageOut:
    sources = selection.sources()[row]
    token_patch = tokens.patch_index[sources]
    owner_of_token = selection_maps(
        selection.select(torch.tensor([row], device=sources.device)), tokens.num_tokens
    )[0]
    patch_owner = torch.full((info.num_patches,), -1, dtype=torch.long, device=sources.device)
    is_patch = tokens.patch_index >= 0
    patch_owner[tokens.patch_index[is_patch]] = owner_of_token[is_patch]
    return ImageOut(
        info=info,
        stage=stage,
        offsets=tokens.placeholder_offset[sources],
        token_patch=token_patch,
        patch_owner=patch_owner,
        contextual=selection.num_merged,
        projected=tokens.num_tokens if selection.space == "projected" else selection.num_out,
    )


def _shrink_inputs(
    session: Session,
    kwargs: dict,
    spans: list[list[Span]],
    infos: list[ImageInfo],
    schedules: list[Schedule],
    outs: list[ImageOut],
    features: list[torch.Tensor],
    *,
    generate: bool,
) -> VisionOutcome:
    """Replace every image's placeholder run in ``kwargs`` by its surviving tokens; positions per the policy."""
    adapter = session.adapter
    input_ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    full_mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    layout = Layout.build(spans, full_mask, {i: out.offsets for i, out in enumerate(outs)})
    new_ids = layout.gather(input_ids, fill=_pad_id(session.model.config))
    new_mask_bool = layout.gather(full_mask, fill=False)
    old_positions = positions.prompt(adapter, kwargs, generate=generate)
    new_positions = positions.after_layout(layout, old_positions, session.positions)
    aligned = {k: layout.gather(kwargs[k]) for k in adapter.aligned_kwargs() if kwargs.get(k) is not None}
    if mask is None and bool(new_mask_bool.all()):
        new_mask = None
    else:
        new_mask = new_mask_bool.to(mask.dtype if mask is not None else torch.long)

    kwargs["input_ids"] = new_ids
    kwargs["attention_mask"] = new_mask
    kwargs["position_ids"] = new_positions
    kwargs.update(aligned)
    kwargs["mm_encoder_outputs"] = adapter.mm_encoder_outputs(features)
    for key in adapter.vision_kwargs():
        kwargs.pop(key, None)
    return VisionOutcome(
        infos,
        outs,
        schedules,
        layout.spans,
        changed=True,
        orig_ids=input_ids,
        new_ids=new_ids,
        new_mask=new_mask,
        new_positions=new_positions,
        new_aligned=aligned,
    )


def _pad_id(config: Any) -> int:
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if value is not None:
            return int(value)
    return 0

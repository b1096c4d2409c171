"""Tiny random LVLMs built from configs: for tests, demos and quick benchmarks (nothing is downloaded).

They are real ``transformers`` classes with random weights, shaped like the families visiondrop supports, so the code
paths are the ones a checkpoint loaded with ``from_pretrained`` takes.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

__all__ = [
    "BOS",
    "EOS",
    "IMAGE_TOKEN",
    "INTERNVL_TILE",
    "PAD",
    "QWEN_VIDEO",
    "QWEN_VISION_END",
    "QWEN_VISION_START",
    "VIDEO_TOKEN",
    "internvl_inputs",
    "llava_next_placeholders",
    "llava_next_video_inputs",
    "llava_onevision_placeholders",
    "pocket_llava_next",
    "qwen_inputs",
    "tiny_internvl",
    "tiny_internvl_config",
    "tiny_llava",
    "tiny_llava_config",
    "tiny_llava_next",
    "tiny_llava_next_config",
    "tiny_llava_next_video",
    "tiny_llava_next_video_config",
    "tiny_llava_onevision",
    "tiny_llava_onevision_config",
    "tiny_qwen2_vl",
    "tiny_qwen2_vl_config",
    "tiny_video_llava",
    "tiny_video_llava_config",
    "video_llava_inputs",
]

#: Placeholder id of the tiny models (vocabulary of 100).
IMAGE_TOKEN = 99
PAD, BOS, EOS = 0, 1, 2


def tiny_llava_config(
    *,
    image_size: int = 112,
    layers: int = 8,
    kv_heads: int = 2,
    attn: str = "sdpa",
    init: float = 0.3,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP ViT with [CLS] (patch 14), a Llama LLM with GQA.

    ``init`` is the weight initialisation range; a large one makes greedy outputs vary token to token, which is what
    tests comparing generations need.
    """
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        initializer_range=init,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    config._attn_implementation = attn
    return config


def tiny_llava(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs
) -> LlavaForConditionalGeneration:
    """A random :class:`~transformers.LlavaForConditionalGeneration` from :func:`tiny_llava_config`, in eval mode."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs)).eval().to(dtype)
    model.generation_config.pad_token_id = PAD
    return model


def tiny_llava_next_config(
    *, layers: int = 8, kv_heads: int = 2, attn: str = "sdpa", init: float = 0.3, text: str = "llama"
):
    """A LLaVA-NeXT-shaped config: 56 px crops of 4 x 4 patches, AnyRes pinpoints up to 2 x 2 crops."""
    from transformers import LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        initializer_range=init,
    )
    text_kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
    )
    text_config = (
        MistralConfig(**text_kwargs, sliding_window=4096) if text == "mistral" else LlamaConfig(**text_kwargs)
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [56, 168]],
    )
    config._attn_implementation = attn
    return config


def tiny_llava_next(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random :class:`~transformers.LlavaNextForConditionalGeneration` from :func:`tiny_llava_next_config`."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny_llava_next_config(**config_kwargs)).eval().to(dtype)
    with torch.no_grad():  # a visible newline embedding (it is zeros-initialised in some versions)
        model.model.image_newline.normal_(0, 0.3)
    model.generation_config.pad_token_id = PAD
    return model


def pocket_llava_next(
    folder,
    *,
    pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672)),
    seed: int = 0,
):
    """Save the shipped pocket LVLM as a LLaVA-NeXT checkpoint in ``folder`` and return its path.

    The pocket model's CLIP tower, projector and LLM (trained weights) under
    :class:`~transformers.LlavaNextForConditionalGeneration`, with a random ``image_newline`` and AnyRes
    ``pinpoints`` of 336 px crops; the processor is a :class:`~transformers.LlavaNextProcessor` around the pocket
    tokenizer and chat template and LLaVA-NeXT's PIL image processor. Its answers are not trained for the extra
    crops: it exists so that code loading real LLaVA-NeXT checkpoints (vLLM, the CLI) has one that loads offline.
    """
    from pathlib import Path

    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from .testbed import load_testbed

    pocket, processor = load_testbed()
    source = pocket.config
    config = LlavaNextConfig(
        vision_config=source.vision_config.to_dict(),
        text_config={
            **source.text_config.to_dict(),
            "max_position_embeddings": 4096,
        },  # AnyRes prompts ~1,800
        image_token_id=source.image_token_id,
        image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_feature_layer=source.vision_feature_layer,
        vision_feature_select_strategy=source.vision_feature_select_strategy,
        projector_hidden_act=source.projector_hidden_act,
        multimodal_projector_bias=source.multimodal_projector_bias,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(pocket.state_dict(), strict=False)
    if unexpected or [name for name in missing if not name.endswith("image_newline")]:
        raise RuntimeError(
            f"pocket weights do not fit LLaVA-NeXT: missing {missing}, unexpected {unexpected}"
        )
    with torch.no_grad():
        model.model.image_newline.normal_(0, 0.02)
    model.generation_config = pocket.generation_config
    crop = source.vision_config.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=[list(p) for p in pinpoints],
        image_mean=processor.image_processor.image_mean,
        image_std=processor.image_processor.image_std,
        do_pad=True,
    )
    next_processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=source.vision_config.patch_size,
        vision_feature_select_strategy=source.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token=processor.image_token,
        chat_template=processor.chat_template,
    )
    next_processor.tokenizer.model_max_length = 4096
    folder = Path(folder)
    model.save_pretrained(folder)
    next_processor.save_pretrained(folder)
    return folder


def llava_next_placeholders(model, image_size: tuple[int, int]) -> int:
    """Placeholder tokens LLaVA-NeXT gives an image of ``image_size`` (h, w), as its processor counts them."""
    from .models.llava_next import LlavaNextAdapter

    return (
        LlavaNextAdapter(model)
        .image_infos({"pixel_values": True, "image_sizes": torch.tensor([image_size])})[0]
        .tokens
    )


def tiny_llava_onevision_config(
    *, layers: int = 8, kv_heads: int = 2, attn: str = "sdpa", init: float = 0.3, max_patches: int = 3
):
    """A LLaVA-OneVision-shaped config: SigLIP (no [CLS]) crops of 56 px = 4 x 4 patches, AnyRes pinpoints up to
    3 x 3 crops, ``anyres_max_{max_patches}`` (3: a grid of more than 1.1² x 3 base views is downscaled, so 2 x 2
    and 3 x 3 grids are, 1 x 2 ones are not), an 8-layer Qwen2 LLM of width 64 with GQA."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        vision_use_head=False,
        initializer_range=init,
    )
    text = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=QWEN_VIDEO,
        image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56], [168, 168]],
        vision_aspect_ratio=f"anyres_max_{max_patches}",
    )
    config._attn_implementation = attn
    return config


def tiny_llava_onevision(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random :class:`~transformers.LlavaOnevisionForConditionalGeneration` from
    :func:`tiny_llava_onevision_config`, in eval mode, with a visible ``image_newline``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = (
        LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config(**config_kwargs)).eval().to(dtype)
    )
    with torch.no_grad():
        model.model.image_newline.normal_(0, 0.3)
    model.generation_config.pad_token_id = PAD
    return model


def llava_onevision_placeholders(model, image_size: tuple[int, int]) -> int:
    """Placeholder tokens LLaVA-OneVision gives an image of ``image_size`` (h, w), as its processor counts them."""
    from .models.llava_onevision import LlavaOnevisionAdapter

    return (
        LlavaOnevisionAdapter(model)
        .image_infos({"pixel_values": True, "image_sizes": torch.tensor([image_size])})[0]
        .tokens
    )


def llava_onevision_inputs(
    model,
    rows: list[list],
    sizes: list[tuple[int, int]],
    *,
    frames: int = 4,
    seed: int = 1,
    side: str = "left",
) -> dict:
    """A padded LLaVA-OneVision batch: ``"image"`` expands to the next of ``sizes`` (h, w) as the processor counts
    it, ``"video"`` to ``frames x 4 + 1`` video placeholders (56 px frames of 4 x 4 patches pooled bilinearly to
    2 x 2, then the video's one newline)."""
    images = iter(sizes)
    expanded = []
    videos = 0
    for row in rows:
        ids = []
        for item in row:
            if item == "image":
                ids += [IMAGE_TOKEN] * llava_onevision_placeholders(model, next(images))
            elif item == "video":
                ids += [int(model.config.video_token_id)] * (frames * 4 + 1)
                videos += 1
            else:
                ids.append(item)
        expanded.append(ids)
    length = max(len(r) for r in expanded)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(expanded):
        cols = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[i, cols] = torch.tensor(ids)
        mask[i, cols] = 1
    gen = torch.Generator().manual_seed(seed)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if sizes:
        batch["pixel_values"] = torch.randn(len(sizes), 10, 3, 56, 56, generator=gen)  # padded: base + 3 x 3
        batch["image_sizes"] = torch.tensor(sizes)
    if videos:
        batch["pixel_values_videos"] = torch.randn(videos, frames, 3, 56, 56, generator=gen)
    return batch


#: Special ids of the tiny Qwen models (vocabulary of 100).
QWEN_VISION_START, QWEN_VISION_END, QWEN_VIDEO = 96, 97, 98


def tiny_qwen2_vl_config(
    *, version: str = "2", layers: int = 8, kv_heads: int = 2, attn: str = "sdpa", init: float = 0.3
):
    """A Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``, window attention) shaped config: 2 ViT blocks of width 32,
    2x2 patch merger, an 8-layer Qwen2 LLM of width 64 with M-RoPE."""
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    ids = dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
    )
    if version == "2":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=init,
        )
        config = Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            initializer_range=init,
        )
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config._attn_implementation = attn
    return config


def tiny_qwen2_vl(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random Qwen2-VL / Qwen2.5-VL from :func:`tiny_qwen2_vl_config`, in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_qwen2_vl_config(**config_kwargs)
    cls = (
        Qwen2VLForConditionalGeneration
        if config.model_type == "qwen2_vl"
        else Qwen2_5_VLForConditionalGeneration
    )
    model = cls(config).eval().to(dtype)
    model.generation_config.pad_token_id = PAD
    return model


def qwen_inputs(
    rows: list[list],
    grids: list[tuple[int, int]],
    *,
    seed: int = 1,
    side: str = "left",
    videos: list[tuple[int, int, int]] = (),
    frame_text: int | None = None,
    patch: int = 14,
) -> dict:
    """A padded Qwen batch. ``rows`` mix token ids and the markers ``"image"``, which expands to
    ``<vision_start> <image>*n <vision_end>`` for the next grid ``(h, w)`` in patches (even numbers), and ``"video"``,
    which expands to ``<vision_start> <video>*n <vision_end>`` for the next of ``videos`` ``(t, h, w)`` (temporal
    patches, patches). With ``frame_text`` every temporal patch gets its own ``<vision_start> .. <vision_end>``
    preceded by that token id (Qwen3-VL's processor puts a timestamp there). Pixels are random, ``patch`` px."""
    expanded, types = [], []
    grid_iter, video_iter = iter(grids), iter(videos)
    for row in rows:
        ids, kinds = [], []
        for item in row:
            if item == "image":
                h, w = next(grid_iter)
                n = h * w // 4
                ids += [QWEN_VISION_START, *[IMAGE_TOKEN] * n, QWEN_VISION_END]
                kinds += [0, *[1] * n, 0]
            elif item == "video":
                t, h, w = next(video_iter)
                n = h * w // 4
                chunks = [n] * t if frame_text is not None else [n * t]
                for chunk in chunks:
                    if frame_text is not None:
                        ids.append(frame_text)
                        kinds.append(0)
                    ids += [QWEN_VISION_START, *[QWEN_VIDEO] * chunk, QWEN_VISION_END]
                    kinds += [0, *[2] * chunk, 0]
            else:
                ids.append(item)
                kinds.append(0)
        expanded.append(ids)
        types.append(kinds)
    length = max(len(r) for r in expanded)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    mm_types = torch.zeros_like(input_ids)
    for i, (ids, kinds) in enumerate(zip(expanded, types, strict=True)):
        cols = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[i, cols] = torch.tensor(ids)
        mask[i, cols] = 1
        mm_types[i, cols] = torch.tensor(kinds)
    gen = torch.Generator().manual_seed(seed)
    batch = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm_types}
    if grids:
        patches = sum(h * w for h, w in grids)
        batch["pixel_values"] = torch.randn(patches, 3 * 2 * patch * patch, generator=gen)
        batch["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
    if videos:
        patches = sum(t * h * w for t, h, w in videos)
        batch["pixel_values_videos"] = torch.randn(patches, 3 * 2 * patch * patch, generator=gen)
        batch["video_grid_thw"] = torch.tensor([list(v) for v in videos])
    return batch


def tiny_qwen3_vl_config(*, layers: int = 8, kv_heads: int = 2, attn: str = "sdpa", init: float = 0.3):
    """A Qwen3-VL-shaped config: 3 ViT blocks of width 32 (16-px patches, 2x2 merger) whose blocks 0 and 1 feed
    DeepStack (added after LLM layers 0 and 1), an 8-layer Qwen3 LLM of width 64 with interleaved M-RoPE."""
    from transformers import Qwen3VLConfig

    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
        initializer_range=init,
    )
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        vocab_size=100,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    )
    config = Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
    )
    config._attn_implementation = attn
    return config


def tiny_qwen3_vl(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random :class:`~transformers.Qwen3VLForConditionalGeneration` from :func:`tiny_qwen3_vl_config`."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(**config_kwargs)).eval().to(dtype)
    model.generation_config.pad_token_id = PAD
    return model


def qwen3_vl_inputs(
    rows: list[list], grids: list[tuple[int, int]], *, seed: int = 1, side: str = "left", **video_kwargs
) -> dict:
    """:func:`qwen_inputs` with Qwen3-VL's 16-px patches (pixel rows of 3 x 2 x 16 x 16 values)."""
    return qwen_inputs(rows, grids, seed=seed, side=side, patch=16, **video_kwargs)


#: Video placeholder id of the tiny Video-LLaVA (its image placeholder is :data:`IMAGE_TOKEN`).
VIDEO_TOKEN = 98


def tiny_video_llava_config(
    *, image_size: int = 56, layers: int = 8, kv_heads: int = 2, attn: str = "sdpa", init: float = 0.3
):
    """A Video-LLaVA-shaped config: two CLIP towers with [CLS] (patch 14: 4 x 4 patches at 56 px, 16 image tokens,
    17 per video frame), a Llama LLM with GQA, ``vision_feature_layer=-2``, ``"default"`` strategy."""
    from transformers import VideoLlavaConfig

    base = tiny_llava_config(image_size=image_size, layers=layers, kv_heads=kv_heads, attn=attn, init=init)
    side = image_size // 14
    config = VideoLlavaConfig(
        vision_config=base.vision_config.to_dict(),
        text_config=base.text_config.to_dict(),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_seq_length=side * side,
        video_seq_length=8 * (side * side + 1),
    )
    config._attn_implementation = attn
    return config


def tiny_video_llava(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random :class:`~transformers.VideoLlavaForConditionalGeneration` from :func:`tiny_video_llava_config`."""
    from transformers import VideoLlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(tiny_video_llava_config(**config_kwargs)).eval().to(dtype)
    model.generation_config.pad_token_id = PAD
    return model


def video_llava_inputs(
    rows: list[list], *, frames: int = 8, image_size: int = 56, seed: int = 1, side: str = "left"
) -> dict:
    """A padded Video-LLaVA batch. ``rows`` mix token ids and the markers ``"image"`` (``(S/14)^2`` image
    placeholders) and ``"video"`` (``frames x ((S/14)^2 + 1)`` video placeholders: every frame keeps its [CLS])."""
    patches = (image_size // 14) ** 2
    expanded = []
    images = videos = 0
    for row in rows:
        ids = []
        for item in row:
            if item == "image":
                ids += [IMAGE_TOKEN] * patches
                images += 1
            elif item == "video":
                ids += [VIDEO_TOKEN] * (frames * (patches + 1))
                videos += 1
            else:
                ids.append(item)
        expanded.append(ids)
    length = max(len(r) for r in expanded)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(expanded):
        cols = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[i, cols] = torch.tensor(ids)
        mask[i, cols] = 1
    gen = torch.Generator().manual_seed(seed)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if images:
        batch["pixel_values"] = torch.randn(images, 3, image_size, image_size, generator=gen)
    if videos:
        batch["pixel_values_videos"] = torch.randn(videos, frames, 3, image_size, image_size, generator=gen)
    return batch


def tiny_llava_next_video_config(
    *, layers: int = 8, kv_heads: int = 2, attn: str = "sdpa", init: float = 0.3
):
    """A LLaVA-NeXT-Video-shaped config: :func:`tiny_llava_next_config`'s tower, pinpoints and Llama LLM, and videos
    pooled 2 x 2 (``spatial_pool_stride=2``, average): 4 x 4 patches per 56 px frame -> 4 video tokens per frame."""
    from transformers import LlavaNextVideoConfig

    base = tiny_llava_next_config(layers=layers, kv_heads=kv_heads, attn=attn, init=init)
    config = LlavaNextVideoConfig(
        vision_config=base.vision_config.to_dict(),
        text_config=base.text_config.to_dict(),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=base.image_grid_pinpoints,
        spatial_pool_stride=2,
        spatial_pool_mode="average",
    )
    config._attn_implementation = attn
    return config


def tiny_llava_next_video(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random :class:`~transformers.LlavaNextVideoForConditionalGeneration`."""
    from transformers import LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    model = (
        LlavaNextVideoForConditionalGeneration(tiny_llava_next_video_config(**config_kwargs)).eval().to(dtype)
    )
    with torch.no_grad():  # a visible newline embedding, as tiny_llava_next
        model.model.image_newline.normal_(0, 0.3)
    model.generation_config.pad_token_id = PAD
    return model


def llava_next_video_inputs(
    model,
    rows: list[list],
    sizes: list[tuple[int, int]],
    *,
    frames: int = 4,
    seed: int = 1,
    side: str = "left",
) -> dict:
    """A padded LLaVA-NeXT-Video batch: ``"image"`` expands to the next of ``sizes`` (h, w) as LLaVA-NeXT counts it,
    ``"video"`` to ``frames x 4`` video placeholders (56 px frames pooled 2 x 2)."""
    images = iter(sizes)
    expanded = []
    videos = 0
    for row in rows:
        ids = []
        for item in row:
            if item == "image":
                ids += [IMAGE_TOKEN] * llava_next_placeholders(model, next(images))
            elif item == "video":
                ids += [VIDEO_TOKEN] * (frames * 4)
                videos += 1
            else:
                ids.append(item)
        expanded.append(ids)
    length = max(len(r) for r in expanded)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(expanded):
        cols = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[i, cols] = torch.tensor(ids)
        mask[i, cols] = 1
    gen = torch.Generator().manual_seed(seed)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if sizes:
        batch["pixel_values"] = torch.randn(len(sizes), 5, 3, 56, 56, generator=gen)
        batch["image_sizes"] = torch.tensor(sizes)
    if videos:
        batch["pixel_values_videos"] = torch.randn(videos, frames, 3, 56, 56, generator=gen)
    return batch


#: Tile side of the tiny InternVL (8 x 8 patches of 14 px; pixel shuffle 0.5 -> 4 x 4 = 16 LLM tokens per tile).
INTERNVL_TILE = 112


def tiny_internvl_config(*, layers: int = 8, kv_heads: int = 2, attn: str = "sdpa", init: float = 0.3):
    """An InternVL-shaped config: 112 px tiles of 8 x 8 patches through a 2-layer InternViT of width 32 ([CLS],
    layer scale, mean pooling), pixel shuffle 0.5 (16 LLM tokens per tile), an 8-layer Qwen2 LLM of width 64."""
    from transformers import InternVLConfig

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_bias=True,
        image_size=INTERNVL_TILE,
        patch_size=14,
        initializer_range=init,
        layer_scale_init_value=1.0,  # visible residual branches (InternViT-300M's published value is 0.1)
    )
    text = dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
    )
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=16
    )
    config._attn_implementation = attn
    return config


def tiny_internvl(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random :class:`~transformers.InternVLForConditionalGeneration` from :func:`tiny_internvl_config`."""
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(tiny_internvl_config(**config_kwargs)).eval().to(dtype)
    with torch.no_grad():  # visible [CLS] and position embeddings (zeros-initialised by transformers)
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_(0, 0.3)
        if embeddings.position_embeddings is not None:
            embeddings.position_embeddings.normal_(0, 0.3)
    model.generation_config.pad_token_id = PAD
    return model


def internvl_inputs(rows: list[list], tiles: list[int], *, seed: int = 1, side: str = "left") -> dict:
    """A padded InternVL batch. ``rows`` mix token ids and the marker ``"image"``, which expands to the next image's
    ``16 * tiles`` placeholders (framed by text ids 3 and 4, as ``<img>``/``</img>`` frame them); ``pixel_values``
    holds every image's tiles in order, ``(sum(tiles), 3, 112, 112)``."""
    per_tile = (INTERNVL_TILE // 14 // 2) ** 2
    expanded = []
    tile_iter = iter(tiles)
    for row in rows:
        ids = []
        for item in row:
            ids += [3, *[IMAGE_TOKEN] * (per_tile * next(tile_iter)), 4] if item == "image" else [item]
        expanded.append(ids)
    length = max(len(r) for r in expanded)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(expanded):
        cols = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[i, cols] = torch.tensor(ids)
        mask[i, cols] = 1
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(tiles), 3, INTERNVL_TILE, INTERNVL_TILE, generator=gen)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}

"""Analytic cost accounting for vision-language model prefill: FLOPs and KV-cache bytes.

This module is self-contained (it imports nothing else from ``visiondrop`` and only touches
``transformers`` when it has to fill in defaults for an incomplete ``config.json``), so it can be used
to cost a pruning schedule without loading a model.

Conventions (SPEC §9)
---------------------
* One multiply-add counts as **2 FLOPs**. All counts are for the **prefill** pass of one sequence
  (multiplied by ``batch_size`` if given); decoding steps are not counted.
* LLM decoder layer seeing ``n`` tokens, hidden ``d``, query width ``q`` (= heads·head_dim, equal to
  ``d`` for every shipped model), KV width ``d_kv`` (= num_key_value_heads·head_dim), SwiGLU FFN width
  ``m`` (3 matrices)::

      2n(2·d·q + 2·d·d_kv) + 4n²q + 6·n·d·m          (= 2n(2d² + 2d·d_kv) + 4n²d + 6ndm when q = d)

* ViT layer seeing ``n`` tokens, hidden ``d_v``, MLP width ``m_v`` with ``k`` matrices (2 for CLIP and
  Qwen2-VL, 3 for the SwiGLU MLP of Qwen2.5-VL)::

      8n·d_v² + 4n²d_v + 2k·n·d_v·m_v                (= 8n·d_v² + 4n²d_v + 4n·d_v·m_v for k = 2)

  The ViT is run once per crop (LLaVA-NeXT) or per image (Qwen2-VL), with attention over that crop's
  tokens only.
* Multimodal projector (LLaVA's 2-layer MLP, Qwen2-VL's patch merger), ``n`` input tokens::

      2n(p_in·p_hidden + p_hidden·p_out)

* LM head over the prefill tokens that leave the last layer: ``2·n·d·vocab``.
* KV cache, per layer: ``2·n·d_kv·bytes_per_element`` (keys and values).

What is counted: every matrix multiplication of the ViT layers, of the projector, of the LLM layers
(Q/K/V/O projections, the attention scores ``QKᵀ`` and the weighted sum ``AV``, the three FFN
matrices) and of the LM head.

What is not counted: normalisations (LayerNorm/RMSNorm), softmax, activation functions, RoPE / M-RoPE,
residual additions, biases, the token-embedding lookup, the ViT patch-embedding convolution and
position embeddings, the concatenation of LLaVA-NeXT's ``image_newline`` tokens, and the cost of any
pruning method's own scoring. Attention is counted over the full ``n × n`` score matrix: the causal
mask is not exploited (as in the published figures). Qwen2.5-VL's window attention in the ViT is
approximated by full attention over the image (an overestimate of the ViT's ``n²`` term only).

Where tokens are counted
------------------------
* ViT: all layers of the vision tower are counted (LLaVA selects ``vision_feature_layer = -2`` but the
  Hugging Face CLIP encoder still runs every layer), over the full crop (577 tokens for CLIP-L/14 at
  336 px, [CLS] included) regardless of pruning.
* Projector: by default over every ViT feature of every crop (576 per CLIP crop after dropping [CLS];
  patches / merge² for Qwen2-VL), because in Hugging Face models the projector runs inside
  ``get_image_features`` before the visual tokens reach the LLM where they are pruned. Pass
  ``projector_tokens`` to override.
* LLM: layer ``l`` sees ``text_tokens + visual_tokens_per_layer[l]`` tokens.
* LM head: by default over all tokens leaving the last layer (``text_tokens +
  visual_tokens_per_layer[-1]``), which is the published convention. ``generate`` in transformers only
  computes the last position's logits; pass ``lm_head_tokens=1`` for that.

The default prompt length is :data:`DEFAULT_TEXT_TOKENS` = 64 text tokens.

Published figures (pinned in ``tests/test_flops.py``)
-----------------------------------------------------
=============================================  ===========  ========
setting                                        this module  paper
=============================================  ===========  ========
LLaVA-1.5-7B, unpruned (576 image tokens)       9.08 T       9.06 T
LLaVA-NeXT-7B, unpruned (2,928 image tokens)   46.26 T      46.25 T
VisionDrop LLaVA-1.5-7B, budget 64              2.10 T       2.11 T
VisionDrop LLaVA-NeXT-7B, budget 320            7.15 T       7.70 T
=============================================  ===========  ========

Assumptions behind them: 64 text tokens; LLaVA-NeXT-7B is ``llava-v1.6-vicuna-7b`` (Vicuna-7B, MHA,
``m = 11008``; the Mistral-7B variant gives 49.3 T unpruned, +6.5 %) with the maximal image: the
672×672 grid and a square image, i.e. 576 base + 48×48 high-res + 48 ``image_newline`` = 2,928 tokens
(2,880 without the newlines gives 45.5 T), and the ViT over 5 crops × 577 tokens. VisionDrop schedules:
97/71/52/36 visual tokens for LLM layers 0-7/8-15/16-23/24-31 (LLaVA-1.5) and 483/353/258/186
(LLaVA-NeXT, same rule applied to the image's total). The ViT and the projector run at full size in
the pruned settings. The pruned LLaVA-NeXT figure stays 7 % under the paper's; its exact accounting
is not known.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_TEXT_TOKENS",
    "SHIPPED_CONFIGS",
    "ArchSpec",
    "FlopsBreakdown",
    "ImageShape",
    "image_shape",
    "kv_cache_bytes",
    "llm_layer_flops",
    "load_arch",
    "prefill_flops",
    "projector_flops",
    "read_config",
    "vit_layer_flops",
]

#: Prompt length (text tokens, system prompt and question included) assumed when none is given.
DEFAULT_TEXT_TOKENS: int = 64

#: Names of the configs shipped in ``visiondrop/configs/`` (written from published dimensions).
SHIPPED_CONFIGS: tuple[str, ...] = (
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-next-7b",
    "qwen2-vl-7b",
    "qwen3-vl-8b",
    "internvl3-8b",
    "video-llava-7b",
    "llava-onevision-7b",
)

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Hugging Face repository ids that map to a shipped config (resolved offline, nothing is downloaded).
_HUB_ALIASES: dict[str, str] = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-next-7b",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b",
    "Qwen/Qwen3-VL-8B-Instruct": "qwen3-vl-8b",
    "OpenGVLab/InternVL3-8B-hf": "internvl3-8b",
    "LanguageBind/Video-LLaVA-7B-hf": "video-llava-7b",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava-onevision-7b",
}

#: Image size assumed for dynamic-resolution families when none is given: LLaVA-NeXT's largest grid (672 × 672, 2,928
#: tokens, the image behind the published 46.25 T) and the same size for Qwen2-VL.
DEFAULT_IMAGE_SIZE: tuple[int, int] = (672, 672)


@dataclass(frozen=True)
class ImageShape:
    """One image as a model family receives it (each family's ``image_shape`` computes it).

    Attributes
    ----------
    tokens : int
        Visual tokens entering the LLM unpruned (LLaVA-1.5: 576).
    vit_tokens : tuple of int
        Tokens of each vision-tower pass (LLaVA-1.5: ``(577,)``; LLaVA-NeXT: one entry per crop).
    grids : tuple of (rows, cols), optional
        The patch grids of the image when they are unambiguous (grid-shaped methods such as ``pooling`` need them);
        ``None`` for LLaVA-NeXT, whose image is treated as one run of ``tokens`` tokens.
    size : (int, int), optional
        Height and width in pixels the counts were computed for (``None``: the family resizes every image).
    description : str
        One line for the text output.
    frames : int
        Frames of a video (Video-LLaVA: 8; ``tokens``, ``vit_tokens`` and ``grids`` then cover all of them); 1 for
        an image.
    """

    tokens: int
    vit_tokens: tuple[int, ...]
    grids: tuple[tuple[int, int], ...] | None
    size: tuple[int, int] | None
    description: str
    frames: int = 1


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Dimensions of a vision-language model that determine its prefill cost.

    Attributes
    ----------
    family : str
        ``"llava"``, ``"llava_next"``, ``"qwen2_vl"`` or ``"qwen2_5_vl"``.
    num_layers : int
        LLM decoder layers.
    hidden_size : int
        LLM hidden width ``d``.
    num_heads : int
        LLM query heads.
    head_dim : int
        LLM head dimension.
    kv_width : int
        ``num_key_value_heads · head_dim`` (``d_kv``).
    ffn_size : int
        LLM SwiGLU intermediate width ``m``.
    vocab_size : int
        LM-head output width.
    vit_layers : int
        Vision-tower layers that are run (all of them, see the module docstring).
    vit_hidden : int
        Vision-tower width ``d_v``.
    vit_mlp : int
        Vision-tower MLP width ``m_v``.
    vit_mlp_matrices : int
        Matrices in the vision MLP: 2 (fc1, fc2) or 3 (gate, up, down).
    vit_tokens_per_crop : int or None
        Tokens through the ViT per crop, [CLS] included (577 for CLIP-L/14-336); ``None`` for
        dynamic-resolution towers (Qwen2-VL) where it depends on the image.
    vit_cls_tokens : int
        Class tokens prepended by the ViT (1 for CLIP, 0 otherwise).
    image_features_per_crop : int or None
        ViT outputs per crop handed to the projector (576 for LLaVA's ``"default"`` strategy, which
        drops the first token); ``None`` for dynamic-resolution towers.
    patch_size : int
        ViT patch size in pixels.
    image_size : int or None
        Crop side in pixels (336 for LLaVA); ``None`` for dynamic resolution.
    spatial_merge_size : int
        Side of the patch merger window (2 for Qwen2-VL: 4 patches → 1 LLM token; 1 for LLaVA).
    projector_in, projector_hidden, projector_out : int
        Widths of the 2-layer projector MLP (for Qwen2-VL, the patch merger ``embed·merge²`` →
        ``embed·merge²`` → LLM hidden).
    max_crops : int
        ViT passes for one image at the highest resolution (1 for LLaVA-1.5; base view + 4 tiles = 5 for
        LLaVA-NeXT with the 672×672 pinpoint; 1 image for Qwen2-VL).
    image_grid_pinpoints : tuple of (int, int)
        LLaVA-NeXT / LLaVA-OneVision any-resolution grid, ``(height, width)`` pairs; empty for other families.
    video_frames : int
        Frames of one video for video families (Video-LLaVA: 8); 0 otherwise.
    anyres_max_patches : int
        LLaVA-OneVision's AnyRes-Max cap (``anyres_max_9``: 9 base-view areas before the grid is downscaled); 0 for
        other families.
    name : str
        Free-form label (the shipped config name when loaded with :func:`load_arch`).
    """

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    kv_width: int
    ffn_size: int
    vocab_size: int
    vit_layers: int
    vit_hidden: int
    vit_mlp: int
    vit_mlp_matrices: int = 2
    vit_tokens_per_crop: int | None = None
    vit_cls_tokens: int = 0
    image_features_per_crop: int | None = None
    patch_size: int = 14
    image_size: int | None = None
    spatial_merge_size: int = 1
    projector_in: int
    projector_hidden: int
    projector_out: int
    max_crops: int = 1
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    video_frames: int = 0
    anyres_max_patches: int = 0
    name: str = ""

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads of the LLM (``kv_width // head_dim``)."""
        return self.kv_width // self.head_dim

    @property
    def q_width(self) -> int:
        """Query/output projection width of the LLM (``num_heads · head_dim``)."""
        return self.num_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any, *, name: str = "") -> ArchSpec:
        """Build an :class:`ArchSpec` from a transformers config or its dict form.

        Parameters
        ----------
        config : transformers.PretrainedConfig or Mapping
            A ``LlavaConfig``, ``LlavaNextConfig``, ``Qwen2VLConfig`` or ``Qwen2_5_VLConfig``, or the
            content of a ``config.json`` (nested ``text_config`` or the flat Qwen2-VL hub layout). A
            dict that leaves fields to their defaults is completed through
            ``transformers.AutoConfig.for_model``.
        name : str, optional
            Label stored in :attr:`name`.

        Returns
        -------
        ArchSpec

        Raises
        ------
        ValueError
            If the model type is not supported or required fields are missing.
        """
        if hasattr(config, "to_dict") and callable(config.to_dict):
            data = config.to_dict()
        elif isinstance(config, Mapping):
            data = dict(config)
        else:
            raise TypeError(f"expected a transformers config or a mapping, got {type(config).__name__}")
        try:
            return _spec_from_dict(data, name)
        except KeyError:
            pass
        # Some fields are left to transformers' defaults (hub configs often are): let it fill them.
        return _spec_from_dict(_complete_with_transformers(data), name)


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return dict(value)


def _complete_with_transformers(data: dict[str, Any]) -> dict[str, Any]:
    model_type = data.get("model_type")
    try:
        from transformers import AutoConfig
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ValueError(
            f"config for model_type {model_type!r} is incomplete and transformers is missing"
        ) from exc
    try:
        return AutoConfig.for_model(**data).to_dict()
    except Exception as exc:
        reason = " ".join(str(exc).split())  # keep the message on one line, and short
        if len(reason) > 200:
            reason = reason[:197] + "..."
        raise ValueError(f"cannot read a config with model_type {model_type!r}: {reason}") from exc


def _spec_from_dict(data: dict[str, Any], name: str) -> ArchSpec:
    """Read the dimensions out of a config dict; raises KeyError when a field is missing."""
    from .models.family import family_of  # the families register themselves with their adapters

    model_type = data.get("model_type")
    family_of(model_type)  # ValueError naming the supported ones
    text = _as_dict(data.get("text_config")) or data  # Qwen2-VL hub configs are flat
    vision = _as_dict(data["vision_config"])

    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    llm = {
        "num_layers": int(text["num_hidden_layers"]),
        "hidden_size": hidden,
        "num_heads": heads,
        "head_dim": head_dim,
        "kv_width": kv_heads * head_dim,
        "ffn_size": int(text["intermediate_size"]),
        "vocab_size": int(text["vocab_size"]),
    }

    fields = family_of(model_type).arch_fields(data, vision, llm)
    return ArchSpec(family=model_type, **llm, **fields, name=name)


def read_config(name_or_path: str | os.PathLike) -> tuple[dict, str]:
    """The JSON object of a shipped config name, a shipped model's HF id, a ``config.json`` or a folder holding one.

    Returns
    -------
    (dict, str)
        The config and its label (the shipped name, or the path as given).

    Raises
    ------
    ValueError
        If the name is unknown or the file cannot be read as a JSON object.
    """
    key = os.fspath(name_or_path)
    if key in SHIPPED_CONFIGS:
        path, label = _CONFIG_DIR / f"{key}.json", key
    else:
        path, label = Path(key), key
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file() and key in _HUB_ALIASES:
            label = _HUB_ALIASES[key]
            path = _CONFIG_DIR / f"{label}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown model config {key!r}: expected one of {', '.join(SHIPPED_CONFIGS)} "
            "or a path to a config.json (or a folder containing one)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model config {key!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"cannot read model config {key!r}: expected a JSON object")
    return data, label


def load_arch(name_or_path: str | os.PathLike[str]) -> ArchSpec:
    """Load an :class:`ArchSpec` from a shipped config name or a ``config.json``.

    Parameters
    ----------
    name_or_path : str or path-like
        One of :data:`SHIPPED_CONFIGS` (``"llava-1.5-7b"``, ...), the Hugging Face id of one of them
        (``"llava-hf/llava-1.5-7b-hf"``, resolved to the shipped file, nothing is downloaded), a path
        to a ``config.json`` or a folder containing one.

    Returns
    -------
    ArchSpec

    Raises
    ------
    ValueError
        If the name is unknown or the path cannot be read as a supported config.
    """
    data, label = read_config(name_or_path)
    return ArchSpec.from_config(data, name=label)


@dataclass(frozen=True)
class FlopsBreakdown:
    """Prefill FLOPs by component (floats; multiply-add = 2 FLOPs).

    Attributes
    ----------
    vision : float
        All vision-tower layers over all crops/images.
    projector : float
        Multimodal projector (LLaVA MLP or Qwen2-VL patch merger).
    llm_layers : tuple of float
        One entry per LLM decoder layer.
    lm_head : float
        LM head over the tokens leaving the last layer.
    total : float
        Sum of the above (computed).
    """

    vision: float
    projector: float
    llm_layers: tuple[float, ...]
    lm_head: float
    total: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "llm_layers", tuple(float(x) for x in self.llm_layers))
        total = self.vision + self.projector + math.fsum(self.llm_layers) + self.lm_head
        object.__setattr__(self, "total", float(total))

    @property
    def llm(self) -> float:
        """Sum over the LLM decoder layers."""
        return math.fsum(self.llm_layers)

    @property
    def tflops(self) -> float:
        """Total in TFLOPs (``total / 1e12``)."""
        return self.total / 1e12


def _count(value: Any, what: str) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


def _counts(values: int | Sequence[int], what: str) -> list[int] | int:
    """An int (returned as is) or a list of ints from any iterable (lists, tuples, numpy arrays)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        return _count(values, what)
    return [_count(v, what) for v in values]


def _per_layer(values: int | Sequence[int], num_layers: int, what: str) -> list[int]:
    out = _counts(values, what)
    if isinstance(out, int):
        return [out] * num_layers
    if len(out) != num_layers:
        raise ValueError(f"{what} needs one entry per LLM layer ({num_layers}), got {len(out)}")
    return out


def llm_layer_flops(arch: ArchSpec, tokens: int) -> int:
    """FLOPs of one LLM decoder layer over ``tokens`` tokens (exact integer)."""
    n, d, q = tokens, arch.hidden_size, arch.q_width
    linear = 2 * n * (2 * d * q + 2 * d * arch.kv_width) + 6 * n * d * arch.ffn_size
    return linear + 4 * n * n * q


def vit_layer_flops(arch: ArchSpec, tokens: int) -> int:
    """FLOPs of one vision-tower layer over one crop of ``tokens`` tokens (exact integer)."""
    n, dv = tokens, arch.vit_hidden
    return 8 * n * dv * dv + 4 * n * n * dv + 2 * arch.vit_mlp_matrices * n * dv * arch.vit_mlp


def projector_flops(arch: ArchSpec, tokens: int) -> int:
    """FLOPs of the 2-layer projector over ``tokens`` input tokens (exact integer)."""
    return (
        2 * tokens * (arch.projector_in * arch.projector_hidden + arch.projector_hidden * arch.projector_out)
    )


def prefill_flops(
    arch: ArchSpec,
    *,
    visual_tokens_per_layer: int | Sequence[int],
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    vision_tokens: int | Sequence[int] | None = None,
    projector_tokens: int | None = None,
    lm_head_tokens: int | None = None,
    batch_size: int = 1,
) -> FlopsBreakdown:
    """Prefill FLOPs of one (or ``batch_size`` identical) image + prompt sequence(s).

    Parameters
    ----------
    arch : ArchSpec
        Model dimensions (see :func:`load_arch`).
    visual_tokens_per_layer : int or sequence of int
        Visual tokens seen by each LLM layer, one entry per layer (``Schedule.tokens_per_layer()`` of a
        method's schedule); an int means the same count at every layer (unpruned:
        576 for LLaVA-1.5).
    text_tokens : int, optional
        Non-visual tokens of the prompt, seen by every layer. Default :data:`DEFAULT_TEXT_TOKENS` (64).
    vision_tokens : int or sequence of int, optional
        Tokens through the ViT, one entry per crop/image (each is a separate attention sequence): e.g.
        ``[577] * 5`` for LLaVA-NeXT; an int is a single crop. Default: the full-resolution count of
        the architecture, ``[vit_tokens_per_crop] * max_crops`` (577 × 1 for LLaVA-1.5, 577 × 5 for
        LLaVA-NeXT). Required for Qwen2-VL (use :func:`qwen2_vl_image_tokens`).
    projector_tokens : int, optional
        Tokens through the projector. Default: every ViT feature, i.e. the sum over crops of the
        tokens minus the dropped [CLS] (LLaVA), or of patches / merge² (Qwen2-VL).
    lm_head_tokens : int, optional
        Positions the LM head is applied to. Default: all tokens of the last layer
        (``text_tokens + visual_tokens_per_layer[-1]``).
    batch_size : int, optional
        Number of identical sequences; every term is multiplied by it. Default 1.

    Returns
    -------
    FlopsBreakdown

    Raises
    ------
    ValueError
        On negative counts, a per-layer list of the wrong length, or missing ``vision_tokens`` for a
        dynamic-resolution model.
    """
    visual = _per_layer(visual_tokens_per_layer, arch.num_layers, "visual_tokens_per_layer")
    text = _count(text_tokens, "text_tokens")
    batch = _count(batch_size, "batch_size")
    if batch == 0:
        raise ValueError("batch_size must be >= 1, got 0")

    if vision_tokens is None:
        if arch.vit_tokens_per_crop is None:
            raise ValueError(
                f"vision_tokens is required for {arch.family!r} (dynamic resolution): "
                "see qwen2_vl_image_tokens()"
            )
        crops = [arch.vit_tokens_per_crop] * arch.max_crops
    else:
        given = _counts(vision_tokens, "vision_tokens")
        crops = [given] if isinstance(given, int) else given

    if projector_tokens is None:
        dropped = 0
        if arch.vit_tokens_per_crop is not None and arch.image_features_per_crop is not None:
            dropped = arch.vit_tokens_per_crop - arch.image_features_per_crop
        merge2 = arch.spatial_merge_size**2
        proj_tokens = sum(max(t - dropped, 0) // merge2 for t in crops)
    else:
        proj_tokens = _count(projector_tokens, "projector_tokens")

    head_tokens = text + visual[-1] if lm_head_tokens is None else _count(lm_head_tokens, "lm_head_tokens")

    vision = arch.vit_layers * sum(vit_layer_flops(arch, t) for t in crops)
    return FlopsBreakdown(
        vision=float(batch * vision),
        projector=float(batch * projector_flops(arch, proj_tokens)),
        llm_layers=tuple(float(batch * llm_layer_flops(arch, text + v)) for v in visual),
        lm_head=float(batch * 2 * head_tokens * arch.hidden_size * arch.vocab_size),
    )


def kv_cache_bytes(arch: ArchSpec, tokens_per_layer: int | Sequence[int], bytes_per_element: int = 2) -> int:
    """Bytes of the KV cache of one sequence after prefill.

    Parameters
    ----------
    arch : ArchSpec
        Model dimensions.
    tokens_per_layer : int or sequence of int
        Tokens cached at each LLM layer, **text tokens included** (one entry per layer; an int means
        the same count everywhere).
    bytes_per_element : int, optional
        2 for fp16/bf16 (default), 4 for fp32, 1 for 8-bit caches.

    Returns
    -------
    int
        ``Σ_l 2 · n_l · kv_width · bytes_per_element``.
    """
    tokens = _per_layer(tokens_per_layer, arch.num_layers, "tokens_per_layer")
    bpe = _count(bytes_per_element, "bytes_per_element")
    return sum(2 * n * arch.kv_width * bpe for n in tokens)


def image_shape(arch: ArchSpec, size: tuple[int, int] | None = None) -> ImageShape:
    """Visual tokens and vision-tower passes of one image of ``size`` (height, width) for ``arch``.

    Each family computes it (its ``Family.image_shape``, next to its adapter): LLaVA-1.5 resizes every image to one
    crop, so ``size`` does not change anything there; LLaVA-NeXT and Qwen2-VL default to :data:`DEFAULT_IMAGE_SIZE`.
    """
    from .models.family import family_of

    return family_of(arch.family).image_shape(arch, size)

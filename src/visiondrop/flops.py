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

import itertools
import json
import math
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_TEXT_TOKENS",
    "SHIPPED_CONFIGS",
    "ArchSpec",
    "FlopsBreakdown",
    "kv_cache_bytes",
    "llava_next_image_tokens",
    "llm_layer_flops",
    "load_arch",
    "prefill_flops",
    "projector_flops",
    "qwen2_vl_image_tokens",
    "qwen2_vl_resize",
    "schedule_tokens_per_layer",
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
)

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Hugging Face repository ids that map to a shipped config (resolved offline, nothing is downloaded).
_HUB_ALIASES: dict[str, str] = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-next-7b",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b",
    "Qwen/Qwen3-VL-8B-Instruct": "qwen3-vl-8b",
}

_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


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
        LLaVA-NeXT any-resolution grid, ``(height, width)`` pairs; empty for other families.
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
    family = data.get("model_type")
    if family not in _FAMILIES:
        raise ValueError(f"unsupported model_type {family!r}: expected one of {', '.join(_FAMILIES)}")
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

    if family in ("llava", "llava_next"):
        vit_hidden = int(vision["hidden_size"])
        image_size = int(vision["image_size"])
        patch = int(vision["patch_size"])
        cls_tokens = 1 if "clip" in str(vision.get("model_type", "clip_vision_model")) else 0
        vit_tokens = (image_size // patch) ** 2 + cls_tokens
        # transformers' "default" strategy drops the first ViT output, "full" keeps everything.
        strategy = data.get("vision_feature_select_strategy", "default")
        features = vit_tokens - 1 if strategy == "default" else vit_tokens
        layers = data.get("vision_feature_layer", -2)
        n_feature_layers = 1 if isinstance(layers, int) else len(layers)
        pinpoints: tuple[tuple[int, int], ...] = ()
        max_crops = 1
        if family == "llava_next":
            raw = data.get("image_grid_pinpoints") or [
                [336, 672],
                [672, 336],
                [672, 672],
                [1008, 336],
                [336, 1008],
            ]
            pinpoints = tuple((int(h), int(w)) for h, w in raw)
            max_crops = 1 + max((h // image_size) * (w // image_size) for h, w in pinpoints)
        return ArchSpec(
            family=family,
            **llm,
            vit_layers=int(vision["num_hidden_layers"]),
            vit_hidden=vit_hidden,
            vit_mlp=int(vision["intermediate_size"]),
            vit_mlp_matrices=2,
            vit_tokens_per_crop=vit_tokens,
            vit_cls_tokens=cls_tokens,
            image_features_per_crop=features,
            patch_size=patch,
            image_size=image_size,
            spatial_merge_size=1,
            projector_in=vit_hidden * n_feature_layers,
            projector_hidden=hidden,
            projector_out=hidden,
            max_crops=max_crops,
            image_grid_pinpoints=pinpoints,
            name=name,
        )

    merge = int(vision.get("spatial_merge_size", 2))
    if family == "qwen2_vl":
        embed = int(vision["embed_dim"])
        vit_mlp = int(embed * vision["mlp_ratio"])
        mlp_matrices = 2
        merger_out = int(vision.get("hidden_size") or hidden)
    elif family == "qwen3_vl":  # GELU vision MLP (2 matrices), `hidden_size` is the ViT width
        embed = int(vision["hidden_size"])
        vit_mlp = int(vision["intermediate_size"])
        mlp_matrices = 2
        merger_out = int(vision.get("out_hidden_size") or hidden)
    else:  # qwen2_5_vl: SwiGLU vision MLP, `hidden_size` is the ViT width there
        embed = int(vision["hidden_size"])
        vit_mlp = int(vision["intermediate_size"])
        mlp_matrices = 3
        merger_out = int(vision.get("out_hidden_size") or hidden)
    merger_in = embed * merge * merge
    # Qwen3-VL's DeepStack runs one more merger of the same shape per level on the same units: (1 + levels)
    # mergers in -> h -> out cost exactly one merger in -> (1 + levels) h -> out.
    mergers = 1 + len(vision.get("deepstack_visual_indexes") or ()) if family == "qwen3_vl" else 1
    return ArchSpec(
        family=family,
        **llm,
        vit_layers=int(vision["depth"]),
        vit_hidden=embed,
        vit_mlp=vit_mlp,
        vit_mlp_matrices=mlp_matrices,
        vit_tokens_per_crop=None,
        vit_cls_tokens=0,
        image_features_per_crop=None,
        patch_size=int(vision.get("patch_size", 14)),
        image_size=None,
        spatial_merge_size=merge,
        projector_in=merger_in,
        projector_hidden=merger_in * mergers,
        projector_out=merger_out,
        max_crops=1,
        name=name,
    )


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
        Visual tokens seen by each LLM layer, one entry per layer (see
        :func:`schedule_tokens_per_layer`); an int means the same count at every layer (unpruned:
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


def schedule_tokens_per_layer(num_layers: int, stages: Sequence[tuple[int, int]]) -> list[int]:
    """Expand a stage schedule into one visual-token count per LLM layer.

    Parameters
    ----------
    num_layers : int
        LLM decoder layers.
    stages : sequence of (int, int)
        ``(first_layer, visual_tokens)`` pairs with strictly increasing ``first_layer``, the first one
        at layer 0; a stage lasts until the next one starts. E.g. ``[(0, 97), (8, 71), (16, 52),
        (24, 36)]``.

    Returns
    -------
    list of int
        ``num_layers`` entries.

    Raises
    ------
    ValueError
        If the stages are empty, do not start at 0, are not increasing or run past ``num_layers``.
    """
    num_layers = _count(num_layers, "num_layers")
    if not stages:
        raise ValueError("stages must not be empty")
    starts = [_count(s, "first_layer") for s, _ in stages]
    counts = [_count(c, "visual_tokens") for _, c in stages]
    if starts[0] != 0:
        raise ValueError(f"the first stage must start at layer 0, got {starts[0]}")
    if any(b <= a for a, b in itertools.pairwise(starts)) or starts[-1] >= num_layers:
        raise ValueError(f"stage starts must increase within [0, {num_layers}), got {starts}")
    out: list[int] = []
    for i, count in enumerate(counts):
        end = starts[i + 1] if i + 1 < len(starts) else num_layers
        out.extend([count] * (end - starts[i]))
    return out


def llava_next_image_tokens(arch: ArchSpec, height: int, width: int) -> tuple[int, int]:
    """ViT crops and LLM image tokens of LLaVA-NeXT for an image of ``height × width`` pixels.

    Follows the any-resolution rule: the grid pinpoint that keeps the most of the image's pixels
    (ties: the least padding) gives ``rows × cols`` tiles of ``image_size``; their features are
    un-padded back to the image's aspect ratio and one ``image_newline`` token closes each feature
    row; the base view (``image_features_per_crop`` tokens) comes first.

    Parameters
    ----------
    arch : ArchSpec
        A ``llava_next`` architecture.
    height, width : int
        Original image size in pixels.

    Returns
    -------
    (int, int)
        ``(crops, image_tokens)``: ViT passes (base + tiles) and visual tokens entering the LLM. The
        maximum for the shipped config is ``(5, 2928)`` (672×672 grid, square image: 576 + 48·48 + 48).
    """
    if arch.family != "llava_next" or arch.image_size is None or arch.image_features_per_crop is None:
        raise ValueError(f"llava_next_image_tokens needs a llava_next architecture, got {arch.family!r}")
    height, width = _count(height, "height"), _count(width, "width")
    if height == 0 or width == 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    best: tuple[int, int] | None = None
    best_key: tuple[int, int] | None = None
    for cand_h, cand_w in arch.image_grid_pinpoints:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(cand_h * cand_w - kept))
        if best_key is None or key > best_key:
            best, best_key = (cand_h, cand_w), key
    if best is None:
        raise ValueError("llava_next_image_tokens needs image_grid_pinpoints, got none")
    grid_rows, grid_cols = best[0] // arch.image_size, best[1] // arch.image_size
    side = arch.image_size // arch.patch_size
    rows, cols = grid_rows * side, grid_cols * side
    if width / height > cols / rows:  # wider than the grid: padding was added above and below
        kept_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept_rows) // 2)
    else:
        kept_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept_cols) // 2)
    crops = 1 + grid_rows * grid_cols
    return crops, arch.image_features_per_crop + rows * cols + rows


def qwen2_vl_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Size the Qwen2-VL image processor resizes an image to (both sides multiples of ``factor``).

    Each side is rounded to the nearest multiple of ``factor`` (= patch · merge = 28); if the area
    then exceeds ``max_pixels`` (or falls below ``min_pixels``) the image is scaled uniformly to fit,
    rounding sides down (up). Defaults are transformers' processor defaults.
    """
    height, width = _count(height, "height"), _count(width, "width")
    if height == 0 or width == 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def qwen2_vl_image_tokens(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    resize: bool = True,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """ViT patches and LLM visual tokens of Qwen2-VL / Qwen2.5-VL for one ``height × width`` image.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    patch_size, merge_size : int, optional
        14 and 2 for Qwen2-VL and Qwen2.5-VL.
    resize : bool, optional
        Apply the processor's resize rule first (:func:`qwen2_vl_resize`); with ``False`` the sides
        must already be multiples of ``patch_size · merge_size``.
    min_pixels, max_pixels : int, optional
        Processor pixel bounds (transformers' defaults).

    Returns
    -------
    (int, int)
        ``(patches, tokens)``: tokens through the ViT (one temporal patch covers the duplicated image
        frame, so ``(h/14)·(w/14)``) and tokens entering the LLM after the ``merge²`` merger.
    """
    factor = patch_size * merge_size
    if resize:
        h, w = qwen2_vl_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    else:
        h, w = _count(height, "height"), _count(width, "width")
        if h == 0 or w == 0 or h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} must be positive multiples of {factor} when resize=False")
    patches = (h // patch_size) * (w // patch_size)
    return patches, patches // (merge_size * merge_size)

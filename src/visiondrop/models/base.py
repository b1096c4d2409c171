"""The parts shared by every model family: the text stack and the adapter base.

What methods receive (:class:`ImageInfo`, :class:`VisionTokens`, :class:`LLMTokens`) lives in the torch-only
:mod:`visiondrop.tokens` and is re-exported here for the adapters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cached_property
from typing import ClassVar

import torch
from torch import nn

from .. import ops
from ..compat import uses_sliding_window
from ..schedule import Schedule
from ..tokens import ImageInfo, LLMTokens, VisionTokens

__all__ = ["ImageInfo", "LLMTokens", "ModelAdapter", "TextStack", "UnitTokens", "VisionTokens"]


class UnitTokens(VisionTokens):
    """What a method sees of one image whose LLM tokens are units of several patches (Qwen-VL's 2x2 merged units,
    InternVL's pixel-shuffled 2x2 blocks): the adapter scores the units itself; no [CLS] among them.

    Parameters
    ----------
    units : Tensor, shape (1, n, Dp)
        Each unit's concatenated patch vectors (the projector's input).
    scores : Tensor, shape (1, n)
        Visual attention each unit receives (summed over its patches).
    keys : Tensor, shape (1, n, d)
        Mean key of each unit's patches (scoring layer, heads averaged).
    grids : tuple of (rows, cols)
        Unit grids, in unit order.
    project : callable
        The projector, applied to (some of) the units.
    """

    def __init__(
        self,
        units: torch.Tensor,
        scores: torch.Tensor,
        keys: torch.Tensor,
        grids: tuple[tuple[int, int], ...],
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__(units, has_cls=False, grids=grids)
        self._scores = scores
        self._keys = keys
        self._project = project

    def visual_attention(self) -> torch.Tensor:
        return self._scores

    def keys(self) -> torch.Tensor:
        return self._keys

    def projected(self) -> torch.Tensor:
        return self._project(self.hidden)


class TextStack:
    """A decoder-only text model as the in-LLM stages see it (Llama, Mistral, Qwen2, Qwen2-VL's text model).

    It needs each decoder layer to be called with ``hidden_states`` first and ``attention_mask``,
    ``position_embeddings`` (cos, sin) and ``position_ids`` as keywords, and each attention module to expose
    ``q_proj``/``k_proj``/``head_dim`` — the transformers 5.x layout of these families.
    """

    def __init__(self, text_model: nn.Module) -> None:
        self.model = text_model
        self.config = text_model.config
        self.layers: nn.ModuleList = text_model.layers
        self.rotary_emb: nn.Module = text_model.rotary_emb
        self.num_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.num_heads: int = self.config.num_attention_heads
        self.num_kv_heads: int = self.config.num_key_value_heads
        self.layer_types: list[str] | None = getattr(self.config, "layer_types", None)
        params = inspect.signature(type(self.layers[0]).forward).parameters
        if "position_embeddings" not in params:
            raise TypeError(
                f"{type(self.layers[0]).__name__} does not take position_embeddings; visiondrop supports "
                "transformers 5.x decoder layers that do"
            )

    def layer_type(self, layer_idx: int) -> str:
        if self.layer_types is None:
            return "sliding_attention" if uses_sliding_window(self.config) else "full_attention"
        return self.layer_types[layer_idx]

    def query_key(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        queries: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Layer ``layer_idx``'s post-RoPE queries and keys of ``hidden`` (its input norm, then q/k projections).

        Parameters
        ----------
        hidden : Tensor, shape (B, T, D)
        cos, sin : Tensor, shape (B, T, d)

        Returns
        -------
        q : Tensor, shape (B, H, T, d), or None when ``queries`` is False
        k : Tensor, shape (B, Hkv, T, d)
        """
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        k = attn.k_proj(normed).view(shape)
        if hasattr(attn, "k_norm"):  # Qwen3-style per-head norms
            k = attn.k_norm(k)
        k = ops.apply_rope(k.transpose(1, 2), cos, sin)
        if not queries:
            return None, k
        q = attn.q_proj(normed).view(shape)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = ops.apply_rope(q.transpose(1, 2), cos, sin)
        return q, k

    def expand_kv(self, k: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, T, d) -> (B, H, T, d): query head ``h`` uses KV head ``h // (H / Hkv)`` (GQA)."""
        groups = self.num_heads // self.num_kv_heads
        return k if groups == 1 else k.repeat_interleave(groups, dim=1)


class ModelAdapter:
    """Where a model family keeps its vision tower, placeholders and text stack, and how positions work.

    Subclasses set :attr:`model_classes` and implement the vision-stage hooks. Adapters are created per
    ``apply`` call and hold no state that outlives it.
    """

    #: Class names of the HF models this adapter handles.
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: Human-readable family name, for the report and errors.
    family: ClassVar[str] = ""
    #: Whether ``positions="compact"`` has a meaning for this family (not for M-RoPE models).
    supports_compact_positions: ClassVar[bool] = True
    #: Whether the vision encoder has a [CLS] token ([CLS]-ranked methods need one).
    has_cls: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        #: How a video's frames compete (the method's ``pool``, set when the method is attached): ``"frame"`` makes
        #: every frame its own pruning unit, ``"video"`` one unit of the whole video.
        self.pool = "frame"

    # --- the LLM side ---------------------------------------------------------------------------------------
    @cached_property
    def text(self) -> TextStack:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def placeholder_ids(self, infos: list[ImageInfo]) -> tuple[int, ...]:
        """The placeholder ids whose runs the pruning units ``infos`` fill, in the order :meth:`image_infos` lists
        them: the image placeholder, and the video placeholder when a unit is part of a video (a call without videos
        never counts a stray video id as a placeholder)."""
        return (self.image_token_id,)

    def has_visual(self, kwargs: dict) -> bool:
        """Whether a call carries pixels for the vision stage (images, or videos where the family has them)."""
        return kwargs.get("pixel_values") is not None

    # --- the vision side ------------------------------------------------------------------------------------
    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        """Facts about every pruning unit of a call (an image, a video's frame or a whole video per :attr:`pool`),
        in placeholder order over (batch, sequence)."""
        raise NotImplementedError

    def default_image_tokens(self) -> int | None:
        """Visual tokens per image when the family has a fixed count (LLaVA-1.5: 576), else None."""
        return None

    def default_grids(self) -> tuple[tuple[int, int], ...] | None:
        """The patch grids of every image when the family has fixed ones (LLaVA-1.5: 24 x 24), else None."""
        return None

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        """Run the vision tower on the call's images.

        Returns
        -------
        list of (image indices, VisionTokens)
            Groups of images with the same token count.
        """
        raise NotImplementedError

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        """The LLM input features of a group after the vision-stage ``selection`` (None: keep all, unpruned).

        Returns
        -------
        Tensor, shape (I, k, D)
        """
        raise NotImplementedError

    def mm_encoder_outputs(self, features: list[torch.Tensor]) -> dict:
        """Wrap per-image features (k_i, D) as the ``mm_encoder_outputs`` kwarg of the model's forward."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=features)}

    def vision_kwargs(self) -> tuple[str, ...]:
        """Forward kwargs that carry images and must not reach the model once the vision stage consumed them."""
        return ("pixel_values",)

    def aligned_kwargs(self) -> tuple[str, ...]:
        """Other per-token inputs (B, L) that must shrink with ``input_ids`` (Qwen2-VL: ``mm_token_type_ids``)."""
        return ()

    def check_call(self, kwargs: dict) -> None:
        """Refuse inputs the family's adapter does not handle (one-line ValueError)."""

    def check_schedule(self, schedule: Schedule) -> None:
        """Refuse a schedule the family cannot run (one-line ValueError); Qwen3-VL: boundaries before DeepStack ends."""

    def positions(self, kwargs: dict, *, generate: bool) -> torch.Tensor | None:
        """Positions of the unpruned sequence when the family computes its own (M-RoPE), else None.

        ``generate`` tells whether they are for ``generate()`` (which may want a different layout) or a forward call.
        """
        return None


#: Adapter classes, looked up by the model's class name.
ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    ADAPTERS.append(cls)
    return cls


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; TypeError naming the supported classes otherwise."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    supported = sorted(n for cls in ADAPTERS for n in cls.model_classes)
    raise TypeError(f"unsupported model class {name}; visiondrop supports {', '.join(supported)}")

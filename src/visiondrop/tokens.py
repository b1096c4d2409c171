"""The method-facing interface: what pruning methods receive and return, with torch as the only dependency.

Methods never touch model internals. At the vision stage they receive :class:`VisionTokens`, inside the LLM
:class:`LLMTokens`; both compute attention scores lazily (only what a method asks for is computed, once) from the
relevant layer's own query/key projections, never from ``output_attentions``. They answer with a
:class:`~visiondrop.ops.Selection`. Nothing here imports transformers, so methods (and anything that only builds
them, like a serving plugin on another transformers version) import without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from . import ops
from .ops import Selection
from .report import selection_maps

if TYPE_CHECKING:
    from .models.base import TextStack

__all__ = ["ImageInfo", "LLMTokens", "Selection", "VisionTokens", "selection_maps"]


@dataclass(frozen=True)
class ImageInfo:
    """Static facts about one image's visual tokens, or one pruning unit of a video (a frame, or the whole video).

    Attributes
    ----------
    tokens : int
        Placeholder tokens the unpruned model gives this image in the LLM.
    grids : tuple of (rows, cols)
        The patch grids the report's kept positions index into, in placeholder order: patch ``p`` of the image is
        cell ``p`` of the grids laid end to end (LLaVA-1.5: one 24 x 24 grid; LLaVA-NeXT: the base view, then the
        unpadded high-resolution grid). Empty when unknown (features passed in by the caller).
    vit_tokens : tuple of int
        Tokens of every vision-tower pass this image takes (one per crop), for the cost accounting.
    newlines : tuple of bool
        Per grid, whether each of its rows is followed by one extra placeholder (LLaVA-NeXT's ``image_newline``).
    video : int or None
        For a unit of a video, the video's number among the call's videos (in placeholder order); None for an image.
    frames : tuple of int
        For a unit of a video, the frames of that video it covers, in order (Qwen-VL: temporal patches of two frames;
        Video-LLaVA: frames). With ``pool="frame"`` a unit is one frame, with ``pool="video"`` the whole video; its
        ``grids`` then hold one grid per frame.
    cls : bool
        Whether each grid's placeholders start with one for its [CLS] token (Video-LLaVA's video frames give the LLM
        their [CLS] too); False where [CLS] is dropped before the LLM or there is none.
    tail : int
        Placeholders after the grids that carry no patch (LLaVA-OneVision: the one ``image_newline`` closing a video,
        counted in the unit that ends the video).
    """

    tokens: int
    grids: tuple[tuple[int, int], ...] = ()
    vit_tokens: tuple[int, ...] = ()
    newlines: tuple[bool, ...] = ()
    video: int | None = None
    frames: tuple[int, ...] = ()
    cls: bool = False
    tail: int = 0

    @property
    def num_patches(self) -> int:
        return sum(h * w for h, w in self.grids)

    def placeholder_patches(self) -> list[int]:
        """For each placeholder of the unpruned image, the patch it carries, or -1 (a newline, or unknown)."""
        out: list[int] = []
        patch = 0
        for (rows, cols), newline in zip(
            self.grids, self.newlines or (False,) * len(self.grids), strict=True
        ):
            if self.cls:
                out.append(-1)
            for _ in range(rows):
                out += range(patch, patch + cols)
                patch += cols
                if newline:
                    out.append(-1)
        out += [-1] * self.tail
        return out if len(out) == self.tokens else [-1] * self.tokens


class VisionTokens:
    """The visual tokens of a group of ``I`` images at the vision stage, before the projector.

    Token index ``t`` of :attr:`hidden` is patch ``patch_index[t]`` of the image's grids (``-1`` for [CLS]) and takes
    the place of placeholder ``placeholder_offset[t]`` of the image's run in the LLM input.

    Attributes
    ----------
    hidden : Tensor, shape (I, n, Dv)
        Output of the layer the LVLM takes its features from (what the projector would receive, [CLS] included).
    has_cls : bool
        Whether token 0 is [CLS].
    grids : tuple of (rows, cols)
        The image's patch grids (see :class:`ImageInfo`).
    """

    def __init__(self, hidden: torch.Tensor, *, has_cls: bool, grids: tuple[tuple[int, int], ...]) -> None:
        self.hidden = hidden
        self.has_cls = has_cls
        self.grids = grids

    @property
    def num_images(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    @cached_property
    def patch_index(self) -> torch.Tensor:
        """LongTensor (n,): the grid patch of every token, ``-1`` for [CLS]."""
        offset = 1 if self.has_cls else 0
        return torch.arange(self.num_tokens, device=self.hidden.device) - offset

    @cached_property
    def placeholder_offset(self) -> torch.Tensor:
        """LongTensor (n,): the placeholder each token stands for ([CLS] takes the first one's place)."""
        return self.patch_index.clamp(min=0)

    @cached_property
    def patch_mask(self) -> torch.Tensor:
        """BoolTensor (n,): True for patch tokens (False for [CLS])."""
        return self.patch_index >= 0

    # The three signals below are what methods may ask for; subclasses compute them from the scoring layer.
    def cls_attention(self) -> torch.Tensor:
        """(I, n) fp32: attention of the [CLS] query to each token (0 for [CLS] itself)."""
        raise NotImplementedError(f"{type(self).__name__} has no [CLS] token to score with")

    def visual_attention(self) -> torch.Tensor:
        """(I, n) fp32: mean attention each token receives from the image's patch queries (0 for [CLS])."""
        raise NotImplementedError

    def keys(self) -> torch.Tensor:
        """(I, n, d) the scoring layer's keys averaged over heads: the similarity metric for merging."""
        raise NotImplementedError

    def projected(self) -> torch.Tensor:
        """(I, n, D) the tokens after the multimodal projector (DivPrune compares these)."""
        raise NotImplementedError


class LLMTokens:
    """The visual tokens of a group of ``I`` images at an in-LLM boundary, with lazily computed scores.

    Scores use the *next* layer (the first one that will see the pruned sequence): its input norm, q/k projections and
    RoPE at the current positions (SPEC §4.1). Only the queries a score needs are projected (the image tokens, or the
    last prompt token); keys are projected once for the image's row and shared by every score.

    Attributes
    ----------
    hidden : Tensor, shape (I, n, D)
        Residual stream of the image tokens after the previous layer.
    layer_idx : int
        Index of the next layer (the boundary is "after layer ``layer_idx``").
    """

    def __init__(
        self,
        stack: TextStack,
        layer_idx: int,
        seq_hidden: torch.Tensor,
        key_valid: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        starts: torch.Tensor,
        n: int,
        last_query: torch.Tensor,
    ) -> None:
        """
        Parameters
        ----------
        seq_hidden : Tensor, shape (I, T, D)
            The whole row of each image.
        key_valid : BoolTensor, shape (I, T)
        cos, sin : Tensor, shape (I, T, d)
        starts : LongTensor, shape (I,)
            Column where each image's tokens start.
        n : int
            Tokens per image.
        last_query : LongTensor, shape (I,)
            Column of the row's last prompt token (the text query of text-guided methods).
        """
        self.stack = stack
        self.layer_idx = layer_idx
        self._seq = seq_hidden
        self._valid = key_valid
        self._cos, self._sin = cos, sin
        self.columns = starts[:, None] + torch.arange(n, device=starts.device)  # (I, n)
        self._last = last_query
        self.hidden = seq_hidden.gather(1, self.columns[..., None].expand(-1, -1, seq_hidden.shape[-1]))

    @property
    def num_images(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    @cached_property
    def _keys(self) -> torch.Tensor:
        _, k = self.stack.query_key(self.layer_idx, self._seq, self._cos, self._sin, queries=False)
        return k  # (I, Hkv, T, d)

    def _queries_at(self, columns: torch.Tensor) -> torch.Tensor:
        """Post-RoPE queries of the tokens at ``columns`` (I, m): shape (I, H, m, d)."""
        gather = columns[..., None]
        rows = self._seq.gather(1, gather.expand(-1, -1, self._seq.shape[-1]))
        cos = self._cos.gather(1, gather.expand(-1, -1, self._cos.shape[-1]))
        sin = self._sin.gather(1, gather.expand(-1, -1, self._sin.shape[-1]))
        q, _ = self.stack.query_key(self.layer_idx, rows, cos, sin)
        return q

    def visual_attention(self, debias: bool = False) -> torch.Tensor:
        """(I, n) fp32: attention each image token receives from the image's own queries (SPEC §4.2).

        Softmax over the whole visible sequence (causal and padding masks, fp32), mean over heads, image key
        columns, mean over the image queries — or, with ``debias``, over only the queries that can see each column.
        """
        q = self._queries_at(self.columns)
        keys = self.stack.expand_kv(self._keys)
        return ops.visual_attention(q, keys, self._valid, self.columns, causal=True, debias=debias)

    def text_attention(self) -> torch.Tensor:
        """(I, n) fp32: attention the row's last prompt token gives each image token (FastV, PyramidDrop)."""
        q = self._queries_at(self._last[:, None])
        keys = self.stack.expand_kv(self._keys)
        return ops.query_attention(q, keys, self._valid, self.columns)

    def question_attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention every prompt token after the image gives each image token (SparseVLM's candidate raters).

        Each query's softmax runs over the keys it sees (causal and padding masks, fp32), mean over heads.

        Returns
        -------
        attention : Tensor, shape (I, Q, n)
            Row ``j``: the ``j``-th token after the image (up to the row's last prompt token).
        valid : BoolTensor, shape (I, Q)
            False for rows past an image's last prompt token (images followed by fewer tokens). An image with no
            token after it gets its last prompt token as the one query.
        """
        after = self.columns[:, -1] + 1  # (I,)
        count = (self._last - after + 1).clamp(min=1)
        steps = torch.arange(int(count.max()), device=after.device)
        columns = torch.minimum(after[:, None] + steps, self._last[:, None])  # (I, Q)
        valid = steps[None, :] < count[:, None]
        q = self._queries_at(columns).float()  # (I, H, Q, d)
        keys = self.stack.expand_kv(self._keys).float()  # (I, H, T, d)
        logits = torch.matmul(q, keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
        seen = self._valid[:, None, :] & (
            torch.arange(keys.shape[2], device=q.device)[None, None, :] <= columns[:, :, None]
        )
        probs = torch.softmax(logits.masked_fill(~seen[:, None], float("-inf")), dim=-1).mean(1)  # (I, Q, T)
        return probs.gather(2, self.columns[:, None, :].expand(-1, probs.shape[1], -1)), valid

    def keys(self) -> torch.Tensor:
        """(I, n, d) post-RoPE keys of the image tokens averaged over heads: the merge metric."""
        k = self._keys.mean(1)  # (I, T, d)
        return k.gather(1, self.columns[..., None].expand(-1, -1, k.shape[-1]))

    def key_heads(self) -> torch.Tensor:
        """(I, n, Hkv * d) post-RoPE keys of the image tokens, heads concatenated (DART's pivots and similarity)."""
        k = self._keys.transpose(1, 2).flatten(2)  # (I, T, Hkv*d)
        return k.gather(1, self.columns[..., None].expand(-1, -1, k.shape[-1]))

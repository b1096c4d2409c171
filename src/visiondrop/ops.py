"""Pure tensor functions: attention scores from queries and keys, top-k keep, contextual merge, pooling, diversity.

Nothing here knows about models. Every function works on a *group* of ``I`` images that have the same number of
tokens, so a batch is processed with a handful of large tensor operations rather than a Python loop per image.

Shapes use these letters: ``I`` images in the group, ``H`` attention heads, ``n`` tokens per image, ``T`` keys
(the whole sequence a query may attend to), ``d`` head or feature width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Selection",
    "apply_rope",
    "assign_to_anchors",
    "cls_attention",
    "contextual_selection",
    "farthest_anchors",
    "grid_pool_selection",
    "max_min_diversity",
    "merge_groups",
    "query_attention",
    "rotate_half",
    "stride_anchors",
    "top_k_sorted",
    "visual_attention",
]

# Elements of one fp32 logits block (heads x queries x keys) computed at once; larger problems are split over heads
# so that scoring a 2,880-token LLaVA-NeXT image never needs gigabytes.
_MAX_BLOCK = 1 << 26


@dataclass
class Selection:
    """What survives a pruning stage, for a group of ``I`` images of ``n`` tokens each.

    The stage outputs, per image, the ``keep`` tokens (in the order given) followed by one merged token per anchor.
    A merged ("contextual") token combines its anchor with every token whose ``assign`` entry names that anchor's slot.
    Tokens that are neither kept, anchors, nor assigned are dropped.

    Attributes
    ----------
    keep : LongTensor, shape (I, k)
        Indices (into the ``n`` tokens) kept as they are, in output order.
    anchors : LongTensor, shape (I, c), optional
        Indices of the tokens that carry the merged tokens, in output order.
    assign : LongTensor, shape (I, n), optional
        For each token, the anchor slot ``0..c-1`` it is merged into, or ``-1``. Anchors themselves are ``-1``.
    merge : str
        ``"reference"``: anchor + mean(members) (the VisionDrop/VisionZip release); ``"mean"``: the mean over the
        anchor and its members. An anchor without members stays itself in both modes.
    space : str
        Where merged tokens are combined at the vision stage: ``"vision"`` (before the projector, as VisionZip and
        VisionDrop do) or ``"projected"`` (after it). Ignored inside the LLM.
    """

    keep: torch.Tensor
    anchors: torch.Tensor | None = None
    assign: torch.Tensor | None = None
    merge: str = "reference"
    space: str = "vision"

    @property
    def num_images(self) -> int:
        return self.keep.shape[0]

    @property
    def num_kept(self) -> int:
        return self.keep.shape[1]

    @property
    def num_merged(self) -> int:
        return 0 if self.anchors is None else self.anchors.shape[1]

    @property
    def num_out(self) -> int:
        return self.num_kept + self.num_merged

    def sources(self) -> torch.Tensor:
        """Index of the token each output token stands at (the anchor for a merged token), shape (I, k + c)."""
        if self.anchors is None:
            return self.keep
        return torch.cat([self.keep, self.anchors], dim=1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Build the stage's output tokens from ``x`` of shape (I, n, D): shape (I, k + c, D)."""
        kept = x.gather(1, self.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.anchors is None:
            return kept
        merged = merge_groups(x, self.anchors, self.assign, self.merge)
        return torch.cat([kept, merged], dim=1)

    def select(self, rows: torch.Tensor) -> Selection:
        """The same selection for a subset of the images, ``rows`` a LongTensor of image indices."""
        return Selection(
            keep=self.keep[rows],
            anchors=None if self.anchors is None else self.anchors[rows],
            assign=None if self.assign is None else self.assign[rows],
            merge=self.merge,
            space=self.space,
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension, as rotary embeddings (Llama, Mistral, Qwen2) define it."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, H, T, d) with ``cos``/``sin`` of shape (B, T, d)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _head_chunks(num_heads: int, rows: int, cols: int, images: int = 1) -> int:
    per_head = max(1, rows * cols * images)
    return max(1, min(num_heads, _MAX_BLOCK // per_head))


def visual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor | None,
    query_pos: torch.Tensor,
    *,
    causal: bool,
    debias: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention each image token receives from the image's own tokens (visual-only scoring, SPEC §4.2).

    For every query row a softmax is taken over all ``T`` keys it may see (the whole sequence: text keys take their
    share of the mass, and columns are not renormalised). The probabilities are averaged over heads, restricted to the
    image's own key columns and averaged over the image's queries.

    Parameters
    ----------
    q : Tensor, shape (I, H, n, d)
        Queries of the image tokens (post-RoPE inside the LLM).
    k : Tensor, shape (I, H, T, d)
        Keys of the sequence the queries attend to; GQA keys must already be expanded to ``H`` heads.
    key_valid : BoolTensor, shape (I, T), optional
        False for padding keys.
    query_pos : LongTensor, shape (I, n)
        Column of each image token among the ``T`` keys (the image's own key columns).
    causal : bool
        Whether a query at column ``p`` only sees keys ``<= p`` (LLM) or all keys (ViT).
    debias : bool
        Average each column only over the queries that can see it (the ``n - j`` queries at or after image token
        ``j`` under a causal mask) instead of over all ``n``. Removes the early-token bias of causal scoring.
    scale : float, optional
        Logit scale, default ``d ** -0.5``.

    Returns
    -------
    Tensor, shape (I, n)
        Score of each image token, fp32.
    """
    num_images, num_heads, n, dim = q.shape
    total_keys = k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    mask = torch.ones(num_images, n, total_keys, dtype=torch.bool, device=q.device)
    if key_valid is not None:
        mask &= key_valid[:, None, :]
    if causal:
        cols = torch.arange(total_keys, device=q.device)
        mask &= cols[None, None, :] <= query_pos[:, :, None]
    # Only column sums are kept (over heads and queries): memory stays O(n * T) per head chunk, never O(H * n * T).
    received = torch.zeros(num_images, n, dtype=torch.float32, device=q.device)
    step = _head_chunks(num_heads, n, total_keys, num_images)
    for h0 in range(0, num_heads, step):
        logits = (
            torch.matmul(q[:, h0 : h0 + step].float(), k[:, h0 : h0 + step].float().transpose(-1, -2)) * scale
        )
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
        # (I, T): summed over this chunk's heads and queries.
        probs = torch.softmax(logits, dim=-1).sum(dim=(1, 2))
        received += probs.gather(1, query_pos)
    received /= num_heads
    if debias and causal:
        # Under the causal mask image key j is seen by image queries j..n-1 only: average over those.
        return received / torch.arange(n, 0, -1, device=q.device, dtype=torch.float32)
    return received / n


def query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor | None,
    columns: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention that a few queries give to chosen key columns, softmax over all keys, mean over heads and queries.

    Used for [CLS] scoring in a ViT (one query) and for text-guided methods (FastV, PyramidDrop: the last prompt
    token's query). The caller passes only keys the queries may see.

    Parameters
    ----------
    q : Tensor, shape (I, H, m, d)
    k : Tensor, shape (I, H, T, d)
    key_valid : BoolTensor, shape (I, T), optional
    columns : LongTensor, shape (I, n)
        Key columns to return.

    Returns
    -------
    Tensor, shape (I, n), fp32.
    """
    _num_images, _num_heads, _m, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (I, H, m, T)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).mean(dim=(1, 2))  # (I, T)
    return probs.gather(1, columns)


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Attention of the [CLS] query to every patch of a ViT layer, mean over heads.

    Parameters
    ----------
    q_cls : Tensor, shape (I, H, 1, d)
    k : Tensor, shape (I, H, 1 + N, d)
        Keys of [CLS] (index 0) and the ``N`` patches.

    Returns
    -------
    Tensor, shape (I, N), fp32: the softmax mass [CLS] puts on each patch (its own share is left out).
    """
    num_images, _, total, _ = k.shape
    patches = torch.arange(1, total, device=k.device).expand(num_images, -1)
    return query_attention(q_cls, k, None, patches, scale=scale)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, in ascending index (original) order.

    Ties resolve to the lower index, so the result is deterministic.

    Parameters
    ----------
    scores : Tensor, shape (I, n)
    k : int

    Returns
    -------
    LongTensor, shape (I, k)
    """
    if k == 0:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.long)
    # A stable descending sort makes ties deterministic (torch.topk does not promise an order among equal values).
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def stride_anchors(num_rest: int, num_anchors: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions (within the remaining tokens) of the contextual anchors: every ``max(1, r // c)``-th, first ``c``.

    This is the release's rule (SPEC §3.3): with ``r`` remaining tokens and ``c`` anchors the step is
    ``max(1, r // c)`` and the anchors are ``R[0], R[step], R[2*step], ...``.

    Returns
    -------
    LongTensor, shape (c,)
    """
    if num_anchors > num_rest:
        raise ValueError(f"cannot pick {num_anchors} contextual anchors from {num_rest} remaining tokens")
    step = max(1, num_rest // max(1, num_anchors))
    return torch.arange(num_anchors, device=device) * step


def assign_to_anchors(metric: torch.Tensor, anchor_pos: torch.Tensor) -> torch.Tensor:
    """Assign every token to the anchor with the highest cosine similarity of ``metric``.

    Parameters
    ----------
    metric : Tensor, shape (I, r, d)
        The vectors compared (keys averaged over heads).
    anchor_pos : LongTensor, shape (c,) or (I, c)
        Positions of the anchors among the ``r`` tokens.

    Returns
    -------
    LongTensor, shape (I, r)
        The anchor slot (0..c-1) of each token; an anchor is assigned to its own slot. Ties go to the lower slot.
    """
    num_images = metric.shape[0]
    if anchor_pos.dim() == 1:
        anchor_pos = anchor_pos.expand(num_images, -1)
    unit = F.normalize(metric.float(), dim=-1)
    anchors = unit.gather(1, anchor_pos.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    sim = torch.matmul(unit, anchors.transpose(1, 2))  # (I, r, c)
    slot = sim.argmax(dim=-1)
    own = torch.arange(anchor_pos.shape[1], device=metric.device).expand(num_images, -1)
    return slot.scatter(1, anchor_pos, own)


def merge_groups(x: torch.Tensor, anchors: torch.Tensor, assign: torch.Tensor, mode: str) -> torch.Tensor:
    """Combine every anchor with the tokens assigned to it.

    Parameters
    ----------
    x : Tensor, shape (I, n, D)
    anchors : LongTensor, shape (I, c)
    assign : LongTensor, shape (I, n)
        Anchor slot per token or -1; the anchors' own entries are ignored.
    mode : str
        ``"reference"``: ``anchor + mean(members)``; ``"mean"``: ``(anchor + sum(members)) / (1 + m)``. An anchor
        with no members is returned unchanged in both modes.

    Returns
    -------
    Tensor, shape (I, c, D), in the dtype of ``x`` (sums are taken in fp32).
    """
    num_images, n, width = x.shape
    c = anchors.shape[1]
    is_anchor = torch.zeros(num_images, n, dtype=torch.bool, device=x.device).scatter(1, anchors, True)
    member = (assign >= 0) & ~is_anchor
    slots = torch.where(
        member, assign, torch.full_like(assign, c)
    )  # non-members go to a discarded extra slot
    sums = torch.zeros(num_images, c + 1, width, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, slots.unsqueeze(-1).expand(-1, -1, width), x.float())
    counts = torch.zeros(num_images, c + 1, dtype=torch.float32, device=x.device)
    counts.scatter_add_(1, slots, torch.ones_like(slots, dtype=torch.float32))
    sums, counts = sums[:, :c], counts[:, :c, None]
    anchor_x = x.gather(1, anchors.unsqueeze(-1).expand(-1, -1, width)).float()
    if mode == "reference":
        merged = anchor_x + sums / counts.clamp(min=1)
    elif mode == "mean":
        merged = (anchor_x + sums) / (1 + counts)
    else:
        raise ValueError(f"merge must be 'reference' or 'mean', got {mode!r}")
    return merged.to(x.dtype)


def contextual_selection(
    scores: torch.Tensor,
    metric: torch.Tensor,
    num_dominant: int,
    num_contextual: int,
    *,
    candidates: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
    merge: str = "reference",
    space: str = "vision",
    anchors: str = "stride",
) -> Selection:
    """Dominant tokens by score plus contextual tokens merged by similarity (VisionDrop / VisionZip, SPEC §3–4).

    1. Dominant: the ``forced`` tokens (e.g. [CLS]) and the top-scoring candidates, ``num_dominant`` in all, kept in
       original order.
    2. Contextual: the remaining candidates R (original order) give ``num_contextual`` anchors at a fixed stride;
       every other token of R joins the anchor whose ``metric`` is most cosine-similar.

    Parameters
    ----------
    scores : Tensor, shape (I, n)
    metric : Tensor, shape (I, n, d)
    num_dominant, num_contextual : int
    candidates : BoolTensor, shape (n,), optional
        Tokens that may be chosen or merged (default all). Non-candidates that are not forced are dropped.
    forced : LongTensor, shape (f,), optional
        Tokens always kept, counted among the dominant ones.
    anchors : str
        ``"stride"``: every ``r // c``-th remaining token (the release); ``"farthest"``: farthest-point sampling
        over ``metric`` (:func:`farthest_anchors`), for coverage.

    Returns
    -------
    Selection
    """
    if anchors not in ("stride", "farthest"):
        raise ValueError(f"anchors must be 'stride' or 'farthest', got {anchors!r}")
    num_images, n = scores.shape
    device = scores.device
    if candidates is None:
        candidates = torch.ones(n, dtype=torch.bool, device=device)
    num_forced = 0 if forced is None else forced.numel()
    ranked = scores.masked_fill(~candidates, float("-inf"))
    if forced is not None and num_forced:
        ranked = ranked.index_fill(1, forced, float("inf"))
    keep = top_k_sorted(ranked, num_dominant)
    if num_contextual == 0:
        return Selection(keep=keep, merge=merge, space=space)
    taken = torch.zeros(num_images, n, dtype=torch.bool, device=device).scatter(1, keep, True)
    rest_mask = candidates.expand(num_images, -1) & ~taken
    num_rest = int(rest_mask[0].sum())
    # Every image has the same number of remaining candidates, so R is a rectangular (I, r) index tensor.
    rest = torch.nonzero(rest_mask, as_tuple=False)[:, 1].view(num_images, num_rest)
    rest_metric = metric.gather(1, rest.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
    if anchors == "stride":
        anchor_pos = stride_anchors(num_rest, num_contextual, device).expand(num_images, -1)
    else:
        kept_metric = metric.gather(1, keep.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
        anchor_pos = farthest_anchors(rest_metric, num_contextual, covered=kept_metric)
    slot_rest = assign_to_anchors(rest_metric, anchor_pos)
    assign = torch.full((num_images, n), -1, dtype=torch.long, device=device).scatter(1, rest, slot_rest)
    return Selection(keep=keep, anchors=rest.gather(1, anchor_pos), assign=assign, merge=merge, space=space)


def farthest_anchors(
    metric: torch.Tensor, num_anchors: int, covered: torch.Tensor | None = None
) -> torch.Tensor:
    """Farthest-point sampling under cosine distance: each next anchor is the token farthest from every token
    chosen so far (and from the ``covered`` ones, e.g. the dominant tokens), so anchors spread over what the kept
    tokens do not already represent. Ties go to the lower index.

    Parameters
    ----------
    metric : Tensor, shape (I, r, d)
    num_anchors : int
    covered : Tensor, shape (I, k, d), optional

    Returns
    -------
    LongTensor, shape (I, num_anchors): positions among the ``r``, ascending.
    """
    num_images, r, _ = metric.shape
    if num_anchors > r:
        raise ValueError(f"cannot pick {num_anchors} contextual anchors from {r} remaining tokens")
    unit = F.normalize(metric.float(), dim=-1)
    if covered is not None and covered.shape[1]:
        nearest = 1 - torch.matmul(unit, F.normalize(covered.float(), dim=-1).transpose(1, 2)).amax(-1)
    else:
        nearest = torch.full((num_images, r), float("inf"), device=metric.device)
    chosen = []
    rows = torch.arange(num_images, device=metric.device)
    for _ in range(num_anchors):
        pick = nearest.argmax(dim=1)  # argmax returns the first maximum: ties to the lower index
        chosen.append(pick)
        distance = 1 - torch.matmul(unit, unit[rows, pick].unsqueeze(-1)).squeeze(-1)
        nearest = torch.minimum(nearest, distance)
        nearest[rows, pick] = float("-inf")
    return torch.stack(chosen, dim=1).sort(dim=1).values


def grid_pool_selection(
    height: int, width: int, out_h: int, out_w: int, num_images: int, device=None
) -> Selection:
    """2-D average pooling of an ``height x width`` token grid to ``out_h x out_w`` cells, as a merge.

    Cell boundaries follow adaptive average pooling (``floor(i*H/h)`` to ``ceil((i+1)*H/h)``), without overlap:
    each token belongs to the cell that contains its centre. Each cell becomes one merged token anchored at its
    top-left token, combined with ``mode="mean"``, so the output equals the cell average.

    Returns
    -------
    Selection with ``keep`` empty and ``out_h * out_w`` anchors in raster order.
    """
    rows = (torch.arange(height, device=device) * out_h) // height  # cell row of each token row
    cols = (torch.arange(width, device=device) * out_w) // width
    cell = (rows[:, None] * out_w + cols[None, :]).reshape(-1)  # (n,)
    num_cells = out_h * out_w
    # First token (raster order) of every cell is its anchor.
    first = torch.full((num_cells,), height * width, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, cell, torch.arange(height * width, device=device), reduce="amin")
    anchors = first.expand(num_images, -1).clone()
    assign = cell.expand(num_images, -1).clone()
    keep = torch.zeros(num_images, 0, dtype=torch.long, device=device)
    return Selection(keep=keep, anchors=anchors, assign=assign, merge="mean", space="projected")


def max_min_diversity(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity selection by cosine distance (DivPrune's solver of the Max-Min Diversity Problem).

    The first token is the one whose nearest other token is farthest away; then, repeatedly, the token whose
    distance to its nearest chosen token is largest joins. Ties go to the lower index.

    Parameters
    ----------
    x : Tensor, shape (I, n, D)
    k : int

    Returns
    -------
    LongTensor, shape (I, k), in ascending index order.
    """
    num_images, n, _ = x.shape
    unit = F.normalize(x.float(), dim=-1)
    dist = 1.0 - torch.matmul(unit, unit.transpose(1, 2))  # (I, n, n)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    first = dist.masked_fill(eye, float("inf")).amin(dim=2).argmax(dim=1)  # (I,)
    chosen = torch.zeros(num_images, k, dtype=torch.long, device=x.device)
    chosen[:, 0] = first
    nearest = dist.gather(1, first[:, None, None].expand(-1, 1, n)).squeeze(
        1
    )  # (I, n) distance to chosen set
    picked = torch.zeros(num_images, n, dtype=torch.bool, device=x.device)
    picked.scatter_(1, first[:, None], True)
    for i in range(1, k):
        nxt = nearest.masked_fill(picked, float("-inf")).argmax(dim=1)
        chosen[:, i] = nxt
        picked.scatter_(1, nxt[:, None], True)
        nearest = torch.minimum(nearest, dist.gather(1, nxt[:, None, None].expand(-1, 1, n)).squeeze(1))
    return chosen.sort(dim=1).values


def pooled_grid_shape(height: int, width: int, budget: int) -> tuple[int, int]:
    """The pooled grid ``(h, w)`` with the most cells ``h * w <= budget`` whose aspect ratio stays within a factor
    1.5 of the image grid's (so cells stay roughly square); ties go to the closer aspect ratio.

    A 24 x 24 grid gives 8 x 8 at 64, 11 x 11 at 128 and 12 x 16 at 192.
    """
    if budget >= height * width:
        return height, width
    target = height / width
    best: tuple[int, float, int, int] | None = None
    for h in range(1, height + 1):
        w = min(width, budget // h)
        if w < 1:
            break
        ratio = (h / w) / target
        if not 2 / 3 <= ratio <= 1.5:
            continue
        key = (h * w, -round(abs(math.log(ratio)), 9), h, w)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:  # budgets too small for the ratio rule: a single row or column of cells
        return (1, min(width, budget)) if width >= height else (min(height, budget), 1)
    return best[2], best[3]

"""Where the images sit in a batch of token sequences, and how a stage rebuilds the sequences around them.

A stage replaces every image span of a row by that image's surviving tokens and leaves the text around it alone:
``[tokens before ; image's kept tokens ; image's merged tokens ; tokens after]`` (SPEC §4.4). Rows shrink by different
amounts (a prompt may hold two images, or none), so rows are re-padded on the left; the 2-D attention mask marks the
padding and every position and mask is gathered with the same index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Layout", "Span", "find_image_spans", "hf_generate_positions"]


@dataclass(frozen=True)
class Span:
    """One image's tokens in a row: columns ``start .. start + length - 1``, image number ``image`` (call order)."""

    start: int
    length: int
    image: int

    @property
    def end(self) -> int:
        return self.start + self.length


def find_image_spans(
    input_ids: torch.Tensor, image_token_id: int | Sequence[int], counts: Sequence[int]
) -> list[list[Span]]:
    """Split the placeholder runs of ``input_ids`` into one span per image.

    Images fill placeholders in order over (batch, sequence), as the model's ``masked_scatter`` does; a run of adjacent
    placeholders may hold several images, so runs are cut by the images' token ``counts``.

    Parameters
    ----------
    input_ids : LongTensor, shape (B, T)
    image_token_id : int or sequence of int
        The placeholder id, or every placeholder id (images and videos: their units fill placeholders in order).
    counts : sequence of int
        Placeholder tokens of each image, in order.

    Returns
    -------
    list (per row) of list of Span

    Raises
    ------
    ValueError
        When the placeholders do not match the images (one line naming both counts).
    """
    ids = torch.tensor(
        [image_token_id] if isinstance(image_token_id, int) else list(image_token_id), device=input_ids.device
    )
    is_image = torch.isin(input_ids, ids).cpu()
    found = int(is_image.sum())
    expected = int(sum(counts))
    if found != expected:
        raise ValueError(
            f"{len(counts)} image(s) need {expected} <image> placeholder tokens in input_ids, found {found}"
        )
    spans: list[list[Span]] = []
    image = 0
    for row in is_image:
        row_spans: list[Span] = []
        padded = torch.cat(
            [torch.zeros(1, dtype=torch.int8), row.to(torch.int8), torch.zeros(1, dtype=torch.int8)]
        )
        edges = torch.nonzero(padded[1:] != padded[:-1]).flatten().tolist()
        for run_start, run_end in zip(edges[0::2], edges[1::2], strict=True):
            cursor = run_start
            while cursor < run_end:
                length = counts[image]
                if cursor + length > run_end:
                    raise ValueError(
                        f"a run of {run_end - run_start} <image> placeholders does not split into whole images "
                        f"(image {image} needs {length})"
                    )
                row_spans.append(Span(cursor, length, image))
                cursor += length
                image += 1
        spans.append(row_spans)
    return spans


def hf_generate_positions(
    attention_mask: torch.Tensor | None, batch: int, length: int, device
) -> torch.Tensor:
    """Positions as ``generate()`` makes them: cumulative sum of the mask minus one, 0 on padding (transformers 5.x)."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


@dataclass
class Layout:
    """How a stage rebuilt the rows.

    Attributes
    ----------
    src : LongTensor, shape (B, T')
        Column of the old sequence each new column takes its token from (the anchor for a merged token); -1 for
        new left padding.
    spans : list of list of Span
        The images' spans in the new sequence.
    old_spans : dict
        Image -> its span in the old sequence.
    """

    src: torch.Tensor
    spans: list[list[Span]]
    old_spans: dict[int, Span]

    @property
    def valid(self) -> torch.Tensor:
        return self.src >= 0

    @classmethod
    def build(
        cls,
        spans: list[list[Span]],
        mask: torch.Tensor,
        sources: dict[int, torch.Tensor],
    ) -> Layout:
        """Lay out the new rows.

        Padding columns of the old sequence are dropped (they carry nothing in a prefill), then every row is
        left-padded to the longest one, so a batch shrinks as far as its longest row allows.

        Parameters
        ----------
        spans : per-row image spans of the old sequence
        mask : BoolTensor, shape (B, T)
            Real (True) and padding (False) columns of the old sequence.
        sources : dict image -> LongTensor (k,)
            For each image, the offsets (within its old span) its new tokens take their place from. Images
            missing from the dict keep their span unchanged.
        """
        device = mask.device
        length = mask.shape[1]
        columns = torch.arange(length, device=device)
        rows: list[torch.Tensor] = []
        new_spans: list[list[Span]] = []
        for b, row_spans in enumerate(spans):
            real = mask[b]
            pieces: list[torch.Tensor] = []
            cursor = 0
            width = 0
            row_new: list[Span] = []
            for span in [*row_spans, Span(length, 0, -1)]:  # a sentinel span closes the last text segment
                text = columns[cursor : span.start]
                text = text[real[cursor : span.start]]
                pieces.append(text)
                width += text.numel()
                if span.image < 0:
                    break
                offsets = sources.get(span.image)
                if offsets is None:
                    offsets = torch.arange(span.length, device=device)
                pieces.append(span.start + offsets)
                row_new.append(Span(width, offsets.numel(), span.image))
                width += offsets.numel()
                cursor = span.end
            rows.append(torch.cat(pieces))
            new_spans.append(row_new)
        new_length = max(r.numel() for r in rows)
        src = torch.full((len(rows), new_length), -1, dtype=torch.long, device=device)
        shifted: list[list[Span]] = []
        for b, (row, row_new) in enumerate(zip(rows, new_spans, strict=True)):  # left-pad every row
            pad = new_length - row.numel()
            src[b, pad:] = row
            shifted.append([Span(s.start + pad, s.length, s.image) for s in row_new])
        old = {span.image: span for row in spans for span in row}
        return cls(src=src, spans=shifted, old_spans=old)

    def gather_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Gather position ids of shape (B, T) or (P, B, T) (M-RoPE); 0 on padding."""
        if positions.dim() == 2:
            return self.gather(positions)
        index = self.src.clamp(min=0).expand(positions.shape[0], -1, -1)
        return positions.gather(2, index).masked_fill(~self.valid, 0)

    def gather(self, x: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
        """Gather the new columns from ``x`` of shape (B, T, ...); ``fill`` on padding."""
        index = self.src.clamp(min=0)
        if x.dim() == 2:
            return x.gather(1, index).masked_fill(~self.valid, fill)
        extra = x.shape[2:]
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        out = flat.gather(1, index[..., None].expand(-1, -1, flat.shape[-1]))
        out = out.masked_fill(~self.valid[..., None], fill)
        return out.reshape(out.shape[0], out.shape[1], *extra)

    def compact_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``compact`` positions of the new sequence (SPEC §5), shape (B, T').

        Every surviving token moves back by the image tokens removed before it, and each image's new tokens are
        numbered consecutively in their new order from where the image started. With consecutive positions this is
        the release's renumbering 0..L'-1; with any positions (right padding, tokens appended after padding) it stays
        consistent with decode steps, which subtract the total removed.

        Parameters
        ----------
        positions : LongTensor, shape (B, T)
            Positions of the old sequence.
        """
        batch, length = positions.shape
        # removed[b, j]: image tokens removed by spans that end at or before column j of the old sequence.
        delta = torch.zeros(batch, length + 1, dtype=torch.long, device=positions.device)
        for b, row in enumerate(self.spans):
            for span in row:
                old = self.old_spans[span.image]
                delta[b, old.end] += old.length - span.length
        shifted = positions - delta.cumsum(1)[:, :length]
        new = self.gather(shifted)
        for b, row in enumerate(self.spans):
            for span in row:
                first = shifted[b, self.old_spans[span.image].start]
                new[b, span.start : span.end] = first + torch.arange(span.length, device=new.device)
        return new

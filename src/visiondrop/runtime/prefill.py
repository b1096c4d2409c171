"""A prefill with images: the in-LLM boundaries, and the report of what every stage kept.

Each hooked decoder layer calls :meth:`Prefill.enter_layer`. At a boundary the image tokens are scored with the next
layer's q/k (:class:`~visiondrop.tokens.LLMTokens`), the method selects, and the sequence is rebuilt
``[before ; dominant ; contextual ; after]``; from then on every layer gets the stage's mask, positions and rotary
tables (:class:`~visiondrop.runtime.call.StageState`). Each layer's KV cache keeps the length it had, so later stages
have shorter caches; :meth:`Prefill.cache_record` leaves what decode steps need to address them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import flops, ops
from ..compat import cache_of
from ..layout import Layout
from ..report import ImageReport, Report, SampleReport, StageView, selection_maps
from ..schedule import Stage
from ..tokens import LLMTokens
from . import positions
from .call import CacheRecord, StageRecord, StageState, VisionOutcome
from .checks import check_selection

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Prefill"]


class Prefill:
    """One forward pass whose input holds images: runs the in-LLM boundaries and remembers what they kept."""

    def __init__(self, session: Session, vision: VisionOutcome, kwargs: dict) -> None:
        self.session = session
        self.vision = vision
        self.kwargs_mask = kwargs.get("attention_mask")
        self.cache = cache_of(kwargs)
        self.spans = vision.spans  # where the images are now; every boundary moves them
        real = self.kwargs_mask.sum(1).tolist() if self.kwargs_mask is not None else None
        width = kwargs["input_ids"].shape[1]
        self.text_tokens = [
            (width if real is None else int(real[b])) - sum(s.length for s in row)
            for b, row in enumerate(self.spans)
        ]
        self.sizes = vision.counts  # tokens per image in the current stage
        self.boundaries = sorted({s.layer for sched in vision.schedules for s in sched.boundaries})
        self.state: StageState | None = None
        self.mask2d: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None
        self.initial_length = width  # the sequence every layer before the first boundary sees
        self.stage_records: list[StageRecord] = []
        # Per boundary: layer and per-image (stage, selection or None, n before) for the report.
        self.history: list[tuple[int, dict[int, tuple[Stage, ops.Selection | None, int]]]] = []

    # Called by every hooked layer, in order.
    def enter_layer(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if idx in self.boundaries:
            with self.session.timed("llm_select_s"):
                hidden = self._boundary(idx, hidden, kwargs)
        if self.state is not None:
            kwargs["attention_mask"] = self.state.masks[self.session.text.layer_type(idx)]
            kwargs["position_embeddings"] = self.state.position_embeddings
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = self.state.position_ids
        return hidden

    def _boundary(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        session = self.session
        batch, length, _ = hidden.shape
        device = hidden.device
        if self.state is None:
            # A plain forward without position_ids gets (1, T) positions and rotary tables shared by every row
            # (transformers 5.x); a stage rebuilds rows separately, so give each row its own.
            cos, sin = (t.expand(batch, *t.shape[1:]) for t in kwargs["position_embeddings"])
            old_positions = positions.per_row(kwargs.get("position_ids"), batch)
            if self.kwargs_mask is None:
                mask2d = torch.ones(batch, length, dtype=torch.bool, device=device)
            else:
                mask2d = self.kwargs_mask.bool()
            dropped = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            cos, sin = self.state.position_embeddings
            old_positions, mask2d, dropped = self.positions, self.mask2d, self.dropped

        # Which images prune here, grouped by (tokens now, target) so each group is one batched call. Images whose
        # stage keeps every token are recorded (for the report) but left alone.
        groups: dict[tuple[int, Stage], list[int]] = {}
        decisions: dict[int, tuple[Stage, ops.Selection | None, int]] = {}
        for image, sched in enumerate(self.vision.schedules):
            stage = next((s for s in sched.boundaries if s.layer == idx), None)
            if stage is None:
                continue
            if stage.tokens < self.sizes[image]:
                groups.setdefault((self.sizes[image], stage), []).append(image)
            else:
                decisions[image] = (stage, None, self.sizes[image])
        self.history.append((idx, decisions))
        if not groups:
            return hidden

        span_of = {s.image: (b, s) for b, row in enumerate(self.spans) for s in row}
        last_real = (mask2d.long() * torch.arange(length, device=device)).argmax(dim=1)  # (B,)
        sources: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        for (n, stage), images in groups.items():
            rows = torch.tensor([span_of[i][0] for i in images], device=device)
            starts = torch.tensor([span_of[i][1].start for i in images], device=device)
            # Whole rows: an image query's causal mask hides what follows the image, and a text-guided method's
            # query (the last prompt token) sees the whole row.
            tokens = LLMTokens(
                session.text,
                idx,
                hidden[rows],
                mask2d[rows],
                cos[rows],
                sin[rows],
                starts,
                n,
                last_real[rows],
            )
            selection = session.method.select_llm(tokens, stage)
            check_selection(selection, stage, f"boundary after layer {idx}")
            out = selection.apply(tokens.hidden)  # (I, k, D)
            src = selection.sources()
            for row, image in enumerate(images):
                sources[image] = src[row]
                outputs[image] = out[row]
                decisions[image] = (stage, selection.select(torch.tensor([row], device=device)), n)

        layout = Layout.build(self.spans, mask2d, sources)
        new_hidden = layout.gather(hidden)
        # Every pruned image's outputs (kept and merged) overwrite its new span in one indexed write.
        placed = {s.image: (b, s) for b, row in enumerate(layout.spans) for s in row if s.image in outputs}
        rows = torch.cat([torch.full((placed[i][1].length,), placed[i][0], device=device) for i in outputs])
        cols = torch.cat([torch.arange(placed[i][1].start, placed[i][1].end, device=device) for i in outputs])
        new_hidden[rows, cols] = torch.cat([outputs[i] for i in outputs]).to(new_hidden.dtype)
        new_mask = layout.gather(mask2d, fill=False)
        new_positions = positions.after_layout(layout, old_positions, session.positions)
        rotary = positions.stage_rotary(
            session.text, layout, (cos, sin), new_hidden, new_positions, session.positions
        )
        new_dropped = dropped + mask2d.sum(1) - new_mask.sum(1)

        for image, src in sources.items():
            self.sizes[image] = src.numel()
        self.spans = layout.spans
        self.mask2d, self.positions, self.dropped = new_mask, new_positions, new_dropped
        masks = session.stage_masks(new_hidden, new_mask, self.cache, idx)
        self.state = StageState(masks, rotary, new_positions)
        self.stage_records.append(StageRecord(first_layer=idx, mask=new_mask, dropped=new_dropped))
        return new_hidden

    def release(self) -> None:
        """Drop what only the forward pass needed (the cache, the stage's masks); the report keeps working."""
        self.cache = None
        self.state = None
        self.mask2d = self.positions = self.dropped = None

    def cache_record(self) -> CacheRecord:
        return CacheRecord(
            vision=self.vision, prefill_length=self.initial_length, stages=list(self.stage_records)
        )

    # --- report ---------------------------------------------------------------------------------------------
    def report(self) -> Report:
        session = self.session
        num_layers = session.text.num_layers
        image_rows = self.vision.rows
        samples = [SampleReport(b, []) for b in range(self.vision.batch)]
        for image, out in enumerate(self.vision.images):
            views = [
                StageView(
                    layer=0,
                    tokens=out.stage.tokens,
                    contextual=out.contextual,
                    token_patch=out.token_patch.tolist(),
                    patch_owner=out.patch_owner.tolist(),
                )
            ]
            token_patch, owner = out.token_patch, out.patch_owner
            for layer, decisions in self.history:
                if image not in decisions:
                    continue
                stage, selection, n = decisions[image]
                if selection is not None:
                    old_to_new = selection_maps(selection, n)[0]
                    token_patch = token_patch[selection.sources()[0]]
                    owner = torch.where(owner >= 0, old_to_new[owner.clamp(min=0)], owner)
                views.append(
                    StageView(
                        layer=layer,
                        tokens=stage.tokens,
                        contextual=stage.contextual,
                        token_patch=token_patch.tolist(),
                        patch_owner=owner.tolist(),
                    )
                )
            row = image_rows[image]
            samples[row].images.append(
                ImageReport(
                    sample=row,
                    index=len(samples[row].images),
                    grids=out.info.grids,
                    image_tokens=out.info.tokens,
                    stages=views,
                    num_layers=num_layers,
                    video=out.info.video,
                    frames=out.info.frames,
                )
            )
        schedules = {
            info.tokens: sched.describe()
            for info, sched in zip(self.vision.infos, self.vision.schedules, strict=True)
        }
        return Report(
            method=session.method.name,
            settings=session.method.settings(),
            schedules=schedules,
            samples=samples,
            num_layers=num_layers,
            flops=self._flops(samples),
        )

    def _flops(self, samples: list[SampleReport]) -> dict[str, float] | None:
        """Analytic prefill cost of this call, pruned and unpruned (SPEC §9), summed over the batch."""
        arch = self.session.arch
        if arch is None:
            return None
        outs_by_row: dict[int, list] = {}
        for out, row in zip(self.vision.images, self.vision.rows, strict=True):
            outs_by_row.setdefault(row, []).append(out)
        element = torch.finfo(self.session.dtype).bits // 8
        totals = {"unpruned_tflops": 0.0, "tflops": 0.0, "unpruned_kv_bytes": 0, "kv_bytes": 0}
        for sample in samples:
            outs = outs_by_row.get(sample.sample, [])
            text = self.text_tokens[sample.sample]
            vit = [t for out in outs for t in out.info.vit_tokens]
            full = [sum(out.info.tokens for out in outs)] * arch.num_layers
            pruned = [sum(col) for col in zip(*(im.tokens_per_layer() for im in sample.images), strict=True)]
            pruned = pruned or [0] * arch.num_layers
            cost = flops.prefill_flops(
                arch,
                visual_tokens_per_layer=pruned,
                text_tokens=text,
                vision_tokens=vit,
                projector_tokens=sum(out.projected for out in outs),
            )
            base = flops.prefill_flops(
                arch, visual_tokens_per_layer=full, text_tokens=text, vision_tokens=vit
            )
            totals["tflops"] += cost.tflops
            totals["unpruned_tflops"] += base.tflops
            totals["kv_bytes"] += flops.kv_cache_bytes(arch, [text + v for v in pruned], element)
            totals["unpruned_kv_bytes"] += flops.kv_cache_bytes(arch, [text + v for v in full], element)
        totals["ratio"] = totals["unpruned_tflops"] / totals["tflops"] if totals["tflops"] else float("nan")
        return totals

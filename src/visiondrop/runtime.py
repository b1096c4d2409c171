"""The pruned prefill/decode loop: hooks installed for the duration of ``method.apply(model)``.

How a call runs (SPEC §3–5, DESIGN "Attaching to transformers 5.x"):

- ``generate`` (a per-instance override) runs the vision stage itself, because ``generate()`` sizes its attention
  mask, positions and cache bookkeeping from ``input_ids``: it shrinks each image's placeholder run to the tokens
  that survive, hands the features over as ``mm_encoder_outputs`` and, on return, puts the caller's original prompt
  back in front of the generated tokens. A plain ``model(**inputs)`` call gets the same treatment from a forward
  pre-hook.
- In-LLM stages run from forward pre-hooks on the decoder layers. At a boundary the hook scores the image tokens with
  the next layer's q/k, rebuilds the sequence ``[before ; dominant ; contextual ; after]`` and from then on hands
  every layer the stage's mask, positions and rotary embedding. Each layer's KV cache keeps the length it had at
  prefill, so later stages have shorter caches.
- Decode steps never prune. Each stage's layers get a mask built from the stage's prefill mask plus the new tokens,
  sized against the stage's own cache (``create_causal_mask(..., layer_idx=...)``), and — with ``compact`` positions —
  positions shifted back by the tokens the stage dropped.

Everything is removed on exit, also when the body raises; no attribute is left on the model.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from . import flops, ops
from .compat import cache_of, causal_mask, output_cache
from .layout import Layout, Span, find_image_spans, hf_generate_positions
from .models import get_adapter
from .models.base import ImageInfo, LLMTokens, ModelAdapter, VisionTokens
from .report import ImageReport, Report, SampleReport, StageView, selection_maps
from .schedule import Schedule, Stage

if TYPE_CHECKING:
    from .methods.base import PruningMethod

logger = logging.getLogger(__name__)

__all__ = ["Run", "attach"]

# Models that currently have a method applied (weak, so nothing is attached to the model itself).
_ACTIVE: weakref.WeakSet = weakref.WeakSet()

# transformers 5.23: generate() cache implementations whose layers may hold different lengths. Static caches
# preallocate one length for all layers and cannot; the rest are untested with per-layer lengths.
_DYNAMIC_CACHES = (None, "dynamic", "offloaded")


class Run:
    """What ``method.apply(model)`` yields: the report of the last call made inside the block."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._last: _Prefill | None = None
        self._report: Report | None = None
        #: With ``apply(model, profile=True)``: seconds spent selecting at the vision stage and at in-LLM boundaries
        #: (scoring, merging, rebuilding the sequence), summed over the calls made inside the block.
        self.timings: dict[str, float] = {"vision_select_s": 0.0, "llm_select_s": 0.0}

    @property
    def report(self) -> Report | None:
        """Report of the last call that processed images (None before the first)."""
        if self._report is None and self._last is not None:
            self._report = self._last.report()
        return self._report

    def _record(self, prefill: _Prefill) -> None:
        self._last = prefill
        self._report = None


@contextmanager
def attach(method: PruningMethod, model: torch.nn.Module, *, profile: bool = False) -> Iterator[Run]:
    """Install ``method`` on ``model`` for the duration of the block (see :meth:`PruningMethod.apply`)."""
    adapter = get_adapter(model)
    method.check_model(adapter)
    if model in _ACTIVE:
        raise RuntimeError(
            f"{type(model).__name__} already has a pruning method applied; exit that block first"
        )
    adapter.pool = method.pool  # how the adapter splits videos into pruning units
    session = Session(method, model, adapter, profile=profile)
    session.install()
    _ACTIVE.add(model)
    try:
        yield session.run
    finally:
        session.remove()
        _ACTIVE.discard(model)


# ---------------------------------------------------------------------------------------------------------------
# The vision stage
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _ImageOut:
    """One image after the vision stage."""

    info: ImageInfo
    stage: Stage
    offsets: torch.Tensor  # (k,) place of each surviving token in the original placeholder run (positions)
    token_patch: torch.Tensor  # (k,) grid patch of each surviving token, -1 for [CLS]
    patch_owner: torch.Tensor  # (P,) surviving token that carries each patch, -1 dropped
    contextual: int
    projected: int  # tokens that went through the projector (cost accounting)


@dataclass
class _Vision:
    """The vision stage of one call: per-image outcome and the rewritten inputs."""

    infos: list[ImageInfo]
    images: list[_ImageOut]
    rows: list[int]  # batch row of every image
    batch: int
    changed: bool  # whether the inputs were rewritten (False: every image kept all its tokens)
    orig_ids: torch.Tensor | None = None  # (B, L) the caller's input_ids
    new_ids: torch.Tensor | None = None  # (B, L0)
    new_mask: torch.Tensor | None = None  # (B, L0) or None when no padding at all
    new_positions: torch.Tensor | None = None  # (B, L0) or (P, B, L0) for M-RoPE
    new_aligned: dict[str, torch.Tensor] = field(default_factory=dict)  # other per-token inputs, shrunk alike

    @property
    def counts(self) -> list[int]:
        return [im.stage.tokens for im in self.images]

    def expanded(self, factor: int) -> _Vision:
        """The same outcome for a batch whose rows ``generate()`` repeated ``factor`` times (beams, samples)."""
        if factor == 1:
            return self
        by_row = [[i for i, r in enumerate(self.rows) if r == b] for b in range(self.batch)]
        order = [i for b in range(self.batch) for _ in range(factor) for i in by_row[b]]
        rows = [b * factor + r for b in range(self.batch) for r in range(factor) for _ in by_row[b]]

        def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(factor, dim=0)

        return _Vision(
            infos=[self.infos[i] for i in order],
            images=[self.images[i] for i in order],
            rows=rows,
            batch=self.batch * factor,
            changed=self.changed,
            orig_ids=repeat(self.orig_ids),
            new_ids=repeat(self.new_ids),
            new_mask=repeat(self.new_mask),
            new_positions=None
            if self.new_positions is None
            else self.new_positions.repeat_interleave(factor, dim=self.new_positions.dim() - 2),
            new_aligned={k: repeat(v) for k, v in self.new_aligned.items()},
        )


def _identity_image(info: ImageInfo, device: torch.device) -> _ImageOut:
    token_patch = torch.tensor(info.placeholder_patches(), dtype=torch.long, device=device)
    owner = torch.full((info.num_patches,), -1, dtype=torch.long, device=device)
    carried = token_patch >= 0
    owner[token_patch[carried]] = torch.nonzero(carried).flatten()
    return _ImageOut(
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
) -> _ImageOut:
    sources = selection.sources()[row]
    token_patch = tokens.patch_index[sources]
    owner_of_token = selection_maps(
        selection.select(torch.tensor([row], device=sources.device)), tokens.num_tokens
    )[0]
    patch_owner = torch.full((info.num_patches,), -1, dtype=torch.long, device=sources.device)
    is_patch = tokens.patch_index >= 0
    patch_owner[tokens.patch_index[is_patch]] = owner_of_token[is_patch]
    return _ImageOut(
        info=info,
        stage=stage,
        offsets=tokens.placeholder_offset[sources],
        token_patch=token_patch,
        patch_owner=patch_owner,
        contextual=selection.num_merged,
        projected=tokens.num_tokens if selection.space == "projected" else selection.num_out,
    )


# ---------------------------------------------------------------------------------------------------------------
# In-LLM stages
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _StageState:
    """What every layer of an in-LLM stage receives instead of the model's own arguments."""

    masks: dict[str, Any]  # layer type -> 4-D mask (or None / 2-D for attention kinds that take those)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor | None


@dataclass
class _StageRecord:
    """One in-LLM stage, kept with the cache so that decode steps can address its layers."""

    first_layer: int
    mask: torch.Tensor  # (B, L_s) bool, the stage's prefill mask
    dropped: torch.Tensor  # (B,) real tokens removed by in-LLM stages up to this one


@dataclass
class _CacheRecord:
    """What a pruned prefill leaves for later calls on the same cache."""

    vision: _Vision | None
    prefill_length: int  # layer-0 cache length after the prefill
    stages: list[_StageRecord] = field(default_factory=list)

    def stage_of(self, layer_idx: int) -> _StageRecord | None:
        found = None
        for stage in self.stages:
            if stage.first_layer <= layer_idx:
                found = stage
        return found


class Session:
    """The hooks of one ``apply`` block and the per-call state they share."""

    def __init__(
        self, method: PruningMethod, model: torch.nn.Module, adapter: ModelAdapter, *, profile: bool = False
    ) -> None:
        self.method = method
        self.profile = profile
        #: The position policy in force: the method's, with "auto" resolved for this model family.
        self.positions = method.position_policy(adapter)
        self.model = model
        self.adapter = adapter
        self.text = adapter.text
        self.run = Run(self)
        self.records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.current: _Prefill | _Decode | None = None
        self.pending: _Vision | None = None
        self._handles: list[Any] = []
        self._schedules: dict[tuple[int, tuple], Schedule] = {}
        # A per-instance generate set by someone else (accelerate-style wrappers) is put back on exit.
        self._had_generate = "generate" in model.__dict__
        self._saved_generate: Any = model.__dict__.get("generate")
        self._generating = self._reported = False
        #: False once the block exits: a ``generate`` reference taken inside the block then calls the model's own.
        self.active = False
        # One call at a time: the thread whose call is in flight (None: none), and whether the top-level forward
        # (not generate) claimed it. Hooks are per module, so a second thread would share this call's state.
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._forward_claimed = False
        self.dtype = next(model.parameters()).dtype
        self._forward_signature = inspect.signature(model.forward)
        self._generate_signature = inspect.signature(model.generate)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the wall time of the block to ``run.timings[key]`` when profiling (synchronising CUDA around it)."""
        if not self.profile:
            yield
            return
        cuda = torch.cuda.is_available() and next(self.model.parameters()).is_cuda
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            self.run.timings[key] += time.perf_counter() - start

    @cached_property
    def arch(self) -> flops.ArchSpec | None:
        """Dimensions for the cost accounting; None for configs the accounting does not know."""
        try:
            return flops.ArchSpec.from_config(self.model.config)
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            logger.info("no FLOPs in the report: %s", err)
            return None

    # --- install / remove -----------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        try:
            self._handles.append(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(
                model.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True)
            )
            first = self.method.first_boundary(self.text.num_layers)
            if first is not None:
                for idx in range(first, self.text.num_layers):
                    hook = self._layer_hook(idx)
                    self._handles.append(
                        self.text.layers[idx].register_forward_pre_hook(hook, with_kwargs=True)
                    )
            original = model.generate
            session = self

            def generate(*args: Any, **kwargs: Any) -> Any:
                if not session.active:  # a reference kept past the block: behave as the model does now
                    return model.generate(*args, **kwargs)
                return session.generate(original, *args, **kwargs)

            generate.__doc__ = original.__doc__
            model.generate = generate
            self.active = True
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        self.active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if "generate" in self.model.__dict__:
            del self.model.__dict__["generate"]
        if self._had_generate:
            self.model.__dict__["generate"] = self._saved_generate
        self.current = None
        self.pending = None
        if self.run._last is not None:  # the report outlives the block; the call's cache and tensors need not
            self.run._last.release()

    # --- one call at a time ---------------------------------------------------------------------------------
    def _claim(self) -> bool:
        """Make the calling thread the owner of the call in flight; True when this claim is the outermost one.

        RuntimeError when another thread's call is in flight: the hooks sit on the shared modules, so two
        overlapping calls would mix their per-call state (and a caller that wanted the unpruned model gets a pruned
        one anyway while the block is open).
        """
        me = threading.get_ident()
        with self._lock:
            if self._owner is not None and self._owner != me:
                raise RuntimeError(
                    f"{type(self.model).__name__} is pruned by visiondrop and already running a call in another "
                    "thread; calls on a model inside apply() must not overlap (use one model per thread)"
                )
            outer = self._owner is None
            self._owner = me
        return outer

    def _release(self) -> None:
        with self._lock:
            self._owner = None

    def _check_thread(self) -> None:
        owner = self._owner
        if owner is not None and owner != threading.get_ident():
            self._claim()  # raises

    # --- schedules ------------------------------------------------------------------------------------------
    def schedule(self, info: ImageInfo) -> Schedule:
        key = (info.tokens, info.grids, len(info.frames))
        if key not in self._schedules:
            method = self.method.for_unit(info)  # a whole video (pool="video"): budget x frames
            schedule = method.schedule(info.tokens, self.text.num_layers, info.grids or None)
            self.adapter.check_schedule(schedule)
            self._schedules[key] = schedule
        return self._schedules[key]

    # --- checks ---------------------------------------------------------------------------------------------
    def _check_forward_kwargs(self, kwargs: dict) -> None:
        self.adapter.check_call(kwargs)
        if kwargs.get("labels") is not None:
            raise ValueError(
                "labels: training or loss computation with pruned tokens is out of scope of visiondrop"
            )
        cache = cache_of(kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"past_key_values={type(cache).__name__}: a static cache cannot hold the shorter per-layer lengths "
                "of pruned stages; use a DynamicCache"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)}: visiondrop needs a 2-D padding mask"
            )
        has_images = self.adapter.has_visual(kwargs)
        if has_images and kwargs.get("input_ids") is None:
            raise ValueError(
                "inputs_embeds with images: visiondrop needs input_ids to find the <image> placeholders"
            )

    def _check_generate_kwargs(self, kwargs: dict) -> None:
        config = kwargs.get("generation_config") or self.model.generation_config
        implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if implementation not in _DYNAMIC_CACHES:
            raise ValueError(
                f"cache_implementation={implementation!r}: pruned stages give layers different cache lengths, which "
                f"only a dynamic cache holds; use one of {[c for c in _DYNAMIC_CACHES if c]}"
            )
        chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if chunk is not None:
            raise ValueError(
                f"prefill_chunk_size={chunk}: pruning needs the whole prompt in one prefill; pass prefill_chunk_size=None"
            )
        for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            value = kwargs.get(name, getattr(config, name, None))
            if value is not None:
                raise ValueError(
                    f"{name}={_short(value)}: assisted decoding crops the cache to one length, which pruned layers do "
                    "not share"
                )
        self._check_forward_kwargs(kwargs)

    # --- the vision stage -----------------------------------------------------------------------------------
    def vision_stage(self, kwargs: dict, *, generate: bool) -> _Vision:
        """Run the vision stage on the call's images and rewrite ``kwargs`` in place when tokens were removed."""
        adapter = self.adapter
        input_ids = kwargs["input_ids"]
        infos = adapter.image_infos(kwargs)
        spans = find_image_spans(input_ids, adapter.placeholder_ids(infos), [i.tokens for i in infos])
        device = input_ids.device
        for info in infos:
            self.method.for_unit(info)  # raises when the budget does not fit the image (or a video's frame)
        stages = [self.schedule(info).vision for info in infos]
        rows = [b for b, row in enumerate(spans) for _ in row]
        batch = input_ids.shape[0]
        if all(stage.tokens == info.tokens for stage, info in zip(stages, infos, strict=True)):
            return _Vision(
                infos, [_identity_image(info, device) for info in infos], rows, batch, changed=False
            )

        outs: list[_ImageOut | None] = [None] * len(infos)
        features: list[torch.Tensor | None] = [None] * len(infos)
        for images, tokens in adapter.encode(kwargs):
            stage = stages[images[0]]
            info = infos[images[0]]
            if stage.tokens == info.tokens:
                selection = None
            else:
                with self.timed("vision_select_s"):
                    selection = self.method.select_vision(tokens, stage)
                _check_selection(selection, stage, "vision stage")
            feats = adapter.features(tokens, selection)
            for row, image in enumerate(images):
                features[image] = feats[row]
                if selection is None:
                    outs[image] = _identity_image(infos[image], device)
                else:
                    outs[image] = _image_out(infos[image], stage, tokens, row, selection)

        with self.timed("vision_select_s"):
            return self._shrink_inputs(kwargs, spans, infos, outs, features, rows, generate=generate)

    def _shrink_inputs(
        self,
        kwargs: dict,
        spans: list[list[Span]],
        infos: list[ImageInfo],
        outs: list[_ImageOut],
        features: list[torch.Tensor],
        rows: list[int],
        *,
        generate: bool,
    ) -> _Vision:
        """Replace every image's placeholder run in ``kwargs`` by its surviving tokens; positions per the policy."""
        adapter = self.adapter
        input_ids = kwargs["input_ids"]
        device = input_ids.device
        mask = kwargs.get("attention_mask")
        full_mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        layout = Layout.build(spans, full_mask, {i: out.offsets for i, out in enumerate(outs)})
        new_ids = layout.gather(input_ids, fill=_pad_id(self.model.config))
        new_mask_bool = layout.gather(full_mask, fill=False)
        positions = adapter.positions(kwargs, generate=generate)
        if positions is None and kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"]
        elif positions is None and generate:
            positions = hf_generate_positions(mask, *input_ids.shape, device)
        elif positions is None:
            positions = torch.arange(input_ids.shape[1], device=device).expand(input_ids.shape[0], -1)
        if self.positions == "preserve":
            new_positions = layout.gather_positions(positions)
        else:
            new_positions = layout.compact_positions(positions)
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
        return _Vision(
            infos,
            outs,
            rows,
            input_ids.shape[0],
            changed=True,
            orig_ids=input_ids,
            new_ids=new_ids,
            new_mask=new_mask,
            new_positions=new_positions,
            new_aligned=aligned,
        )

    # --- generate -------------------------------------------------------------------------------------------
    def generate(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        outer = self._claim()
        try:
            return self._generate(original, *args, **kwargs)
        finally:
            if outer:
                self._release()

    def _generate(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        bound = self._generate_signature.bind_partial(*args, **kwargs)
        kwargs = dict(bound.arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
        if kwargs.get("inputs") is not None:
            if kwargs.get("input_ids") is not None:
                raise ValueError("pass the prompt once, as inputs or as input_ids, not both")
            kwargs["input_ids"] = kwargs.pop("inputs")
        kwargs.pop("inputs", None)
        self._check_generate_kwargs(kwargs)

        caller_ids = kwargs.get("input_ids")
        cache = cache_of(kwargs)
        record = self.records.get(cache) if cache is not None else None
        has_images = self.adapter.has_visual(kwargs)
        vision = None
        if record is not None:
            if has_images:
                raise ValueError(
                    "a new image in a conversation continued from a pruned cache is not supported; start a new "
                    "generate() without past_key_values"
                )
            if record.vision is not None and record.vision.changed:
                self._continue_prompt(kwargs, record.vision)
        elif has_images:
            vision = self.vision_stage(kwargs, generate=True)
        self.pending = vision
        self._generating, self._reported = True, False
        if (
            kwargs.get("streamer") is not None
            and caller_ids is not None
            and kwargs.get("input_ids") is not caller_ids
        ):
            kwargs["streamer"] = _CallerPromptStreamer(kwargs["streamer"], caller_ids)
        try:
            out = original(**kwargs)
        finally:
            self.pending = None
            self._generating = False
        if caller_ids is not None and kwargs.get("input_ids") is not caller_ids:
            out = _restore_prompt(out, caller_ids, kwargs["input_ids"].shape[1])
        return out

    def _continue_prompt(self, kwargs: dict, vision: _Vision) -> None:
        """Translate a continued conversation (previous prompt + answer + new turn) to the pruned prefix.

        The tokens after the prompt continue from the prompt's last position, one step per real token (on every
        axis of M-RoPE positions), exactly as the decode steps that produced the answer did.
        """
        ids = kwargs.get("input_ids")
        old = vision.orig_ids
        if ids is None or ids.shape[0] != old.shape[0] or ids.shape[1] < old.shape[1]:
            raise ValueError(
                "input_ids do not continue the pruned conversation held in past_key_values "
                f"(expected {tuple(old.shape)} prompt tokens first, got {None if ids is None else tuple(ids.shape)})"
            )
        if not torch.equal(ids[:, : old.shape[1]], old):
            raise ValueError("input_ids do not start with the prompt that filled past_key_values")
        prefix = old.shape[1]
        mask = kwargs.get("attention_mask")
        full = torch.ones_like(ids) if mask is None else mask
        tail = full[:, prefix:]
        old_mask = vision.new_mask if vision.new_mask is not None else torch.ones_like(vision.new_ids)
        kwargs["input_ids"] = torch.cat([vision.new_ids, ids[:, prefix:]], dim=1)
        kwargs["attention_mask"] = torch.cat([old_mask.to(full.dtype), tail], dim=1)
        steps = tail.long().cumsum(-1)
        last = vision.new_positions[..., -1:]
        kwargs["position_ids"] = torch.cat([vision.new_positions, last + steps], dim=-1)
        for key, value in vision.new_aligned.items():
            if kwargs.get(key) is not None:
                kwargs[key] = torch.cat([value, kwargs[key][:, prefix:]], dim=1)

    # --- hooks ----------------------------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        outer = self._claim()
        self._forward_claimed = outer
        try:
            return self._prepare_forward(args, kwargs)
        except BaseException:
            self.current = None
            if outer:
                self._forward_claimed = False
                self._release()
            raise

    def _prepare_forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            bound = self._forward_signature.bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
        self._check_forward_kwargs(kwargs)
        cache = cache_of(kwargs)
        record = self.records.get(cache) if cache is not None else None
        has_images = self.adapter.has_visual(kwargs)
        vision: _Vision | None = None
        if has_images:
            if record is not None or (cache is not None and cache.get_seq_length() > 0):
                raise ValueError(
                    "images with a pre-filled past_key_values are not supported: the image tokens must be scored "
                    "in one prefill"
                )
            vision = self.vision_stage(kwargs, generate=False)
        elif kwargs.get("mm_encoder_outputs") is not None and any(
            v is not None for v in kwargs["mm_encoder_outputs"].values()
        ):
            rows = _batch_size(kwargs)
            if self.pending is not None:
                vision = self.pending.expanded(rows // self.pending.batch)
            else:  # features the caller encoded: no vision stage, in-LLM stages only
                vision = self._encoded_by_caller(kwargs)
        if (
            record is not None
            and not self._generating
            and record.vision is not None
            and record.vision.changed
        ):
            _translate_manual_step(kwargs, record.vision, cache)
        if (vision is not None or record is not None) and kwargs.get("attention_mask") is None:
            _explicit_mask(kwargs, cache)
        if vision is not None:
            self.current = _Prefill(self, vision, kwargs)
        elif record is not None:
            self.current = _Decode(self, record, kwargs)
        else:
            self.current = None
        return (), kwargs

    def _encoded_by_caller(self, kwargs: dict) -> _Vision:
        if kwargs["mm_encoder_outputs"].get("video") is not None:
            raise ValueError(
                "mm_encoder_outputs['video']: videos must come as pixel_values_videos, so that visiondrop splits "
                "them into frames; video features encoded by the caller are not supported"
            )
        feats = kwargs["mm_encoder_outputs"]["image"].pooler_output
        infos = [ImageInfo(f.shape[0]) for f in feats]
        spans = find_image_spans(kwargs["input_ids"], self.adapter.image_token_id, [i.tokens for i in infos])
        rows = [b for b, row in enumerate(spans) for _ in row]
        images = [_identity_image(info, f.device) for info, f in zip(infos, feats, strict=True)]
        return _Vision(infos, images, rows, len(spans), changed=False)

    def _post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._owner != threading.get_ident():  # a call this session refused (another thread's)
            return
        if self._forward_claimed:
            self._forward_claimed = False
            self._release()
        current, self.current = self.current, None
        if not isinstance(current, _Prefill) or output is None:
            return
        cache = output_cache(output)
        if cache is not None:
            self.records[cache] = current.cache_record()
        current.release()
        # Inside generate() the report describes the prompt's prefill, not the later steps that
        # generate(use_cache=False) runs as prefills too.
        if not (self._generating and self._reported):
            self.run._record(current)
            self._reported = True

    def _layer_hook(self, idx: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            self._check_thread()
            current = self.current
            if current is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            hidden = current.enter_layer(idx, hidden, kwargs)
            return (hidden, *args[1:]), kwargs

        return hook

    # --- masks ----------------------------------------------------------------------------------------------
    def stage_masks(
        self, hidden: torch.Tensor, mask2d: torch.Tensor, cache: Any, layer_idx: int
    ) -> dict[str, Any]:
        """4-D masks (per attention kind) for a stage's layers, sized against layer ``layer_idx``'s cache."""
        masks = {}
        config = self.text.config
        for kind in {self.text.layer_type(i) for i in range(layer_idx, self.text.num_layers)}:
            masks[kind] = causal_mask(
                kind == "sliding_attention",
                config=config,
                inputs_embeds=hidden,
                attention_mask=mask2d,
                cache=cache,
                position_ids=None,
                layer_idx=layer_idx,
            )
        return masks


def _check_selection(selection: ops.Selection, stage: Stage, where: str) -> None:
    if selection.num_kept != stage.dominant or selection.num_merged != stage.contextual:
        raise RuntimeError(
            f"{where}: method returned {selection.num_kept}+{selection.num_merged} tokens, schedule says {stage}"
        )


def _translate_manual_step(kwargs: dict, vision: _Vision, cache: Any) -> None:
    """A forward call continuing a pruned prefill by hand (outside ``generate``), e.g. a decode loop.

    The caller builds its mask for the unpruned prompt; the cache holds the pruned one. Mask columns of the pruned
    prompt are swapped for the pruned prompt's, and missing positions continue from the prompt's last position as
    ``generate()`` would make them.
    """
    ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    query = ids.shape[1]
    past = cache.get_seq_length()
    pruned, original = vision.new_ids.shape[1], vision.orig_ids.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[1] == past + query + original - pruned:
        head = vision.new_mask if vision.new_mask is not None else torch.ones_like(vision.new_ids)
        mask = torch.cat([head.to(mask.dtype), mask[:, original:]], dim=1)
        kwargs["attention_mask"] = mask
    if kwargs.get("position_ids") is None:
        full = (
            mask
            if mask is not None
            else torch.ones(ids.shape[0], past + query, dtype=torch.long, device=ids.device)
        )
        steps = full[:, pruned:].long().cumsum(-1)[:, -query:]
        kwargs["position_ids"] = vision.new_positions[..., -1:] + steps


def _explicit_mask(kwargs: dict, cache: Any) -> None:
    """Give the model an all-ones 2-D mask where it had none.

    transformers 5.x reads positions that do not grow by exactly 1 as packed sequences when no mask (and no cache) is
    given, and would then block attention across the gaps that pruning leaves in ``preserve`` positions.
    """
    tensor = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    past = cache.get_seq_length() if cache is not None else 0
    kwargs["attention_mask"] = torch.ones(
        tensor.shape[0], past + tensor.shape[1], dtype=torch.long, device=tensor.device
    )


def _batch_size(kwargs: dict) -> int:
    tensor = kwargs.get("input_ids")
    return (tensor if tensor is not None else kwargs["inputs_embeds"]).shape[0]


def _pad_id(config: Any) -> int:
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if value is not None:
            return int(value)
    return 0


class _CallerPromptStreamer:
    """A streamer wrapper that shows the caller's prompt ids in place of the pruned ones ``generate()`` puts first."""

    def __init__(self, streamer: Any, prompt: torch.Tensor) -> None:
        self._streamer = streamer
        self._prompt: torch.Tensor | None = prompt

    def put(self, value: torch.Tensor) -> None:
        if self._prompt is not None:  # generate() puts the whole prompt once, before any generated token
            value, self._prompt = self._prompt.to(value.device), None
        self._streamer.put(value)

    def end(self) -> None:
        self._streamer.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._streamer, name)


def _restore_prompt(out: Any, caller_ids: torch.Tensor, pruned_length: int) -> Any:
    """Put the caller's prompt back in front of the generated tokens of ``generate()``'s output."""

    def fix(sequences: torch.Tensor) -> torch.Tensor:
        repeat = sequences.shape[0] // caller_ids.shape[0]
        prompt = caller_ids.repeat_interleave(repeat, dim=0).to(sequences.device)
        return torch.cat([prompt, sequences[:, pruned_length:]], dim=1)

    if isinstance(out, torch.Tensor):
        return fix(out)
    if getattr(out, "sequences", None) is not None:
        out.sequences = fix(out.sequences)
    return out


class _Prefill:
    """One forward call whose input holds images: runs the in-LLM boundaries and remembers what they kept."""

    def __init__(self, session: Session, vision: _Vision, kwargs: dict) -> None:
        self.session = session
        self.vision = vision
        self.kwargs_mask = kwargs.get("attention_mask")
        self.cache = cache_of(kwargs)
        self.spans = find_image_spans(
            kwargs["input_ids"], session.adapter.placeholder_ids(vision.infos), vision.counts
        )
        self.spans0 = self.spans
        self.image_rows = {s.image: b for b, row in enumerate(self.spans) for s in row}
        real = kwargs["attention_mask"].sum(1).tolist() if kwargs.get("attention_mask") is not None else None
        width = kwargs["input_ids"].shape[1]
        self.text_tokens = [
            (width if real is None else int(real[b])) - sum(s.length for s in row)
            for b, row in enumerate(self.spans)
        ]
        self.sizes = [im.stage.tokens for im in vision.images]  # tokens per image in the current stage
        self.schedules = [session.schedule(info) for info in vision.infos]
        self.boundaries = sorted({s.layer for sched in self.schedules for s in sched.boundaries})
        self.state: _StageState | None = None
        self.mask2d: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None
        self.initial_length = width  # the sequence every layer before the first boundary sees
        self.stage_records: list[_StageRecord] = []
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
            positions = kwargs.get("position_ids")
            if positions is not None and positions.shape[-2] != batch:
                positions = positions.expand(*positions.shape[:-2], batch, positions.shape[-1])
            if self.kwargs_mask is None:
                mask2d = torch.ones(batch, length, dtype=torch.bool, device=device)
            else:
                mask2d = self.kwargs_mask.bool()
            dropped = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            cos, sin = self.state.position_embeddings
            positions, mask2d, dropped = self.positions, self.mask2d, self.dropped

        # Which images prune here, grouped by (tokens now, target) so each group is one batched call. Images whose
        # stage keeps every token are recorded (for the report) but left alone.
        groups: dict[tuple[int, Stage], list[int]] = {}
        decisions: dict[int, tuple[Stage, ops.Selection | None, int]] = {}
        for image, sched in enumerate(self.schedules):
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
            _check_selection(selection, stage, f"boundary after layer {idx}")
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
        if session.positions == "preserve":
            new_cos, new_sin = layout.gather(cos), layout.gather(sin)
            new_positions = None if positions is None else layout.gather_positions(positions)
        else:
            new_positions = layout.compact_positions(positions)
            new_cos, new_sin = session.text.rotary_emb(new_hidden, new_positions)
        new_dropped = dropped + mask2d.sum(1) - new_mask.sum(1)

        for image, src in sources.items():
            self.sizes[image] = src.numel()
        self.spans = layout.spans
        self.mask2d, self.positions, self.dropped = new_mask, new_positions, new_dropped
        masks = session.stage_masks(new_hidden, new_mask, self.cache, idx)
        self.state = _StageState(masks, (new_cos, new_sin), new_positions)
        self.stage_records.append(_StageRecord(first_layer=idx, mask=new_mask, dropped=new_dropped))
        return new_hidden

    def release(self) -> None:
        """Drop what only the forward pass needed (the cache, the stage's masks); the report keeps working."""
        self.cache = None
        self.state = None
        self.mask2d = self.positions = self.dropped = None

    def cache_record(self) -> _CacheRecord:
        return _CacheRecord(
            vision=self.vision, prefill_length=self.initial_length, stages=list(self.stage_records)
        )

    # --- report ---------------------------------------------------------------------------------------------
    def report(self) -> Report:
        session = self.session
        num_layers = session.text.num_layers
        image_rows = self.image_rows
        batch = len(self.spans0)
        samples = [SampleReport(b, []) for b in range(batch)]
        for image, out in enumerate(self.vision.images):
            info = out.info
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
                    grids=info.grids,
                    image_tokens=info.tokens,
                    stages=views,
                    num_layers=num_layers,
                    video=info.video,
                    frames=info.frames,
                )
            )
        schedules = {info.tokens: session.schedule(info).describe() for info in self.vision.infos}
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
        outs_by_row: dict[int, list[_ImageOut]] = {}
        for image, out in enumerate(self.vision.images):
            outs_by_row.setdefault(self.image_rows[image], []).append(out)
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


class _Decode:
    """A forward call on a cache filled by a pruned prefill: decode steps or a continued conversation."""

    def __init__(self, session: Session, record: _CacheRecord, kwargs: dict) -> None:
        self.session = session
        self.record = record
        self.cache = cache_of(kwargs)
        ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        query = (ids if ids is not None else embeds).shape[1]
        batch = (ids if ids is not None else embeds).shape[0]
        device = (ids if ids is not None else embeds).device
        past = self.cache.get_seq_length()
        mask = kwargs.get("attention_mask")
        if mask is None:
            self.tail = torch.ones(
                batch, past + query - record.prefill_length, dtype=torch.bool, device=device
            )
        else:
            self.tail = mask[:, record.prefill_length :].bool()
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(query, device=device) + past).expand(batch, -1)
        self.positions = positions
        self.states: dict[int, _StageState] = {}

    def enter_layer(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        stage = self.record.stage_of(idx)
        if stage is None:
            return hidden
        state = self.states.get(stage.first_layer)
        if state is None:
            state = self._state(stage, hidden, kwargs)
            self.states[stage.first_layer] = state
        kwargs["attention_mask"] = state.masks[self.session.text.layer_type(idx)]
        kwargs["position_embeddings"] = state.position_embeddings
        if kwargs.get("position_ids") is not None and state.position_ids is not None:
            kwargs["position_ids"] = state.position_ids
        return hidden

    def _state(self, stage: _StageRecord, hidden: torch.Tensor, kwargs: dict) -> _StageState:
        session = self.session
        mask2d = torch.cat([stage.mask, self.tail], dim=1)
        if session.positions == "compact" and self.positions.dim() == 2:
            positions = self.positions - stage.dropped[:, None]
            cos_sin = session.text.rotary_emb(hidden, positions)
        else:
            positions = kwargs.get("position_ids")
            cos_sin = kwargs["position_embeddings"]
        masks = session.stage_masks(hidden, mask2d, self.cache, stage.first_layer)
        return _StageState(masks, cos_sin, positions)


def _short(value: Any) -> str:
    """``repr`` of a plain value; a model or other object by its type alone (its repr can run to many lines)."""
    return repr(value) if isinstance(value, (int, float, str, bool)) else f"<{type(value).__name__}>"

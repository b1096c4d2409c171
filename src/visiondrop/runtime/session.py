"""One ``apply`` block: the hooks it installs and removes, and the entry points of every call made inside it.

``generate`` (a per-instance override) runs the vision stage itself, because ``generate()`` sizes its attention mask,
positions and cache bookkeeping from ``input_ids``: it shrinks each image's placeholder run to the tokens that
survive, hands the features over as ``mm_encoder_outputs`` and, on return, puts the caller's original prompt back
in front of the generated tokens. A plain ``model(**inputs)`` call gets the same treatment from a forward pre-hook.
Each call is one :class:`~visiondrop.runtime.call.Call`, the only per-call state the session holds.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .. import flops
from ..compat import cache_of, causal_mask, output_cache
from ..models import get_adapter
from ..models.base import ModelAdapter
from ..report import Report
from ..schedule import Schedule
from ..tokens import ImageInfo
from . import vision as vision_stage
from .call import Call
from .checks import check_forward_kwargs, check_generate_kwargs
from .decode import (
    CallerPromptStreamer,
    Decode,
    continue_prompt,
    explicit_mask,
    restore_prompt,
    translate_manual_step,
)
from .prefill import Prefill

if TYPE_CHECKING:
    from ..methods.base import PruningMethod

logger = logging.getLogger(__name__)

__all__ = ["Run", "Session", "attach"]

# Models that currently have a method applied (weak, so nothing is attached to the model itself).
_ACTIVE: weakref.WeakSet = weakref.WeakSet()


class Run:
    """What ``method.apply(model)`` yields: the report of the last call made inside the block."""

    def __init__(self) -> None:
        self._last: Prefill | None = None
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

    def _record(self, prefill: Prefill) -> None:
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


class Session:
    """The hooks of one ``apply`` block."""

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
        self.run = Run()
        #: The call in flight (None between calls).
        self.call: Call | None = None
        #: What each pruned prefill left, by the cache it filled: it serves later calls on that cache (decode
        #: steps, a continued conversation) and lives as long as the cache does, not as long as a call.
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._handles: list[Any] = []
        self._schedules: dict[tuple[int, tuple], Schedule] = {}
        # A per-instance generate set by someone else (accelerate-style wrappers) is put back on exit.
        self._had_generate = "generate" in model.__dict__
        self._saved_generate: Any = model.__dict__.get("generate")
        #: False once the block exits: a ``generate`` reference taken inside the block then calls the model's own.
        self.active = False
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

    def schedule(self, info: ImageInfo) -> Schedule:
        """The method's per-stage counts for one image (cached per image shape), checked by the family."""
        key = (info.tokens, info.grids, len(info.frames))
        if key not in self._schedules:
            method = self.method.for_unit(info)  # a whole video (pool="video"): budget x frames
            schedule = method.schedule(info.tokens, self.text.num_layers, info.grids or None)
            self.adapter.check_schedule(schedule)
            self._schedules[key] = schedule
        return self._schedules[key]

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
        self.call = None
        if self.run._last is not None:  # the report outlives the block; the call's cache and tensors need not
            self.run._last.release()

    # --- one call at a time ---------------------------------------------------------------------------------
    def _begin(self, *, generate: bool) -> Call:
        """Start a call on this thread (inside the call in flight when this thread made that one).

        RuntimeError when another thread's call is in flight: the hooks sit on the shared modules, so two
        overlapping calls would mix their state (and a caller that wanted the unpruned model would get a pruned one
        anyway while the block is open).
        """
        me = threading.get_ident()
        with self._lock:
            outer = self.call
            if outer is not None and outer.thread != me:
                raise RuntimeError(
                    f"{type(self.model).__name__} is pruned by visiondrop and already running a call in another "
                    "thread; calls on a model inside apply() must not overlap (use one model per thread)"
                )
            self.call = Call(generate=generate, thread=me, outer=outer)
            return self.call

    def _end(self, call: Call) -> None:
        with self._lock:
            if self.call is call:
                self.call = call.outer

    def _own_call(self) -> Call | None:
        """The call in flight when this thread made it; RuntimeError when another thread's is."""
        call = self.call
        if call is not None and call.thread != threading.get_ident():
            self._begin(generate=False)  # raises
        return call

    # --- generate -------------------------------------------------------------------------------------------
    def generate(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        call = self._begin(generate=True)
        try:
            return self._generate(call, original, *args, **kwargs)
        finally:
            self._end(call)

    def _generate(self, call: Call, original: Any, *args: Any, **kwargs: Any) -> Any:
        bound = self._generate_signature.bind_partial(*args, **kwargs)
        kwargs = dict(bound.arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
        if kwargs.get("inputs") is not None:
            if kwargs.get("input_ids") is not None:
                raise ValueError("pass the prompt once, as inputs or as input_ids, not both")
            kwargs["input_ids"] = kwargs.pop("inputs")
        kwargs.pop("inputs", None)
        check_generate_kwargs(self.model, self.adapter, kwargs)

        caller_ids = kwargs.get("input_ids")
        cache = cache_of(kwargs)
        record = self.caches.get(cache) if cache is not None else None
        has_images = self.adapter.has_visual(kwargs)
        if record is not None:
            if has_images:
                raise ValueError(
                    "a new image in a conversation continued from a pruned cache is not supported; start a new "
                    "generate() without past_key_values"
                )
            if record.vision is not None and record.vision.changed:
                continue_prompt(kwargs, record.vision)
        elif has_images:
            call.vision = vision_stage.run(self, kwargs, generate=True)
        if (
            kwargs.get("streamer") is not None
            and caller_ids is not None
            and kwargs.get("input_ids") is not caller_ids
        ):
            kwargs["streamer"] = CallerPromptStreamer(kwargs["streamer"], caller_ids)
        out = original(**kwargs)
        if caller_ids is not None and kwargs.get("input_ids") is not caller_ids:
            out = restore_prompt(out, caller_ids, kwargs["input_ids"].shape[1])
        return out

    # --- hooks ----------------------------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = self._own_call()
        if call is None:
            call = self._begin(generate=False)
        call.passes += 1
        try:
            return self._prepare_forward(call, args, kwargs)
        except Exception:
            call.step = None  # the forward hook still runs (always_call) and ends the pass
            raise
        except BaseException:  # no forward hook runs after these
            call.step = None
            self._end_pass(call)
            raise

    def _prepare_forward(self, call: Call, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            bound = self._forward_signature.bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
        check_forward_kwargs(self.adapter, kwargs)
        cache = cache_of(kwargs)
        record = self.caches.get(cache) if cache is not None else None
        vision = None
        if self.adapter.has_visual(kwargs):
            if record is not None or (cache is not None and cache.get_seq_length() > 0):
                raise ValueError(
                    "images with a pre-filled past_key_values are not supported: the image tokens must be scored "
                    "in one prefill"
                )
            vision = vision_stage.run(self, kwargs, generate=False)
        elif kwargs.get("mm_encoder_outputs") is not None and any(
            v is not None for v in kwargs["mm_encoder_outputs"].values()
        ):
            if call.vision is not None:  # generate()'s prompt, its rows maybe repeated (beams, samples)
                rows = (
                    kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
                ).shape[0]
                vision = call.vision.expanded(rows // call.vision.batch)
            else:  # features the caller encoded: no vision stage, in-LLM stages only
                vision = vision_stage.encoded_by_caller(self, kwargs)
        if record is not None and not call.generate and record.vision is not None and record.vision.changed:
            translate_manual_step(kwargs, record.vision, cache)
        if (vision is not None or record is not None) and kwargs.get("attention_mask") is None:
            explicit_mask(kwargs, cache)
        if vision is not None:
            call.step = Prefill(self, vision, kwargs)
        elif record is not None:
            call.step = Decode(self, record, kwargs)
        else:
            call.step = None
        return (), kwargs

    def _end_pass(self, call: Call) -> None:
        call.passes -= 1
        if not call.generate and call.passes == 0:
            self._end(call)

    def _post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = self.call
        if (
            call is None or call.thread != threading.get_ident()
        ):  # a call this session refused (another thread's)
            return
        step, call.step = call.step, None
        self._end_pass(call)
        if not isinstance(step, Prefill) or output is None:
            return
        cache = output_cache(output)
        if cache is not None:
            self.caches[cache] = step.cache_record()
        step.release()
        # Inside generate() the report describes the prompt's prefill, not the later steps that
        # generate(use_cache=False) runs as prefills too.
        if not (call.generate and call.reported):
            self.run._record(step)
            call.reported = True

    def _layer_hook(self, idx: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            call = self._own_call()
            if call is None or call.step is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            hidden = call.step.enter_layer(idx, hidden, kwargs)
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

"""``visiondrop bench``: measured prefill and decode speed of pruning methods on a random model of a real shape.

What one run does (``run_bench``):

1. builds a randomly initialised model of any registered family (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; the
   class, the image and the counted parts come from ``visiondrop.models.family``) from a config (default the shipped
   LLaVA-1.5-7B shape, optionally with the LLM truncated to ``layers`` decoder layers), in ``dtype`` on ``device``, without
   transformers' slow initialisation: parameters are allocated empty and filled in place with small normal noise
   (norms at 1, biases at 0), which keeps activations finite and away from denormals;
2. builds a batch of ``batch`` identical-length rows: ``text_tokens`` random text ids around one run of ``<image>``
   placeholders (after the first 5 text tokens, where a chat template puts it), and random pixels;
3. for the unpruned model (the plain model, no hooks) and each method at ``budget``: ``warmup`` untimed generations,
   then one profiling pass (``max_new_tokens=1``) that counts the tokens every part of the model processed (forward
   hooks on the vision layers, the projector, the decoder layers and the LM head), records the peak memory of vision
   and prefill and reads the KV cache's size;
4. ``repeats`` timed rounds; each round runs every configuration once, in an order rotated from round to round, so
   slow drifts of the machine hit all of them alike. One timed call is ``generate(max_new_tokens=new_tokens)`` with
   a streamer that stamps each token as it reaches the host (on CUDA, ``generate`` copies each token to the host,
   which synchronises): time to first token = call start to first token (vision tower, pruning, prefill, first
   logits), decode = first to last token. Pruned calls run under ``method.apply(model, profile=True)``, whose
   ``run.timings`` give the time spent scoring, merging and rebuilding sequences (synchronised on CUDA);
5. reports medians: prefill speed-up = unpruned time to first token / the method's, next to the FLOPs ratio of the
   shapes that actually ran (counted in step 3, with the formulas of :mod:`visiondrop.flops`, for the model as
   built, truncation included; the LM head over the one position ``generate`` computes), and the selection
   overhead as a share of the unpruned time to first token.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from .. import flops
from ..compat import no_init_weights
from ..methods import build, method_class
from ..models.base import get_adapter
from ..models.family import family_of
from ..report import jsonable
from . import common
from .common import add_model_options, format_bytes, format_table, parse_budget, parse_settings

__all__ = [
    "BenchResult",
    "MethodResult",
    "add_parser",
    "bench_config",
    "make_inputs",
    "parse_methods",
    "random_model",
    "resolve_device",
    "run_bench",
    "run_bench_command",
]

logger = logging.getLogger(__name__)

#: Text tokens before the image run (``USER: <image>`` in LLaVA's template is about that long).
_TEXT_BEFORE_IMAGE = 5

#: What the memory figure is, per device (CPU has no allocator statistics to read: malloc's are sampled).
_CUDA_MEMORY = "torch.cuda.max_memory_allocated during the call, above what was allocated before it"
_CPU_MEMORY = (
    "peak of the bytes malloc had handed out (glibc mallinfo2), sampled every millisecond, above the start"
)
_CPU_RSS = "peak growth of the process's resident set, sampled every millisecond (mallinfo2 unavailable)"


# ---------------------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given."""
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(key)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: use auto, cpu or cuda[:index]") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: use auto, cpu or cuda[:index]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"visiondrop,visiondrop:anchors=farthest,fastv"`` -> method specs, checked, as their labels.

    A spec is a registry name, optionally with fixed fields after ``:`` as in ``visiondrop eval --methods``
    (``visiondrop:anchors=farthest``, tuple items with ``/``); the labels are :class:`MethodSpec` labels, so one
    variant measured by ``bench`` and evaluated by ``eval`` carries the same name. ValueError naming the spec for an
    unknown name or a malformed setting.
    """
    from .evaluation import parse_method_spec

    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for raw in items:
        if not raw.strip():
            continue
        spec = parse_method_spec(raw)  # ValueError for an unknown name or a bad setting
        if spec.name == "none":
            raise ValueError("--methods: the unpruned model is always measured; leave 'none' out")
        if spec.label not in out:
            out.append(spec.label)
    if not out:
        raise ValueError(f"--methods {text!r}: give at least one method name (see `visiondrop methods`)")
    return out


def _positive(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# the model and its inputs
# ---------------------------------------------------------------------------------------------------------------


def bench_config(model: str = "llava-1.5-7b", layers: int | None = None) -> Any:
    """The transformers config the bench builds: ``model``'s config with the LLM truncated to ``layers`` layers.

    Any registered family (``visiondrop.models.family``): LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.

    Raises
    ------
    ValueError
        For an unknown model, a config of no supported family, or a layer count outside ``1..num_hidden_layers``.
    """
    from transformers import AutoConfig

    try:
        data, label = flops.read_config(model)
    except ValueError as exc:
        raise ValueError(f"--model {model!r}: {exc}") from None
    try:
        family_of(data.get("model_type"))
    except ValueError as exc:
        raise ValueError(f"--model {label!r}: {exc}") from None
    try:
        config = AutoConfig.for_model(**data)
    except (TypeError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(f"--model {label!r}: not a valid {data['model_type']} config ({reason})") from None
    total = config.text_config.num_hidden_layers
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= total:
            raise ValueError(f"--layers must be an integer in 1..{total} for {label}, got {layers!r}")
        config.text_config.num_hidden_layers = layers
        if getattr(config.text_config, "layer_types", None):
            config.text_config.layer_types = config.text_config.layer_types[:layers]
    config._attn_implementation = "sdpa"
    return config


def random_model(config: Any, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The family's model (``LlavaForConditionalGeneration``, ...) of ``config`` with random weights, built fast.

    Parameters are allocated on ``device`` in ``dtype`` without transformers' (slow, for 7B parameters: minutes)
    initialisation, then filled in place: normal noise of the config's ``initializer_range`` (0.02 by default) for
    weights and embeddings, ones for normalisation weights, zeros for biases. Buffers (rotary frequencies, position
    ids) are computed by the constructors and left alone.
    """
    import transformers

    model_class = getattr(transformers, family_of(config.model_type).model_class(config.model_type))
    std = float(getattr(config.text_config, "initializer_range", 0.02) or 0.02)
    with no_init_weights(), torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=generator)
    model.eval()
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = None  # random weights: never stop early, every call decodes alike
    return model


def make_inputs(
    config: Any,
    *,
    batch: int,
    text_tokens: int = flops.DEFAULT_TEXT_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A batch of ``batch`` rows of one image each, as the family's processor would give it.

    Every row has ``text_tokens`` non-visual tokens: random text ids (never a special id of the config) and the
    family's markers around the image, if it has any (Qwen2-VL's ``<|vision_start|>``/``<|vision_end|>``); the
    image's run comes after the first 5 of them, so the rows need no padding and the counts are exact. The image is
    the family's (see ``Family.bench_image``): LLaVA-1.5's one crop, LLaVA-NeXT's largest grid, a 672 x 672 Qwen2-VL
    image.

    Returns
    -------
    dict
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (all ones), the image inputs (``pixel_values`` in
        ``dtype``, ``image_sizes`` or ``image_grid_thw``) and, for Qwen2-VL, ``mm_token_type_ids`` (B, T).
    """
    generator = torch.Generator().manual_seed(seed)
    image = family_of(config.model_type).bench_image(config, batch, generator)
    vocab = config.text_config.vocab_size
    reserved = {
        int(value)
        for source in (config, config.text_config)
        for name, value in vars(source).items()
        if name.endswith("_token_id") and isinstance(value, int) and not isinstance(value, bool)
    }
    allowed = torch.tensor([i for i in range(min(vocab, 32000)) if i not in reserved])
    markers = len(image.placeholders) - image.tokens
    if text_tokens < markers:
        raise ValueError(f"--text-tokens must be >= {markers} for {config.model_type} (its image markers)")
    text = allowed[torch.randint(len(allowed), (batch, text_tokens - markers), generator=generator)]
    before = min(_TEXT_BEFORE_IMAGE, text.shape[1])
    run = torch.tensor(image.placeholders, dtype=torch.long).expand(batch, -1)
    ids = torch.cat([text[:, :before], run, text[:, before:]], dim=1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image.modality_ids is not None:  # e.g. Qwen2-VL's M-RoPE needs to know which positions are visual
        flags = torch.tensor(image.image_flags, dtype=torch.long).expand(batch, -1)
        zeros = torch.zeros_like(text)
        out[image.modality_ids] = torch.cat([zeros[:, :before], flags, zeros[:, before:]], dim=1)
    out.update(image.inputs)
    return {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in out.items()
    }


# ---------------------------------------------------------------------------------------------------------------
# instruments
# ---------------------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """A ``generate`` streamer that stamps every ``put``: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class _TokenCounter:
    """Forward hooks that record the shapes each part of a vision-language model processed in one call.

    Attributes
    ----------
    vision : list of (int, int)
        ``(images, tokens)`` of every vision-tower layer call.
    projector : int
        Tokens through the multimodal projector.
    llm : list of (int, int)
        ``(batch, sequence length)`` of every decoder-layer call, in call order.
    lm_head : int
        Positions the LM head was applied to.
    """

    def __init__(self, model: torch.nn.Module, vit_tokens: int) -> None:
        self._vit_tokens = (
            vit_tokens  # tokens of one ViT pass, for towers that run all images as one sequence
        )
        self.vision: list[tuple[int, int]] = []
        self.projector = 0
        self.llm: list[tuple[int, int]] = []
        self.lm_head = 0
        inner = model.model
        vision_layers, projector = family_of(model.config.model_type).vision_parts(model)
        self._targets: list[tuple[torch.nn.Module, Any]] = []
        for layer in vision_layers:
            self._targets.append((layer, self._on_vision))
        self._targets.append((projector, self._on_projector))
        self._decoder_layers = list(inner.language_model.layers)
        for layer in self._decoder_layers:
            self._targets.append((layer, self._on_llm))
        self._targets.append((model.lm_head, self._on_lm_head))
        self._handles: list[Any] = []
        #: Wall time of every decoder-layer call (synchronised on CUDA); a method's own pre-hooks, when installed
        #: after these, fall inside the time of the layer they run before.
        self.layer_seconds: list[float] = []
        self._started = 0.0
        self._device = next(model.parameters()).device

    @staticmethod
    def _first_tensor(value: Any) -> torch.Tensor:
        while not isinstance(value, torch.Tensor):
            value = value[0]
        return value

    def _on_vision(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        hidden = self._first_tensor(output)
        if (
            hidden.dim() == 2
        ):  # (all patches, width): Qwen2-VL's blocks attend within each image of the sequence
            self.vision.append((hidden.shape[0] // self._vit_tokens, self._vit_tokens))
        else:
            self.vision.append((hidden.shape[0], hidden.shape[1]))

    def _on_projector(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        hidden = self._first_tensor(output)
        self.projector += hidden.numel() // hidden.shape[-1]

    def _before_llm(self, module: torch.nn.Module, args: tuple) -> None:
        _synchronize(self._device)
        self._started = time.perf_counter()

    def _on_llm(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        _synchronize(self._device)
        self.layer_seconds.append(time.perf_counter() - self._started)
        hidden = self._first_tensor(output)
        self.llm.append((hidden.shape[0], hidden.shape[1]))

    def _on_lm_head(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        logits = self._first_tensor(output)
        self.lm_head += logits.numel() // logits.shape[-1]

    @contextmanager
    def watching(self) -> Iterator[_TokenCounter]:
        """Install the hooks for the block; they are removed on exit, also after an exception."""
        try:
            for layer in self._decoder_layers:
                self._handles.append(layer.register_forward_pre_hook(self._before_llm))
            for module, hook in self._targets:
                self._handles.append(module.register_forward_hook(hook))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def flops(self, arch: flops.ArchSpec) -> float:
        """FLOPs of the recorded shapes (SPEC §9 formulas; one entry per layer call)."""
        vision = math.fsum(images * flops.vit_layer_flops(arch, tokens) for images, tokens in self.vision)
        llm = math.fsum(batch * flops.llm_layer_flops(arch, length) for batch, length in self.llm)
        head = 2 * self.lm_head * arch.hidden_size * arch.vocab_size
        return vision + flops.projector_flops(arch, self.projector) + llm + head


class _MallInfo(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33): byte counts of the malloc heap."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc_in_use() -> Any:
    """A function returning the bytes malloc has handed out and not taken back, or None without glibc's mallinfo2.

    PyTorch's CPU tensors come from malloc (large ones as mmapped blocks, ``hblkhd``), so this rises and falls with
    them, unlike the resident set, which keeps freed heap pages.
    """
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    function.restype = _MallInfo

    def in_use() -> int:
        info = function()
        return int(info.uordblks + info.hblkhd)

    return in_use


def _resident_set() -> int:
    """Resident set of this process in bytes (Linux ``/proc``; elsewhere the lifetime high-water mark)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _MemoryWatch:
    """Peak memory of a block above what was in use before it.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: a thread samples, every millisecond, the bytes malloc
    has handed out (glibc ``mallinfo2``), or the resident set where that is not available. :attr:`kind` says which.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        if device.type == "cuda":
            self.kind = _CUDA_MEMORY
            self._read = None
        else:
            malloc = _malloc_in_use()
            self.kind = _CPU_MEMORY if malloc is not None else _CPU_RSS
            self._read = malloc or _resident_set

    @contextmanager
    def watching(self) -> Iterator[_MemoryWatch]:
        if self._read is None:
            _synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            try:
                yield self
            finally:
                _synchronize(self.device)
                self.peak = torch.cuda.max_memory_allocated(self.device) - before
            return
        read = self._read
        before = read()
        highest = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                highest[0] = max(highest[0], read())
                stop.wait(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            highest[0] = max(highest[0], read())
            self.peak = max(0, highest[0] - before)


class _OtherLoad:
    """CPU time other processes used while a block ran, in cores (Linux ``/proc/stat``; None elsewhere).

    Busy time of the whole machine (user, nice, system, interrupts, steal) minus this process's own CPU time, divided
    by the wall time: 0 on a quiet machine, 1.0 when another process kept one core busy throughout.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _machine_busy() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = handle.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu" or len(fields) < 9:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @contextmanager
    def watching(self) -> Iterator[_OtherLoad]:
        busy, own, wall = self._machine_busy(), sum(os.times()[:2]), time.perf_counter()
        try:
            yield self
        finally:
            after = self._machine_busy()
            elapsed = time.perf_counter() - wall
            if busy is not None and after is not None and elapsed > 0:
                others = (after - busy) - (sum(os.times()[:2]) - own)
                self.cores = max(0.0, others / elapsed)


def _cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a ``Cache`` holds (transformers 5.x: ``cache.layers[i].keys/values``)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Samples:
    """Raw timings of one configuration, one entry per timed round."""

    ttft_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    overhead_s: list[float] = field(default_factory=list)


@dataclass
class MethodResult:
    """One configuration's medians and counts (the unpruned baseline has ``method == "none"``).

    ``method`` is the spec's label (``visiondrop:anchors=farthest``), ``fields`` the fields set on it (the spec's
    and ``--set``'s), ``positions`` its position policy on this model (``auto`` resolved). Times are medians over
    the timed rounds; ratios are against the unpruned baseline of the same run.
    """

    method: str
    budget: int | float | None
    budget_mode: str | None
    positions: str | None
    fields: dict[str, Any]
    schedule: str
    input_count: int
    layer_average: float
    final_count: int
    ttft_s: float
    prefill_speedup: float
    tflops: float
    unpruned_tflops: float
    flops_ratio: float
    speedup_per_flops_ratio: float
    overhead_s: float
    overhead_share: float
    overhead_share_full_depth: float
    decode_tokens_per_s: float | None
    decode_speedup: float | None
    peak_memory_bytes: int
    kv_bytes: int
    kv_bytes_analytic: int
    sequence_per_layer: list[int]
    ttft_s_rounds: list[float]
    overhead_s_rounds: list[float]
    decode_s_rounds: list[float]


@dataclass
class BenchResult:
    """Everything ``visiondrop bench`` measured in one run; :meth:`to_dict` is what ``--json`` writes."""

    model: str
    layers: int
    full_layers: int
    dtype: str
    device: str
    device_name: str
    threads: int
    batch: int
    text_tokens: int
    image_tokens: int
    new_tokens: int
    repeats: int
    warmup: int
    date: str
    memory: str
    other_load_cores: float | None
    unpruned: MethodResult
    results: list[MethodResult]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The measured results as a markdown table (baseline first)."""
        headers = [
            "method",
            "budget",
            "visual tokens (in -> layer avg -> final)",
            "time to first token",
            "prefill speed-up",
            "FLOPs ratio",
            "speed-up / FLOPs ratio",
            "scoring+merging (% of unpruned prefill)",
            "decode tok/s (batch)",
            "peak memory",
            "KV cache (measured / analytic)",
        ]
        truncated = self.layers != self.full_layers

        def overhead(r: MethodResult) -> str:
            text = f"{100 * r.overhead_share:.2f}%"
            if truncated:
                text += f" ({100 * r.overhead_share_full_depth:.2f}% at {self.full_layers} layers)"
            return text

        rows = []
        for r in [self.unpruned, *self.results]:
            decode = "-" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}"
            rows.append(
                [
                    "unpruned" if r.method == "none" else f"{r.method} ({r.positions})",
                    "-" if r.budget is None else f"{r.budget} ({r.budget_mode})",
                    f"{r.input_count} -> {r.layer_average:.1f} -> {r.final_count}",
                    _seconds(r.ttft_s),
                    f"{r.prefill_speedup:.2f}x",
                    f"{r.flops_ratio:.2f}x",
                    f"{r.speedup_per_flops_ratio:.2f}",
                    "-" if r.method == "none" else overhead(r),
                    decode,
                    format_bytes(r.peak_memory_bytes),
                    f"{format_bytes(r.kv_bytes)} / {format_bytes(r.kv_bytes_analytic)}",
                ]
            )
        return format_table(headers, rows)

    def __str__(self) -> str:
        truncated = (
            f"LLM truncated to {self.layers} of {self.full_layers} layers"
            if self.layers != self.full_layers
            else f"all {self.layers} LLM layers"
        )
        lines = [
            f"model:   {self.model} shape, {truncated}, random weights, {self.dtype}",
            f"device:  {self.device_name} ({self.device}, {self.threads} threads), {self.date}",
            f"inputs:  batch {self.batch}, {self.text_tokens} text + {self.image_tokens} image tokens per row; "
            f"{self.new_tokens} new tokens per call",
            f"timing:  median of {self.repeats} rounds after {self.warmup} warm-up call(s) per configuration; "
            "configurations interleaved, order rotated every round",
            "",
            self.table(),
            "",
            *self.notes,
        ]
        return "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.1f} ms"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


def run_bench(
    model: str = "llava-1.5-7b",
    *,
    methods: Sequence[str] = ("visiondrop",),
    budget: int | float = 64,
    budget_mode: str = "average",
    settings: dict[str, Any] | None = None,
    layers: int | None = None,
    batch: int = 1,
    dtype: str = "bfloat16",
    device: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    new_tokens: int = 8,
    text_tokens: int = flops.DEFAULT_TEXT_TOKENS,
    seed: int = 0,
    progress: bool = False,
) -> BenchResult:
    """Measure the unpruned model and each method in one run (see the module docstring for the protocol).

    Parameters
    ----------
    model : str
        A shipped config (``llava-1.5-7b``, ``llava-1.5-13b``, ``llava-next-7b``, ``qwen2-vl-7b``) or a path to a
        ``config.json`` of a supported family.
    methods : sequence of str
        Methods to measure next to the unpruned model: registry names, optionally with fixed fields as in
        ``visiondrop eval`` (``visiondrop:anchors=farthest``); a spec's fields win over ``settings``.
    budget, budget_mode, settings
        Passed to :func:`visiondrop.build` for every method (``settings``: other fields, applied to the methods
        that have them).
    layers : int, optional
        Truncate the LLM to its first ``layers`` decoder layers (default: all).
    batch, dtype, device
        Rows per call; ``bfloat16``/``float16``/``float32``; ``auto``/``cpu``/``cuda``.
    repeats, warmup : int
        Timed rounds (medians are reported) and untimed calls per configuration before them.
    new_tokens : int
        Tokens each timed call generates (decode speed needs at least 2).
    text_tokens : int
        Text tokens per row (default 64), around one image's placeholders.
    progress : bool
        Log a line per timed call (INFO on the ``visiondrop.tools.bench`` logger).

    Returns
    -------
    BenchResult

    Raises
    ------
    ValueError
        For bad arguments, found before anything is built: unknown methods or dtype, a batch below 1, a budget a
        method cannot meet on the (truncated) model.
    """
    names = parse_methods(methods)
    torch_dtype = common.torch_dtype(dtype)
    batch = _positive(batch, "--batch")
    repeats = _positive(repeats, "--repeats")
    warmup = _positive(warmup, "--warmup", 0)
    new_tokens = _positive(new_tokens, "--new-tokens")
    text_tokens = _positive(text_tokens, "--text-tokens", 0)
    target = resolve_device(device)
    config = bench_config(model, layers)
    arch = flops.ArchSpec.from_config(config, name=str(model))
    num_layers = config.text_config.num_hidden_layers
    full_layers = flops.ArchSpec.from_config(bench_config(model)).num_layers
    image = family_of(config.model_type).bench_image(config, 1, torch.Generator())
    image_tokens, grids = image.tokens, image.grids

    # Every method and its schedule on this (possibly truncated) model, before the slow part. A spec's own fields
    # (``visiondrop:anchors=farthest``) win over ``--set``, which applies to every method that has the field.
    from .evaluation import parse_method_spec

    specs = {name: parse_method_spec(name) for name in names}
    extra = dict(settings or {})
    known = {f.name for spec in specs.values() for f in dataclasses.fields(method_class(spec.name)) if f.init}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: none of {', '.join(names)} has such a field")
    pruners = {}
    fixed: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        accepted = {f.name for f in dataclasses.fields(method_class(spec.name)) if f.init}
        fields = {k: v for k, v in extra.items() if k in accepted}
        fields.update(spec.fields)
        fixed[name] = dict(fields)
        fields.update(budget=budget, budget_mode=budget_mode)
        pruner = build(spec.name, **fields)
        pruner.schedule(image_tokens, num_layers, grids)
        pruners[name] = pruner

    logger.info("building the random %s model (%d LLM layers, %s, %s)", model, num_layers, dtype, target)
    net = random_model(config, dtype=torch_dtype, device=target, seed=seed)
    adapter = get_adapter(net)
    inputs = make_inputs(
        config, batch=batch, text_tokens=text_tokens, dtype=torch_dtype, device=target, seed=seed + 1
    )
    element = torch.empty((), dtype=torch_dtype).element_size()
    configs: list[str] = ["none", *names]

    def scope(name: str) -> Any:
        """The unpruned model as it is, or the method applied (profiled: its own work is timed)."""
        return nullcontext(None) if name == "none" else pruners[name].apply(net, profile=True)

    def call(name: str, tokens: int, **extra: Any) -> Any:
        """One untimed generation (warm-up, or the counting pass)."""
        with scope(name):
            return net.generate(
                **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **extra
            )

    def timed_call(name: str) -> None:
        """One timed generation; its time to first token, decode time and selection time go to ``samples``."""
        clock = _Clock()
        with scope(name) as run:
            _synchronize(target)
            start = time.perf_counter()
            net.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
            )
            _synchronize(target)
        stamps = clock.stamps[1:]  # the first put is the prompt
        sample = samples[name]
        sample.ttft_s.append(stamps[0] - start)
        if len(stamps) > 1:
            sample.decode_s.append(stamps[-1] - stamps[0])
        sample.overhead_s.append(0.0 if run is None else sum(run.timings.values()))

    samples = {name: _Samples() for name in configs}
    counted: dict[str, dict[str, Any]] = {}
    memory_kind = _MemoryWatch(target).kind
    with torch.no_grad():
        for name in configs:
            for _ in range(warmup):
                call(name, new_tokens)
            counter, memory = _TokenCounter(net, image.vit_tokens), _MemoryWatch(target)
            with counter.watching(), memory.watching():
                out = call(name, 1, return_dict_in_generate=True)
            cache = out.past_key_values
            counted[name] = {
                "flops": counter.flops(arch),
                "peak": memory.peak,
                "kv": _cache_bytes(cache),
                "llm": list(counter.llm),
                "layer_s": _median(counter.layer_seconds),
            }
            del out, cache
        other_load = _OtherLoad()
        with other_load.watching():
            for round_ in range(repeats):
                shift = round_ % len(configs)
                for name in configs[shift:] + configs[:shift]:
                    timed_call(name)
                    if progress:
                        logger.info(
                            "round %d/%d %-12s time to first token %s",
                            round_ + 1,
                            repeats,
                            name,
                            _seconds(samples[name].ttft_s[-1]),
                        )

    base_ttft = _median(samples["none"].ttft_s)
    base_decode = _median(samples["none"].decode_s)
    base_flops = counted["none"]["flops"]
    # A truncated LLM keeps every boundary of a derived schedule (at L/4, L/2, 3L/4 of the layers it has), with the
    # same token counts, so the selection work is that of the full model while the prefill is shorter. The unpruned
    # prefill of the full-depth model is estimated from the measured time of one unpruned decoder layer.
    full_depth_ttft = base_ttft + (full_layers - num_layers) * counted["none"]["layer_s"]

    def result(name: str) -> MethodResult:
        sample = samples[name]
        pruner = pruners.get(name)
        schedule = (
            pruner.schedule(image_tokens, num_layers, grids)
            if pruner is not None
            else build("none").schedule(image_tokens, num_layers)
        )
        ttft = _median(sample.ttft_s)
        decode = _median(sample.decode_s)
        steps = batch * (new_tokens - 1)
        decode_rate = steps / decode if sample.decode_s and decode > 0 else None
        ratio = base_flops / counted[name]["flops"]
        analytic = batch * flops.kv_cache_bytes(
            arch, [text_tokens + v for v in schedule.tokens_per_layer()], element
        )
        return MethodResult(
            method=name,
            budget=None if pruner is None else pruner.budget,
            budget_mode=None if pruner is None else pruner.budget_mode,
            positions=None if pruner is None else pruner.position_policy(adapter),
            fields={} if pruner is None else {k: jsonable(v) for k, v in fixed[name].items()},
            schedule=schedule.describe(),
            input_count=schedule.input_count,
            layer_average=schedule.layer_average,
            final_count=schedule.final_count,
            ttft_s=ttft,
            prefill_speedup=base_ttft / ttft,
            tflops=counted[name]["flops"] / 1e12,
            unpruned_tflops=base_flops / 1e12,
            flops_ratio=ratio,
            speedup_per_flops_ratio=(base_ttft / ttft) / ratio,
            overhead_s=_median(sample.overhead_s),
            overhead_share=_median(sample.overhead_s) / base_ttft,
            overhead_share_full_depth=_median(sample.overhead_s) / full_depth_ttft,
            decode_tokens_per_s=decode_rate,
            decode_speedup=(base_decode / decode) if decode_rate is not None else None,
            peak_memory_bytes=int(counted[name]["peak"]),
            kv_bytes=int(counted[name]["kv"]),
            kv_bytes_analytic=int(analytic),
            sequence_per_layer=[length for _, length in counted[name]["llm"]],
            ttft_s_rounds=sample.ttft_s,
            overhead_s_rounds=sample.overhead_s,
            decode_s_rounds=sample.decode_s,
        )

    built = (
        f"{num_layers} of {full_layers} LLM layers"
        if num_layers != full_layers
        else f"{num_layers} LLM layers"
    )
    notes = [
        f"FLOPs ratio: unpruned / pruned FLOPs of the shapes that ran (counted by hooks), for this model as built "
        f"({built} + the whole vision tower; the LM head over the one position generate computes)"
        + (
            f"; `visiondrop flops` gives the {full_layers}-layer figures."
            if num_layers != full_layers
            else "."
        ),
        "scoring+merging: the methods' own work (scores, selection, merges, rebuilt sequences) from "
        "run.timings, as a share of the unpruned time to first token"
        + (
            f"; in parentheses, as a share of the {full_layers}-layer model's (estimated: the measured time plus "
            f"{full_layers - num_layers} more unpruned decoder layers at the measured time per layer), since a "
            "truncated LLM still runs every boundary, at the token counts of the full model."
            if num_layers != full_layers
            else "."
        ),
        f"peak memory: {memory_kind}, in the vision + prefill "
        "call. KV cache: measured = the cache's tensors after prefill; analytic = visiondrop.flops.kv_cache_bytes.",
    ]
    if other_load.cores is not None:
        load = f"other processes kept {other_load.cores:.2f} of {os.cpu_count()} cores busy during the timed rounds"
        if other_load.cores > 0.1:
            load = f"WARNING: {load}: the timings are contaminated; rerun on a quiet machine."
        notes.append(load + ("" if other_load.cores > 0.1 else " (a quiet machine)."))
    if target.type == "cpu":
        notes.append(
            f"note: on CPU, prefill time tracks FLOPs only from batch ~4: below that the pruned, shorter sequences "
            f"leave the matrix kernels underfed and fixed per-call costs weigh more (this run: batch {batch})."
        )
    return BenchResult(
        model=str(model),
        layers=num_layers,
        full_layers=full_layers,
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(target),
        device_name=_device_name(target),
        threads=torch.get_num_threads(),
        batch=batch,
        text_tokens=text_tokens,
        image_tokens=image_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        memory=memory_kind,
        unpruned=result("none"),
        results=[result(name) for name in names],
        other_load_cores=other_load.cores,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register ``visiondrop bench`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "bench",
        help="measure prefill/decode speed-ups of methods on a random model of a real shape",
        description=(
            "Build a randomly initialised model of a real shape (any supported family) and measure, in one interleaved run, time to "
            "first token, decode speed, peak memory and KV-cache size, unpruned and for each method; print each "
            "method's prefill speed-up next to its FLOPs ratio and its scoring+merging time."
        ),
    )
    add_model_options(parser, flops.SHIPPED_CONFIGS)
    parser.add_argument(
        "--layers", type=int, help="truncate the LLM to this many decoder layers (default: all)"
    )
    parser.add_argument(
        "--methods",
        default="visiondrop",
        help="comma-separated methods measured next to the unpruned model, each a registry name optionally with "
        "fields as in `eval` (visiondrop:anchors=farthest); default visiondrop",
    )
    parser.add_argument("--batch", type=int, default=1, help="rows per call (default 1)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, default), cpu or cuda")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed rounds; medians are reported (default 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per configuration first (default 1)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=8, help="tokens generated per timed call (default 8)"
    )
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=flops.DEFAULT_TEXT_TOKENS,
        help=f"text tokens per row (default {flops.DEFAULT_TEXT_TOKENS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    parser.add_argument(
        "--json", dest="json_path", metavar="PATH", help="also write the results as JSON to PATH"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    """Entry point of ``visiondrop bench``: runs, prints the table, writes ``--json``; returns the exit status."""
    if not args.quiet and not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
        if not logging.getLogger().handlers and not logger.handlers:
            logger.addHandler(logging.StreamHandler())
    if args.json_path:
        common.check_output_file(args.json_path, "--json")  # before the run, not after it
    result = run_bench(
        args.model,
        methods=parse_methods(args.methods),
        budget=parse_budget(args.budget),
        budget_mode=args.budget_mode,
        settings=parse_settings(args.settings),
        layers=args.layers,
        batch=args.batch,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        text_tokens=args.text_tokens,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(result)
    if args.json_path:
        path = common.write_json(args.json_path, result.to_dict(), "--json")
        print(f"results written to {path}")
    return 0

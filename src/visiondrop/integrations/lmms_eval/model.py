"""The lmms-eval model ``visiondrop``: any supported HF LVLM, pruned by any registered method, batched.

``python -m lmms_eval --model visiondrop --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=visiondrop,budget=64``

One model id serves every family: the HF class comes from the checkpoint's config
(:class:`transformers.AutoModelForImageTextToText`) and each family's prompt from its own processor's chat template,
so a family added to visiondrop later needs nothing here. Every request runs under ``method.apply(model)``
(``method=none`` runs :class:`visiondrop.NoPruning`, which is bit-identical to the unpatched model and still reports
the token counts and FLOPs), one left-padded ``generate`` per chunk of ``--batch_size`` requests.

Per sample, the visual tokens (entering the LLM, layer average, leaving the last layer) and the analytic prefill
TFLOPs go into lmms-eval's sample log (the ``token_counts`` entry of each sample); their means over the run go into
the results file's ``throughput`` block as ``avg_visiondrop_*`` (lmms-eval's ``log_metrics`` mechanism).

Errors stop the run: a bad model argument or a failure while generating ends the process with a one-line message
and exit status 1 (:class:`RunStopped`), never an empty answer that would read as a wrong one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from ... import flops as vd_flops
from ...methods import available_methods, build

__all__ = ["RunStopped", "VisionDropChat", "VisionDropCounts", "VisionDropSimple", "parse_method_fields"]

logger = logging.getLogger(__name__)

# Means that go into the results file (prefixed ``avg_`` by lmms-eval's summary).
_MEAN_KEYS = (
    "visual_tokens_input",
    "visual_tokens_layer_average",
    "visual_tokens_final",
    "prefill_tflops",
)


class RunStopped(SystemExit):
    """Ends the lmms-eval run with a one-line message and exit status 1.

    lmms-eval catches every ``Exception`` of a run, prints it and exits 0 with no results; a ``SystemExit`` passes
    through, so a pruning error cannot be mistaken for a finished (or partly empty) evaluation.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"visiondrop (lmms-eval): {message}")


def parse_method_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Method fields from model_args, read with the CLI's ``--set key=value`` rules.

    lmms-eval has already turned ``"64"`` into ``64`` and ``"true"`` into ``True``; the values are turned back into
    text and parsed by the CLI's own parser so that ``--model_args`` and ``visiondrop run --set`` agree on every value.

    Parameters
    ----------
    values : dict
        ``{field: value}`` of the model_args that are not the model's own.

    Returns
    -------
    dict
        ``{field: parsed value}``.
    """
    if not values:
        return {}
    from ...tools.common import CLIError, parse_settings

    text = ",".join(f"{key}={_as_text(value)}" for key, value in values.items())
    try:
        return parse_settings(text, flag="--model_args")
    except CLIError as err:
        raise ValueError(str(err)) from None


def _as_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parse_budget(value: Any) -> int | float:
    from ...tools.common import parse_budget

    return parse_budget(_as_text(value))


@dataclass
class VisionDropCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus what pruning did to the sample (written to the sample log).

    Attributes
    ----------
    visual_tokens_input : float
        Visual tokens entering the LLM (mean over the sample's images).
    visual_tokens_layer_average : float
        Visual tokens averaged over the LLM layers.
    visual_tokens_final : float
        Visual tokens leaving the last layer.
    prefill_tflops : float or None
        Analytic prefill cost of the sample (vision tower, projector, LLM layers, LM head), or ``None`` when the
        architecture is unknown to :mod:`visiondrop.flops`.
    """

    visual_tokens_input: float | None = None
    visual_tokens_layer_average: float | None = None
    visual_tokens_final: float | None = None
    prefill_tflops: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = super().to_dict()
        for key in _MEAN_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class _Prepared:
    """One request, ready for the processor."""

    index: int
    images: list[Any]
    conversation: list[dict[str, Any]]
    gen_kwargs: dict[str, Any]
    padding: bool


class _VisionDropBase(lmms):
    """Loading, batching, pruning and bookkeeping; the subclasses differ only in lmms-eval's `is_simple` flag."""

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "none",
        budget: Any = 64,
        budget_mode: str = "average",
        dtype: str = "auto",
        attn_implementation: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        try:
            self._batch_size = _batch_size(batch_size)
            # The method first: a bad method argument fails before a 7B checkpoint is loaded.
            self._method = self._build_method(method, budget, budget_mode, fields)
            self._setup(pretrained, dtype, attn_implementation, device_map, device)
            self._check_method()
        except (ValueError, TypeError, OSError) as err:
            raise RunStopped(str(err).splitlines()[0]) from err

    # --- setup ----------------------------------------------------------------------------------------------------
    def _setup(
        self,
        pretrained: str | None,
        dtype: str,
        attn_implementation: str | None,
        device_map: str | None,
        device: str | None,
    ) -> None:
        from accelerate import Accelerator
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ...tools.common import DTYPES, torch_dtype

        if not pretrained:
            raise ValueError("model_args pretrained=...: give an HF id or a local folder")
        dtypes = ("auto", *DTYPES)  # the CLI's --dtype names, and transformers' "auto" (the default)
        if str(dtype) not in dtypes:
            raise ValueError(f"model_args dtype={dtype!r}: use one of {', '.join(dtypes)}")
        # lmms-eval's data parallelism: one process per device, started by `accelerate launch` or `torchrun`;
        # Accelerator reads RANK/WORLD_SIZE/LOCAL_RANK and sets up the process group (gloo without CUDA).
        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        local = self.accelerator.local_process_index
        cuda = torch.cuda.is_available()
        if device_map in (None, ""):
            # transformers 5 rejects lmms-eval's default device_map="" ; pick one that works: each rank its own
            # GPU, one process on GPUs spreads the model ("auto"), otherwise the CPU (or lmms-eval's --device).
            if self._world_size > 1:
                device_map = f"cuda:{local}" if cuda else "cpu"
            elif device:
                device_map = str(device)
            else:
                device_map = "auto" if cuda else "cpu"
        self._device_map = device_map
        load_kwargs: dict[str, Any] = {
            "dtype": "auto" if str(dtype) == "auto" else torch_dtype(str(dtype)),
            "device_map": device_map,
        }
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        self._processor = AutoProcessor.from_pretrained(pretrained)
        self._model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs)
        self._model.eval()
        tokenizer = getattr(self._processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"model_args pretrained={pretrained!r}: its processor has no tokenizer")
        self._tokenizer = tokenizer
        self._pretrained = pretrained
        self._arch = _arch_of(self._model)

    def _build_method(self, method: str, budget: Any, budget_mode: str, fields: dict[str, Any]) -> Any:
        """The method from model_args; ValueError naming the model_args for anything the method rejects."""
        name = str(method).strip().lower()
        if name not in available_methods():
            raise ValueError(
                f"model_args method={method!r}: unknown method (available: {', '.join(available_methods())})"
            )
        given = ",".join(
            f"{key}={_as_text(value)}"
            for key, value in {"method": name, "budget": budget, "budget_mode": budget_mode, **fields}.items()
        )
        self._given = given
        try:
            return build(
                name,
                budget=_parse_budget(budget),
                budget_mode=str(budget_mode),
                **parse_method_fields(fields),
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"model_args {given}: {err}") from None

    def _check_method(self) -> None:
        """Errors that need the model (budget above the family's token count, schedule vs. layers) now, not after
        the first batch: applying the method and leaving restores the model."""
        try:
            with self._method.apply(self._model):
                pass
        except (ValueError, TypeError) as err:
            raise ValueError(f"model_args {self._given}: {err}") from None

    # --- lmms interface -------------------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Not implemented: stops the run (exit status 1) with a ``NotImplementedError`` as its cause.

        Pruning rewrites the visual part of the prefill, and scoring a continuation under it is not implemented;
        every benchmark of the README's comparison is a generation task.
        """
        message = (
            "loglikelihood requests (tasks scored by likelihood) are not implemented: pruning rewrites the "
            "prefill's visual tokens and scoring a continuation under it is not supported; use a generate_until task"
        )
        raise RunStopped(message) from NotImplementedError(message)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not implemented: stops the run (exit status 1) with a ``NotImplementedError`` as its cause."""
        message = "generate_until_multi_round requests (multi-round tasks) are not implemented"
        raise RunStopped(message) from NotImplementedError(message)

    def _prepare(self, request: Instance, index: int) -> _Prepared:
        """A request of either form as a conversation and its images.

        lmms-eval builds chat-form requests ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)`` for chat
        models and simple-form ones ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` for simple
        models; which one a task produces depends on the task class, so both classes read both.
        """
        args = request.args
        padding = bool((request.metadata or {}).get("__padding_only__"))
        if callable(args[1]):
            _context, doc_to_messages, gen_kwargs, doc_id, task, split = args
            images, conversation = _from_messages(doc_to_messages(self.task_dict[task][split][doc_id]), task)
        else:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args
            doc = self.task_dict[task][split][doc_id]
            images = _images((doc_to_visual(doc) if doc_to_visual is not None else None) or [], task)
            content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
            content.append({"type": "text", "text": context})
            conversation = [{"role": "user", "content": content}]
        return _Prepared(index, images, conversation, dict(gen_kwargs or {}), padding)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer every request: chunks of ``batch_size`` with equal generation settings, one ``generate`` each.

        Parameters
        ----------
        requests : list of Instance
            lmms-eval's requests, in its order.

        Returns
        -------
        list of GenerationResult
            In the order of ``requests``; each with :class:`VisionDropCounts`.
        """
        try:
            return self._generate_all(requests)
        except RunStopped:
            raise
        except Exception as err:
            logger.exception("visiondrop (lmms-eval): generation failed")
            raise RunStopped(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err

    def _generate_all(self, requests: list[Instance]) -> list[GenerationResult]:
        from tqdm.auto import tqdm

        prepared = [self._prepare(request, i) for i, request in enumerate(requests)]
        groups: dict[str, list[_Prepared]] = {}
        for item in prepared:
            key = json.dumps(item.gen_kwargs, sort_keys=True, default=str) + f"|{bool(item.images)}"
            groups.setdefault(key, []).append(item)
        chunks = [
            items[start : start + self._batch_size]
            for items in groups.values()
            for start in range(0, len(items), self._batch_size)
        ]
        results: list[GenerationResult | None] = [None] * len(requests)
        padding = [item.padding for item in prepared]
        start_time = time.time()
        generated = 0
        for chunk in tqdm(chunks, disable=self._rank != 0, desc="visiondrop", unit="batch"):
            for item, result in zip(chunk, self._generate_chunk(chunk), strict=True):
                results[item.index] = result
                generated += result.token_counts.output_tokens or 0
        elapsed = time.time() - start_time
        done = [r for r in results if r is not None]
        self._log_means(done, padding, elapsed, generated)
        return done

    def _generate_chunk(self, chunk: Sequence[_Prepared]) -> list[GenerationResult]:
        processor = self._processor
        prompts = [self._render(item.conversation) for item in chunk]
        images = [image for item in chunk for image in item.images]
        old_side = self._tokenizer.padding_side
        # Left padding keeps every prompt's last token at the end, so the generated tokens line up per row.
        self._tokenizer.padding_side = "left"
        try:
            inputs = processor(images=images or None, text=prompts, padding=True, return_tensors="pt").to(
                self._model.device
            )
        finally:
            self._tokenizer.padding_side = old_side
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        gen = _generation_kwargs(chunk[0].gen_kwargs)
        pad_id = self._tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self._tokenizer.eos_token_id
        prompt_length = inputs["input_ids"].shape[1]
        with torch.no_grad(), self._method.apply(self._model) as run:
            sequences = self._model.generate(**inputs, **gen, pad_token_id=pad_id)
        report = run.report
        new_tokens = sequences[:, prompt_length:]
        texts = self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        stops = _stop_strings(chunk[0].gen_kwargs)
        per_sample_flops = _per_sample_tflops(self._arch, report, inputs["attention_mask"])
        out = []
        for row, text in enumerate(texts):
            for stop in stops:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            sample = report.samples[row] if row < len(report.samples) else None
            has_images = sample is not None and bool(sample.images)
            generated = int((new_tokens[row] != pad_id).sum()) if pad_id is not None else new_tokens.shape[1]
            counts = VisionDropCounts(
                input_tokens=int(inputs["attention_mask"][row].sum()),
                output_tokens=generated,
                visual_tokens_input=sample.input_count if has_images else None,
                visual_tokens_layer_average=sample.layer_average if has_images else None,
                visual_tokens_final=sample.final_count if has_images else None,
                prefill_tflops=per_sample_flops[row] if per_sample_flops else None,
            )
            out.append(GenerationResult(text=text.strip(), token_counts=counts))
        return out

    def _render(self, conversation: list[dict[str, Any]]) -> str:
        """The family's own prompt for a conversation (its processor's chat template)."""
        if getattr(self._processor, "chat_template", None):
            return self._processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        raise ValueError(
            f"model_args pretrained={self._pretrained!r}: its processor has no chat template, so the family's "
            "prompt format is unknown"
        )

    def _log_means(
        self, results: list[GenerationResult], padding: list[bool], elapsed: float, generated: int
    ) -> None:
        """Means over the run's real samples (padding requests of uneven ranks excluded), summed over ranks."""
        sums = torch.zeros(2 * len(_MEAN_KEYS), dtype=torch.float64)
        for result, is_padding in zip(results, padding, strict=True):
            if is_padding:
                continue
            counts = result.token_counts
            for k, key in enumerate(_MEAN_KEYS):
                value = getattr(counts, key, None)
                if value is not None:
                    sums[2 * k] += float(value)
                    sums[2 * k + 1] += 1
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if torch.distributed.get_backend() == "nccl"
                else torch.device("cpu")
            )
            buffer = sums.to(device)
            torch.distributed.all_reduce(buffer)
            sums = buffer.cpu()
        means = {
            f"visiondrop_{key}": float(sums[2 * k] / sums[2 * k + 1])
            for k, key in enumerate(_MEAN_KEYS)
            if sums[2 * k + 1] > 0
        }
        means["visiondrop_samples"] = float(sums[1])
        means["visiondrop_ranks"] = float(self._world_size)
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=generated,
            avg_speed=generated / elapsed if elapsed > 0 else 0.0,
            additional_metrics=means,
        )


class VisionDropChat(_VisionDropBase):
    """lmms-eval "chat" model (``--model visiondrop``): requests carry the task's messages."""

    is_simple = False


class VisionDropSimple(_VisionDropBase):
    """lmms-eval "simple" model (``--model visiondrop --force_simple``): requests carry text and visuals."""

    is_simple = True


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _from_messages(raw: Any, task: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """lmms-eval chat messages -> (images in order, a conversation with image placeholders for the template)."""
    from lmms_eval.protocol import ChatMessages

    messages = ChatMessages(messages=raw)
    images, videos, audios = messages.extract_media()
    if videos or audios:
        raise ValueError(f"task {task!r}: video and audio inputs are not supported by the visiondrop model")
    conversation = []
    for message in messages.messages:
        content: list[dict[str, Any]] = []
        for part in message.content:
            if part.type == "image":
                content.append({"type": "image"})
            elif part.type == "text":
                content.append({"type": "text", "text": part.text})
        conversation.append({"role": message.role, "content": content})
    return _images(images, task), conversation


def _batch_size(value: int | str) -> int:
    text = str(value)
    if text.startswith("auto"):
        raise ValueError(f"--batch_size {text!r}: give a number (automatic batch sizes are not supported)")
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"--batch_size {text!r}: give a positive number") from None
    if size < 1:
        raise ValueError(f"--batch_size {size}: give a positive number")
    return size


def _images(visuals: Sequence[Any], task: str) -> list[Any]:
    from PIL import Image

    out = []
    for visual in visuals:
        if not isinstance(visual, Image.Image):
            raise ValueError(
                f"task {task!r}: the visiondrop model takes images only, got a {type(visual).__name__}"
            )
        out.append(visual.convert("RGB"))
    return out


def _generation_kwargs(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """lmms-eval's generation settings as ``generate`` arguments (greedy unless a temperature > 0 is asked for)."""
    out: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 1024))}
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
    out["do_sample"] = do_sample
    if do_sample:
        out["temperature"] = temperature if temperature > 0 else 1.0
        if gen_kwargs.get("top_p") is not None:
            out["top_p"] = float(gen_kwargs["top_p"])
    num_beams = gen_kwargs.get("num_beams")
    if num_beams is not None and int(num_beams) > 1:
        out["num_beams"] = int(num_beams)
    return out


def _stop_strings(gen_kwargs: dict[str, Any]) -> list[str]:
    until = gen_kwargs.get("until")
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    return [str(u) for u in until]


def _arch_of(model: Any) -> vd_flops.ArchSpec | None:
    try:
        return vd_flops.ArchSpec.from_config(model.config)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        logger.warning("no FLOPs for this architecture (%s)", err)
        return None


def _per_sample_tflops(arch: Any, report: Any, attention_mask: torch.Tensor) -> list[float] | None:
    """Per-sample prefill TFLOPs whose sum is the run report's batch total.

    The LLM layers and the LM head depend on each sample's own kept tokens and text length and are computed per
    sample exactly; the vision tower and projector part of the batch (the rest of the report's total) is shared in
    proportion to each sample's visual tokens (exact for equal-size images, e.g. every LLaVA-1.5 batch).
    """
    if arch is None or not report.flops:
        return None
    llm = []
    weights = []
    for row, sample in enumerate(report.samples):
        image_tokens = sum(im.image_tokens for im in sample.images)
        text = int(attention_mask[row].sum()) - image_tokens
        if sample.images:
            per_layer = [
                sum(col) for col in zip(*(im.tokens_per_layer() for im in sample.images), strict=True)
            ]
        else:
            per_layer = [0] * arch.num_layers
        cost = vd_flops.prefill_flops(
            arch, visual_tokens_per_layer=per_layer, text_tokens=text, vision_tokens=[], projector_tokens=0
        )
        llm.append(cost.tflops)
        weights.append(image_tokens)
    rest = max(report.flops["tflops"] - sum(llm), 0.0)
    total_weight = sum(weights)
    return [
        value + (rest * weight / total_weight if total_weight else 0.0)
        for value, weight in zip(llm, weights, strict=True)
    ]

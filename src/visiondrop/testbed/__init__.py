"""The pocket benchmark: a small LLaVA-1.5-shaped LVLM trained on synthetic scenes.

No real LVLM can be downloaded in the project's CI, so ``visiondrop`` ships its own: a
:class:`transformers.LlavaForConditionalGeneration` (CLIP ViT with [CLS], 576 visual tokens, 8-layer
Llama) trained from scratch on the seeded scenes of :mod:`visiondrop.testbed.scenes`. It loads exactly
like ``llava-hf/llava-1.5-7b-hf``::

    from visiondrop.testbed import DEFAULT_MODEL_PATH, evaluate, load_testbed
    from visiondrop.testbed.scenes import make_split

    model, processor = load_testbed()
    print(evaluate(model, processor, make_split("test", 120)))

Modules
-------
scenes
    Seeded scene/question generator (splits never overlap).
processor
    Word-level tokenizer and :class:`transformers.LlavaProcessor` builder.
train
    ``python -m visiondrop.testbed.train --out DIR``: the training recipe.
evaluate
    ``python -m visiondrop.testbed.evaluate --split test --n 500``: per-type accuracy.
coverage
    ``python -m visiondrop.testbed.coverage --budget 64 --type count``: which objects keep a patch per stage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..weights import check_safetensors
from .processor import build_prompt, unknown_words, warn_unknown_words
from .scenes import QUESTION_TYPES, Sample, make_sample, make_split

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parent / "model"
"""Folder of the shipped model (``config.json``, ``model.safetensors``, processor files)."""

GenerateFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]

__all__ = [
    "DEFAULT_MODEL_PATH",
    "QUESTION_TYPES",
    "GenerateFn",
    "Sample",
    "build_prompt",
    "evaluate",
    "first_word",
    "load_testbed",
    "make_sample",
    "make_split",
    "unknown_words",
    "warn_unknown_words",
]

_WORD_RE = re.compile(r"\w+")


def load_testbed(dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> tuple[Any, Any]:
    """Load the shipped testbed model and processor (offline; nothing is downloaded).

    Parameters
    ----------
    dtype : torch.dtype, optional
        Parameter dtype of the model (``torch.float32`` by default; ``torch.bfloat16`` halves memory).
    path : str or pathlib.Path, optional
        Model folder; :data:`DEFAULT_MODEL_PATH` when ``None``.

    Returns
    -------
    model : transformers.LlavaForConditionalGeneration
        In eval mode.
    processor : transformers.LlavaProcessor
        With ``tokenizer.padding_side == "left"`` (batched generation).

    Raises
    ------
    FileNotFoundError
        If the folder holds no ``config.json``.
    ValueError
        If its weights are not safetensors (:func:`visiondrop.weights.check_safetensors`).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(path) if path is not None else DEFAULT_MODEL_PATH
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no testbed model in {folder} (config.json missing)")
    check_safetensors(folder)  # never a pickle: refused in one line before anything is read
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    model.eval()
    return model, processor


def first_word(text: str) -> str:
    """First word (``\\w+`` run) of ``text`` in lower case, or ``""`` when there is none."""
    match = _WORD_RE.search(text.lower())
    return match.group(0) if match else ""


# Tokens generated per question: the one-word answer and ``</s>``.
ANSWER_TOKENS = 2


def _default_generate(model: Any, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)


@torch.no_grad()
def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    batch_size: int = 16,
    generate_fn: GenerateFn | None = None,
    progress: bool = True,
    max_new_tokens: int = ANSWER_TOKENS,
) -> dict[str, Any]:
    """Greedy exact-match accuracy of ``model`` on ``samples``.

    Prompts are built with :func:`build_prompt`, batched with LEFT padding through ``processor`` and
    answered by ``model.generate(**inputs, max_new_tokens=2, do_sample=False)``; the first generated word
    is compared with :attr:`Sample.answer`.

    Parameters
    ----------
    model : transformers.LlavaForConditionalGeneration
        The model (possibly wrapped by a pruning context: only ``model.generate`` is called).
    processor : transformers.LlavaProcessor
        The testbed processor; its tokenizer's ``padding_side`` is set to ``"left"`` for the call and
        restored afterwards.
    samples : Sequence[Sample]
        Benchmark samples.
    batch_size : int, optional
        Samples per ``generate`` call.
    generate_fn : callable, optional
        ``generate_fn(model, inputs) -> sequences`` replacing the default
        ``model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)``; ``inputs`` holds
        ``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)`` and ``pixel_values`` ``(B, 3, 336, 336)``
        and the result must be ``(B, T + new)`` token ids, as ``generate`` returns for decoder-only models.
    progress : bool, optional
        Show a tqdm progress bar.
    max_new_tokens : int, optional
        Tokens generated per sample (the answer word and ``</s>``).

    Returns
    -------
    dict
        ``"accuracy"`` (float, overall), ``"n"`` (int), ``"per_type"`` (``{qtype: accuracy}``),
        ``"n_per_type"`` (``{qtype: count}``) and ``"predictions"`` (first generated word per sample).

    Raises
    ------
    ValueError
        If ``samples`` is empty or ``batch_size`` < 1.
    """
    if len(samples) == 0:
        raise ValueError("samples is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    # Left padding keeps every prompt's last token at the end, so the generated tokens line up.
    tokenizer.padding_side = "left"
    predictions: list[str] = []
    try:
        batches = range(0, len(samples), batch_size)
        for start in tqdm(batches, disable=not progress, desc="evaluate", unit="batch"):
            chunk = samples[start : start + batch_size]
            inputs = processor(
                images=[s.image for s in chunk],
                text=[build_prompt(s.question) for s in chunk],
                padding=True,
                return_tensors="pt",
            )
            if generate_fn is None:
                sequences = _default_generate(model, inputs, max_new_tokens)
            else:
                sequences = generate_fn(model, inputs)
            new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            predictions.extend(first_word(t) for t in texts)
    finally:
        tokenizer.padding_side = old_side

    hits: dict[str, list[bool]] = {}
    for sample, pred in zip(samples, predictions, strict=True):
        hits.setdefault(sample.qtype, []).append(pred == sample.answer)
    all_hits = [h for v in hits.values() for h in v]
    per_type = {t: sum(hits[t]) / len(hits[t]) for t in QUESTION_TYPES if t in hits}
    return {
        "accuracy": sum(all_hits) / len(all_hits),
        "n": len(all_hits),
        "per_type": per_type,
        "n_per_type": {t: len(hits[t]) for t in QUESTION_TYPES if t in hits},
        "predictions": predictions,
    }

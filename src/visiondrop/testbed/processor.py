"""Word-level tokenizer and LLaVA-1.5-style processor of the pocket benchmark LVLM.

The tokenizer is a ``tokenizers`` WordLevel model (lower-casing normaliser, ``Whitespace`` pre-tokenizer
that splits word runs from punctuation runs, ``<s>`` prepended by the post-processor) wrapped in
:class:`transformers.PreTrainedTokenizerFast`. The processor is a :class:`transformers.LlavaProcessor`
around a :class:`transformers.CLIPImageProcessorPil` configured like ``llava-hf/llava-1.5-7b-hf``
(336 px, resize + centre crop, CLIP mean/std, ``patch_size=14``, ``num_additional_image_tokens=1``,
``vision_feature_select_strategy="default"``), so one ``<image>`` in the prompt expands to 576
placeholder tokens.
"""

from __future__ import annotations

import logging
import re

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from .scenes import IMAGE_SIZE, PATCH_SIZE, VOCAB

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "NUM_IMAGE_TOKENS",
    "PAD_TOKEN",
    "PROMPT_TEMPLATE",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "build_image_processor",
    "build_processor",
    "build_prompt",
    "build_tokenizer",
    "tokenizer_vocab",
    "unknown_words",
    "warn_unknown_words",
]

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)

PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
"""The LLaVA-1.5 single-turn prompt; the model continues with the one-word answer and ``</s>``."""

# Words of the prompt template itself (the question words come from the scene vocabulary).
_PROMPT_WORDS: tuple[str, ...] = ("user", "assistant", ":")

NUM_IMAGE_TOKENS: int = (IMAGE_SIZE // PATCH_SIZE) ** 2
"""Placeholder tokens per image after expansion (24 * 24 = 576, [CLS] dropped by the "default" strategy)."""

_WORD_RE = re.compile(r"\w+|[^\w\s]+")

# Renders a conversation as "USER: <image>\n{text} ASSISTANT:" (images first, then text, like the
# llava-1.5-hf template). Written for this project.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def tokenizer_vocab() -> dict[str, int]:
    """Token-to-id map: special tokens first (``<pad>`` = 0), then prompt words, then scene words.

    Returns
    -------
    dict[str, int]
        The WordLevel vocabulary.
    """
    words = list(SPECIAL_TOKENS) + list(_PROMPT_WORDS) + [w for w in VOCAB if w not in _PROMPT_WORDS]
    return {w: i for i, w in enumerate(words)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the testbed tokenizer from scratch.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        Word-level tokenizer with ``bos``/``eos``/``pad``/``unk`` set and ``<image>`` registered as the
        ``image_token`` extra special token; ``tokenizer("...")`` prepends ``<s>``.
    """
    vocab = tokenizer_vocab()
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    # normalized=False: special tokens are matched on the raw text, before lower-casing/splitting.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_image_processor() -> CLIPImageProcessorPil:
    """CLIP image processor (PIL backend) configured as in llava-1.5: 336 px, centre crop, CLIP mean/std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


def build_processor() -> LlavaProcessor:
    """Build the testbed :class:`transformers.LlavaProcessor`.

    Returns
    -------
    transformers.LlavaProcessor
        ``processor(images=[img], text=[prompt], return_tensors="pt")`` gives ``input_ids`` of shape
        ``(1, T)`` with the ``<image>`` expanded to 576 ids, ``attention_mask`` ``(1, T)`` and
        ``pixel_values`` ``(1, 3, 336, 336)``.
    """
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_prompt(question: str) -> str:
    """The model prompt for one question.

    Parameters
    ----------
    question : str
        Question text, e.g. ``"what color is the circle?"``.

    Returns
    -------
    str
        ``"USER: <image>\\n{question} ASSISTANT:"``.
    """
    return PROMPT_TEMPLATE.format(question=question.strip())


def unknown_words(text: str, tokenizer: PreTrainedTokenizerFast | None = None) -> list[str]:
    """Words of ``text`` that the tokenizer maps to ``<unk>``.

    Parameters
    ----------
    text : str
        Free text (a question or a full prompt); special tokens such as ``<image>`` are ignored.
    tokenizer : transformers.PreTrainedTokenizerFast, optional
        Tokenizer to check against; the testbed vocabulary when ``None``.

    Returns
    -------
    list[str]
        Unknown words in order of appearance (lower case, without duplicates).
    """
    vocab = tokenizer.get_vocab() if tokenizer is not None else tokenizer_vocab()
    stripped = text
    for special in SPECIAL_TOKENS:
        stripped = stripped.replace(special, " ")
    unknown: list[str] = []
    for word in _WORD_RE.findall(stripped.lower()):
        if word not in vocab and word not in unknown:
            unknown.append(word)
    return unknown


def warn_unknown_words(text: str, tokenizer: PreTrainedTokenizerFast | None = None) -> list[str]:
    """Log a warning listing the out-of-vocabulary words of ``text`` (they become ``<unk>``).

    Parameters
    ----------
    text : str
        Question or prompt.
    tokenizer : transformers.PreTrainedTokenizerFast, optional
        Tokenizer to check against.

    Returns
    -------
    list[str]
        The unknown words (empty when all are known).
    """
    unknown = unknown_words(text, tokenizer)
    if unknown:
        logger.warning(
            "words outside the testbed vocabulary map to <unk> and will confuse the model: %s", unknown
        )
    return unknown

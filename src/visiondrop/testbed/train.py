"""Train the pocket benchmark LVLM from scratch on CPU.

Usage::

    python -m visiondrop.testbed.train --out DIR [--stage-a-steps N ...]

The model is a real :class:`transformers.LlavaForConditionalGeneration` (CLIP ViT with [CLS] + two-layer
GELU projector + Llama decoder), trained in two stages:

A. **Vision pre-training.** Only the vision tower learns, with heads that are discarded afterwards:

   * a [CLS] head on the final pooled [CLS] (``pooler_output``): multi-label presence of every colour,
     shape and colour-shape pair (BCE), number of shapes and tag digit (CE). Like CLIP's contrastive
     objective, it makes [CLS] a global summary, so [CLS]-attention (used by pruning methods that rank
     tokens by [CLS] attention) concentrates on the objects and the tag;
   * a dense head on the patch tokens of the LLaVA feature layer (``hidden_states[-2]``): per-patch
     colour, shape, tag digit and "object centre" (CE). It makes the features the LLM reads linearly
     informative, which is what lets a CPU-sized budget reach high accuracy.

B. **Question answering.** Projector and LLM learn to answer (the vision tower stays frozen by default,
   ``--vision-lr-mult 0``): cross-entropy on the answer word and ``</s>`` only. Each scene is asked up to 16
   questions (:func:`visiondrop.testbed.scenes.training_questions`); since the image tokens come before the
   question and attention is causal, the prefix ``<s> USER : <image>*576`` is run once per scene and its
   key/value cache is shared by the question suffixes (identical to full forward passes, tested).
   Three measured aids make the binding questions ("the colour of *the circle*") learnable in CPU time:
   a curriculum on the number of objects (one object for ``--curriculum-single-steps``, then a ramp), an
   attention curriculum that first hides part of the background tokens (``--mask-steps``), and an
   auxiliary loss on one attention head (:func:`attention_loss`, ``--attn-weight``): without it colour and
   shape stayed near "a colour that is in the scene" after 1,200 steps.

All randomness is seeded; every hyper-parameter is a CLI flag whose default is the value used for the
shipped model (see ``model/TRAINING.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from . import scenes as S
from .processor import NUM_IMAGE_TOKENS, build_processor, build_prompt

__all__ = [
    "DENSE_SIZES",
    "N_COLORS",
    "N_PAIRS",
    "N_PRESENCE",
    "N_SHAPES",
    "STAGE_B_OFFSET",
    "TrainConfig",
    "VisionAuxHeads",
    "attention_loss",
    "build_model",
    "check_prefix_sharing",
    "curriculum_prefix_mask",
    "grounding_loss",
    "main",
    "parse_args",
    "prefix_ids",
    "qa_logits",
    "qa_loss",
    "quick_eval",
    "referenced_label",
    "sincos_2d",
    "train_qa",
    "train_vision",
    "vision_aux_loss",
]

logger = logging.getLogger("visiondrop.testbed.train")

# Index offset of stage-B scenes in the train split, so the two stages never see the same scene.
STAGE_B_OFFSET = 10_000_000


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters (CLI flags are the field names with dashes)."""

    out: str = "out/testbed"
    seed: int = 0
    threads: int = 2
    adaptive_threads: bool = True
    workers: int = 1
    bf16: bool = True
    # vision tower (CLIP ViT with [CLS])
    vision_hidden: int = 128
    vision_layers: int = 6
    vision_heads: int = 4
    vision_mlp: int = 512
    # language model (Llama)
    text_hidden: int = 192
    text_layers: int = 8
    text_heads: int = 6
    text_kv_heads: int = 2
    text_mlp: int = 512
    # stage A: vision pre-training
    stage_a_steps: int = 350
    stage_a_batch: int = 32
    stage_a_lr: float = 2e-3
    stage_a_warmup: int = 30
    fg_weight: float = 5.0
    # stage B: question answering
    stage_b_steps: int = 1000
    stage_b_batch: int = 8
    stage_b_lr: float = 1e-3
    stage_b_warmup: int = 50
    vision_lr_mult: float = 0.0
    grounding_weight: float = 0.0
    attn_weight: float = 1.0
    attn_layer: int = 3
    curriculum_single_steps: int = 200
    curriculum_ramp_steps: int = 300
    mask_steps: int = 700
    weight_decay: float = 0.05
    clip: float = 1.0
    eval_every: int = 250
    eval_n: int = 240
    init_from: str = ""
    log_every: int = 20


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse CLI flags into a :class:`TrainConfig` (every field is a flag; defaults are the shipped run)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA-1.5-shaped model.

    Parameters
    ----------
    cfg : TrainConfig
        Sizes.
    processor : transformers.LlavaProcessor
        Testbed processor (vocabulary size and special-token ids come from its tokenizer).

    Returns
    -------
    transformers.LlavaForConditionalGeneration
        Model with ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``, its
        ``image_token_id`` the tokenizer's ``<image>`` id, and greedy generation defaults.
    """
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=S.IMAGE_SIZE,
        patch_size=S.PATCH_SIZE,
        projection_dim=cfg.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    model = LlavaForConditionalGeneration(config)
    _init_position_embedding(model)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=3,
    )
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position table (half the channels encode the row, half the column).

    Parameters
    ----------
    grid : int
        Patches per side ``G``.
    dim : int
        Channels ``D`` (a multiple of 4).

    Returns
    -------
    torch.Tensor
        ``(G * G, D)`` in row-major patch order.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    pos = torch.arange(grid, dtype=torch.float64)
    angles = pos[:, None] * freqs[None, :]  # (G, D/4)
    one_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (G, D/2)
    rows = one_axis[:, None, :].expand(grid, grid, dim // 2)
    cols = one_axis[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


def _init_position_embedding(model: LlavaForConditionalGeneration) -> None:
    """Initialise CLIP's learned position embedding with a 2-D sine-cosine table.

    Only the initial value changes (the embedding stays learned, the architecture stays CLIP): a random
    init made the ViT spend the whole stage-A budget without discovering the spatial layout (patch-level
    shape accuracy stayed at chance after 240 steps); the 2-D table makes "attend to my neighbours"
    available from step 0. [CLS] (index 0) starts at zero.
    """
    emb = model.model.vision_tower.embeddings.position_embedding
    with torch.no_grad():
        table = sincos_2d(S.GRID, emb.weight.shape[1])
        emb.weight[0].zero_()
        emb.weight[1:].copy_(table * 0.5)


N_COLORS = len(S.COLORS)
N_SHAPES = len(S.SHAPES)
N_PAIRS = N_COLORS * N_SHAPES
N_PRESENCE = N_COLORS + N_SHAPES + N_PAIRS
DENSE_SIZES = (N_COLORS + 1, N_SHAPES, len(S.DIGITS), 2)


class VisionAuxHeads(nn.Module):
    """Stage-A heads (discarded after stage A).

    Parameters
    ----------
    hidden : int
        Vision hidden size ``D``.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        # [CLS] head: presence logits (colours, shapes, pairs), count logits, digit logits.
        self.cls = nn.Linear(hidden, N_PRESENCE + len(S.COUNT_WORDS) + len(S.DIGITS))
        # Dense head: colour (none + 6), shape (6), digit (10), centre (2).
        self.dense_norm = nn.LayerNorm(hidden)
        self.dense = nn.Linear(hidden, sum(DENSE_SIZES))

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head logits.

        Parameters
        ----------
        pooled : torch.Tensor
            ``(B, D)`` post-layernorm final [CLS].
        patches : torch.Tensor
            ``(B, 576, D)`` patch tokens of the LLaVA feature layer.

        Returns
        -------
        cls_logits : torch.Tensor
            ``(B, N_PRESENCE + 5 + 10)``.
        dense_logits : torch.Tensor
            ``(B, 576, 7 + 6 + 10 + 2)``.
        """
        return self.cls(pooled), self.dense(self.dense_norm(patches))


def _vision_targets(scene: S.Scene) -> dict[str, torch.Tensor]:
    """Stage-A targets of one scene (see :class:`VisionAuxHeads`)."""
    color_names = list(S.COLORS)
    presence = torch.zeros(N_PRESENCE)
    for obj in scene.objects:
        c, s = color_names.index(obj.color), S.SHAPES.index(obj.shape)
        presence[c] = 1.0
        presence[N_COLORS + s] = 1.0
        presence[N_COLORS + N_SHAPES + c * N_SHAPES + s] = 1.0
    labels = S.patch_labels(scene)
    dense = np.stack([labels["color"], labels["shape"], labels["digit"], labels["center"]], axis=-1)
    return {
        "presence": presence,
        "count": torch.tensor(len(scene.objects) - 1),
        "digit": torch.tensor(int(scene.tag.digit)),
        "dense": torch.from_numpy(dense.reshape(S.GRID * S.GRID, 4)),
    }


def vision_aux_loss(
    heads: VisionAuxHeads,
    vision_out: Any,
    batch: dict[str, torch.Tensor],
    fg_weight: float = 5.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-A loss.

    Parameters
    ----------
    heads : VisionAuxHeads
        Auxiliary heads.
    vision_out : transformers.modeling_outputs.BaseModelOutputWithPooling
        CLIP vision output with ``hidden_states``.
    batch : dict[str, torch.Tensor]
        ``presence`` ``(B, N_PRESENCE)``, ``count`` ``(B,)``, ``digit`` ``(B,)``, ``dense`` ``(B, 576, 4)``.
    fg_weight : float, optional
        Loss weight of foreground patches relative to background ones (x4 for object centres).

    Returns
    -------
    loss : torch.Tensor
        Scalar.
    parts : dict[str, float]
        Loss components and dense accuracies for logging.
    """
    patches = vision_out.hidden_states[-2][:, 1:]
    cls_logits, dense_logits = heads(vision_out.pooler_output.float(), patches.float())
    pres = cls_logits[:, :N_PRESENCE]
    cnt = cls_logits[:, N_PRESENCE : N_PRESENCE + len(S.COUNT_WORDS)]
    dig = cls_logits[:, N_PRESENCE + len(S.COUNT_WORDS) :]
    loss_cls = (
        F.binary_cross_entropy_with_logits(pres, batch["presence"])
        + F.cross_entropy(cnt, batch["count"])
        + F.cross_entropy(dig, batch["digit"])
    )
    parts: dict[str, float] = {"cls": float(loss_cls.detach())}
    target = batch["dense"].reshape(-1, 4)  # columns: colour, shape, digit, centre (0 = none)
    color_logits, shape_logits, digit_logits, center_logits = dense_logits.reshape(
        -1, DENSE_SIZES[0] + DENSE_SIZES[1] + DENSE_SIZES[2] + DENSE_SIZES[3]
    ).split(DENSE_SIZES, dim=-1)
    # Colour (with "none" = objectness) and centre see every patch; foreground patches are rare (~10%,
    # centres ~1%), so they are up-weighted, otherwise the heads settle on "background everywhere".
    loss_dense = torch.zeros(())
    for name, logits, tgt, w in (
        ("color", color_logits, target[:, 0], fg_weight),
        ("center", center_logits, target[:, 3], 4 * fg_weight),
    ):
        weight = torch.where(tgt > 0, w, 1.0)
        per_patch = F.cross_entropy(logits, tgt, reduction="none")
        loss_dense = loss_dense + (per_patch * weight).sum() / weight.sum()
        fg = tgt > 0
        parts[f"acc_{name}"] = float((logits[fg].argmax(-1) == tgt[fg]).float().mean()) if fg.any() else 0.0
    # Shape and digit are only defined on object / tag patches: classify those patches only, so the
    # whole term pushes towards telling shapes (digits) apart.
    for name, logits, tgt in (("shape", shape_logits, target[:, 1]), ("digit", digit_logits, target[:, 2])):
        fg = tgt > 0
        if fg.any():
            loss_dense = loss_dense + F.cross_entropy(logits[fg], tgt[fg] - 1)
            parts[f"acc_{name}"] = float((logits[fg].argmax(-1) == tgt[fg] - 1).float().mean())
    parts["dense"] = float(loss_dense.detach())
    parts["cls_count"] = float((cnt.argmax(-1) == batch["count"]).float().mean())
    parts["cls_digit"] = float((dig.argmax(-1) == batch["digit"]).float().mean())
    return loss_cls + loss_dense, parts


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class _VisionDataset(Dataset):
    """Stage-A scenes: ``pixel_values`` ``(3, 336, 336)`` plus :func:`_vision_targets`."""

    def __init__(self, processor: LlavaProcessor, start: int, n: int, seed: int) -> None:
        self.image_processor = processor.image_processor
        self.start, self.n, self.seed = start, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        scene, _ = S.make_scene("train", self.start + i, self.seed)
        pixel_values = self.image_processor(scene.image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixel_values, **_vision_targets(scene)}


class _QADataset(Dataset):
    """Stage-B scenes, each with up to 16 questions (:func:`visiondrop.testbed.scenes.training_questions`).

    Items hold ``pixel_values`` ``(3, 336, 336)``, ``suffix`` ``(16, L)`` token ids of
    ``"{question} ASSISTANT: {answer} </s>"`` right-padded, ``suffix_mask`` ``(16, L)``, ``target_mask``
    ``(16, L)`` (True on the answer and ``</s>`` tokens), ``qtype`` ``(16,)`` (-1 on padding rows) and
    ``dense`` ``(576, 4)`` patch labels (see :func:`visiondrop.testbed.scenes.patch_labels`). The image
    prefix is computed once per scene, so the extra questions cost only their ~10 suffix tokens.

    Curriculum: the first ``single`` items have exactly one object (reading "the circle"'s colour needs
    no binding, so the LLM first learns to read attributes off the visual tokens); over the next ``ramp``
    items the maximum number of objects grows linearly to :data:`~visiondrop.testbed.scenes.MAX_OBJECTS`
    (binding), after which items follow the benchmark distribution. Without it the binding question
    types stayed at chance for 600+ steps.
    """

    max_suffix = 16
    max_questions = 16

    def __init__(
        self,
        processor: LlavaProcessor,
        split: str,
        start: int,
        n: int,
        seed: int,
        single: int = 0,
        ramp: int = 0,
    ) -> None:
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.split, self.start, self.n, self.seed = split, start, n, seed
        self.single, self.ramp = single, ramp

    def __len__(self) -> int:
        return self.n

    def encode(self, question: str, answer: str) -> tuple[list[int], int]:
        """Suffix ids of one question and the index of its first target token."""
        q_ids = self.tokenizer(question + " ASSISTANT:", add_special_tokens=False)["input_ids"]
        a_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return [*q_ids, *a_ids, self.tokenizer.eos_token_id], len(q_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        max_objects = S.MAX_OBJECTS
        if i < self.single:
            max_objects = 1
        elif i < self.single + self.ramp:
            max_objects = 2 + (S.MAX_OBJECTS - 1) * (i - self.single) // self.ramp
        scene, rng = S.make_scene(self.split, self.start + i, self.seed, max_objects)
        questions = S.training_questions(scene, rng)
        pixel_values = self.image_processor(scene.image, return_tensors="pt")["pixel_values"][0]
        Q, L = self.max_questions, self.max_suffix
        # Rows beyond the scene's questions are padding: empty suffix, no target, qtype -1.
        suffix = torch.full((Q, L), self.tokenizer.pad_token_id, dtype=torch.long)
        suffix_mask = torch.zeros(Q, L, dtype=torch.long)
        target_mask = torch.zeros(Q, L, dtype=torch.bool)
        qtype = torch.full((Q,), -1, dtype=torch.long)
        ref = torch.zeros(Q, dtype=torch.long)
        for k, q in enumerate(questions):
            ref[k] = referenced_label(scene, q)
            ids, first = self.encode(q.question, q.answer)
            suffix[k, : len(ids)] = torch.tensor(ids)
            suffix_mask[k, : len(ids)] = 1
            target_mask[k, first : len(ids)] = True
            qtype[k] = S.QUESTION_TYPES.index(q.qtype)
        return {
            "pixel_values": pixel_values,
            "suffix": suffix,
            "suffix_mask": suffix_mask,
            "target_mask": target_mask,
            "qtype": qtype,
            "ref": ref,
            "dense": _vision_targets(scene)["dense"],
        }


def referenced_label(scene: S.Scene, question: S.Question) -> int:
    """Which patches a question is about, as a patch-label value (the target of :func:`attention_loss`).

    Returns ``1 + colour index`` of the object the question names (colours are unique within a scene, so the
    colour column of :func:`visiondrop.testbed.scenes.patch_labels` marks exactly its patches), ``-1`` for the
    tag (``detail``), and ``0`` when no single object is named (``count``, an absent ``exists`` pair).
    """
    if question.qtype == "detail":
        return -1
    if question.qtype == "count":
        return 0
    words = set(S._words(question.question))
    for obj in scene.objects:
        names = {obj.color, obj.shape}
        if question.qtype == "exists":
            if names <= words:
                return 1 + list(S.COLORS).index(obj.color)
        elif names & words:
            return 1 + list(S.COLORS).index(obj.color)
    return 0


def attention_loss(
    layer: nn.Module,
    prefix_in: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
    suffix_in: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
    key_mask: torch.Tensor,
    rows_pos: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Attention supervision: head 0 of ``layer``, at the answer-predicting position, should look at the object.

    Content-based lookup over 576 visual tokens ("the colour of *the circle*") is what a from-scratch LLM finds
    hardest: with attention uniform at the start, the named object is a ~2% part of what the answer position
    reads, and the binding question types plateaued near "a colour that is in the scene". This loss, ``-log`` of
    the attention mass query head 0 of ``layer`` puts on the named object's patches (training only), gives that
    head a direct signal; the other heads stay free.

    Parameters
    ----------
    layer : nn.Module
        The Llama decoder layer.
    prefix_in, suffix_in : (hidden, (cos, sin))
        What ``layer`` received in the prefix call ``(B, P, D)`` and in the suffix call ``(B * Q, L, D)``.
    key_mask : torch.Tensor
        ``(B * Q, P + L)`` bool, keys each row's answer position may attend to.
    rows_pos : torch.Tensor
        ``(B * Q,)`` suffix index of the answer-predicting position of each row.
    target : torch.Tensor
        ``(B * Q, P)`` bool, the named object's visual tokens; rows without any are skipped.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    d = attn.head_dim
    valid = target.any(-1)
    if not valid.any():
        return torch.zeros(())

    def project(
        hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor
    ) -> torch.Tensor:
        x = F.linear(layer.input_layernorm(hidden), weight[:d]).float()[:, None]  # head 0: (N, 1, T, d)
        cos, sin = rope
        x, _ = apply_rotary_pos_emb(x, x, cos.float(), sin.float())
        return x[:, 0]

    n = rows_pos.shape[0]
    q_rep = n // prefix_in[0].shape[0]
    k_prefix = project(*prefix_in, attn.k_proj.weight).repeat_interleave(q_rep, dim=0)  # (N, P, d)
    k_suffix = project(*suffix_in, attn.k_proj.weight)  # (N, L, d)
    rows = torch.arange(n)
    q = project(*suffix_in, attn.q_proj.weight)[rows, rows_pos]  # (N, d)
    keys = torch.cat([k_prefix, k_suffix], dim=1)
    logits = torch.einsum("nd,ntd->nt", q, keys) / math.sqrt(d)
    probs = torch.softmax(logits.masked_fill(~key_mask, float("-inf")), dim=-1)
    mass = probs[:, : target.shape[1]].mul(target).sum(-1)[valid]
    return -torch.log(mass + 1e-6).mean()


def _loader(dataset: Dataset, batch: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
    # Order is fixed (no shuffling needed: every scene is fresh), so runs are reproducible.
    return iter(DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers, drop_last=True))


def prefix_ids(processor: LlavaProcessor) -> torch.Tensor:
    """Token ids shared by every prompt up to the last image token: ``<s> user : <image>*576``.

    Returns
    -------
    torch.Tensor
        ``(P,)`` long tensor, ``P = 3 + 576``.
    """
    text = "USER: " + processor.image_token * NUM_IMAGE_TOKENS
    return torch.tensor(processor.tokenizer(text)["input_ids"])


# ----------------------------------------------------------------------------------------------
# Prefix-shared QA forward
# ----------------------------------------------------------------------------------------------


def qa_logits(
    model: LlavaForConditionalGeneration,
    prefix: torch.Tensor,
    pixel_values: torch.Tensor,
    suffix: torch.Tensor,
    suffix_mask: torch.Tensor,
    vision_grad: bool,
    prefix_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the question suffixes, with the image prefix computed once per scene.

    Parameters
    ----------
    model : transformers.LlavaForConditionalGeneration
        The LVLM.
    prefix : torch.Tensor
        ``(P,)`` shared prefix ids (see :func:`prefix_ids`).
    pixel_values : torch.Tensor
        ``(B, 3, 336, 336)``.
    suffix : torch.Tensor
        ``(B, Q, L)`` suffix ids, right-padded.
    suffix_mask : torch.Tensor
        ``(B, Q, L)`` 1 on real suffix tokens.
    vision_grad : bool
        Whether gradients flow into the vision tower.
    prefix_mask : torch.Tensor, optional
        ``(B, P)`` 1 for prefix tokens that may be attended to, 0 for hidden ones (training-time
        attention curriculum); all visible when ``None``.

    Returns
    -------
    logits : torch.Tensor
        ``(B * Q, L, V)``; position ``t`` predicts suffix token ``t + 1``.
    image_embeds : torch.Tensor
        ``(B, 576, D_text)`` projected visual tokens (input of the LLM).
    """
    inner = model.model
    B, Q, L = suffix.shape
    P = prefix.shape[0]
    ids = prefix.unsqueeze(0).expand(B, P)
    with nullcontext() if vision_grad else torch.no_grad():
        vis = inner.vision_tower(pixel_values, output_hidden_states=True)
        feats = vis.hidden_states[model.config.vision_feature_layer][:, 1:]  # (B, 576, Dv), [CLS] dropped
    image_embeds = inner.multi_modal_projector(feats)  # (B, 576, Dt)
    embeds = inner.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))
    if prefix_mask is None:
        prefix_mask = torch.ones(B, P, dtype=torch.long)
    # Explicit positions: hidden tokens must not shift the positions of the visible ones.
    prefix_pos = torch.arange(P).unsqueeze(0).expand(B, P)
    out = inner.language_model(
        inputs_embeds=embeds, attention_mask=prefix_mask, position_ids=prefix_pos, use_cache=True
    )
    cache = out.past_key_values
    # Every question of a scene attends to the same image prefix: repeat its K/V per question
    # (repeat_interleave is differentiable, so gradients of all questions reach the prefix).
    cache.batch_repeat_interleave(Q)
    flat = suffix.reshape(B * Q, L)
    flat_mask = suffix_mask.reshape(B * Q, L)
    attn = torch.cat([prefix_mask.to(flat_mask.dtype).repeat_interleave(Q, dim=0), flat_mask], dim=1)
    pos = (P + torch.arange(L)).unsqueeze(0).expand(B * Q, L)
    hidden = inner.language_model(
        input_ids=flat, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
    ).last_hidden_state
    return model.lm_head(hidden), image_embeds


def curriculum_prefix_mask(
    prefix: torch.Tensor,
    image_token_id: int,
    dense: torch.Tensor,
    visible: float,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """Attention curriculum: hide a random part of the background visual tokens.

    With 576 visual tokens and attention that starts uniform, the answer signal of a 20-pixel object is
    a ~1% component of what the last token reads, and the binding question types did not leave chance
    level in 600+ steps. Hiding background tokens early leaves the LLM a few dozen candidates (objects,
    tag, text); the visible fraction then grows to 1, after which training is on the unmodified input.

    Parameters
    ----------
    prefix : torch.Tensor
        ``(P,)`` prefix ids.
    image_token_id : int
        Id of ``<image>``.
    dense : torch.Tensor
        ``(B, 576, 4)`` patch labels; object (colour > 0) and tag (digit > 0) patches are always visible.
    visible : float
        Probability that a background visual token stays visible.
    generator : torch.Generator
        Source of randomness (seeded, for reproducibility).

    Returns
    -------
    torch.Tensor or None
        ``(B, P)`` long mask, or ``None`` when ``visible >= 1``.
    """
    if visible >= 1.0:
        return None
    B = dense.shape[0]
    image = prefix == image_token_id  # (P,)
    keep_bg = torch.rand(B, int(image.sum()), generator=generator) < visible
    foreground = (dense[..., 0] > 0) | (dense[..., 2] > 0)
    mask = torch.ones(B, prefix.shape[0], dtype=torch.long)
    mask[:, image] = (keep_bg | foreground).long()
    return mask


def qa_loss(logits: torch.Tensor, suffix: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer and ``</s>`` tokens only.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, L, V)`` from :func:`qa_logits`.
    suffix : torch.Tensor
        ``(N, L)`` suffix ids.
    target_mask : torch.Tensor
        ``(N, L)`` True on target tokens.

    Returns
    -------
    torch.Tensor
        Scalar mean loss over target tokens.
    """
    pred = logits[:, :-1].float()
    tgt = suffix[:, 1:]
    sel = target_mask[:, 1:]
    return F.cross_entropy(pred[sel], tgt[sel])


def grounding_loss(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    image_embeds: torch.Tensor,
    dense: torch.Tensor,
    temperature: float = 10.0,
) -> torch.Tensor:
    """Align visual tokens with the word embeddings of what they show (stage-B auxiliary loss).

    Each object patch's projected token should be closest (cosine) to the input embedding of its
    colour word among the colour words (background patches: to ``<unk>``), and of its shape word among
    the shape words; tag patches to their digit. The question words ("circle", "red") then already look like the visual tokens they
    refer to, which is what the binding questions (color/shape/exists) need: without it those stayed at
    chance for 1100 steps while detail and count were learned.

    Parameters
    ----------
    model : transformers.LlavaForConditionalGeneration
        The LVLM (its input embedding matrix is used).
    processor : transformers.LlavaProcessor
        For word ids.
    image_embeds : torch.Tensor
        ``(B, 576, D)`` projected visual tokens.
    dense : torch.Tensor
        ``(B, 576, 4)`` patch labels (colour, shape, digit, centre; 0 = none).
    temperature : float, optional
        Scale of the cosine similarities.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    tok = processor.tokenizer
    emb = model.get_input_embeddings().weight
    tokens = F.normalize(image_embeds.float().reshape(-1, image_embeds.shape[-1]), dim=-1)
    target = dense.reshape(-1, 4)
    # Colour column: background patches are a 7th class whose "word" is <unk> (never a real input), so
    # every background token is pulled towards one direction. The LLM sees RMS-normalised tokens, so
    # the background becomes uniform and the object tokens stand out even under uniform attention.
    ids = torch.tensor(tok.convert_tokens_to_ids([tok.unk_token, *S.COLORS]))
    word_vecs = F.normalize(emb[ids].float(), dim=-1)  # (7, D)
    loss = F.cross_entropy(temperature * tokens @ word_vecs.T, target[:, 0])
    for column, words in ((1, list(S.SHAPES)), (2, list(S.DIGITS))):
        fg = target[:, column] > 0
        if not fg.any():
            continue
        ids = torch.tensor(tok.convert_tokens_to_ids(words))
        word_vecs = F.normalize(emb[ids].float(), dim=-1)  # (W, D)
        scores = temperature * tokens[fg] @ word_vecs.T
        loss = loss + F.cross_entropy(scores, target[fg, column] - 1)
    return loss


def check_prefix_sharing(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> float:
    """Max |difference| between prefix-shared logits and a plain full forward (should be ~1e-5).

    Returns
    -------
    float
        Largest absolute logit difference at the answer position over the questions of one scene.
    """
    ds = _QADataset(processor, "validation", 0, 1, 0)
    item = ds[0]
    scene, rng = S.make_scene("validation", 0, 0)
    questions = S.training_questions(scene, rng)  # the questions of ``item``, in its row order
    model.eval()
    with torch.no_grad():
        shared, _ = qa_logits(
            model,
            prefix_ids(processor),
            item["pixel_values"][None],
            item["suffix"][None],
            item["suffix_mask"][None],
            vision_grad=False,
        )
        worst = 0.0
        for k, q in enumerate(questions):
            inputs = processor(images=[scene.image], text=[build_prompt(q.question)], return_tensors="pt")
            full = model(**inputs).logits[0, -1]
            n_prompt = int(item["target_mask"][k].nonzero()[0]) - 1  # last prompt token in the suffix
            worst = max(worst, float((full - shared[k, n_prompt]).abs().max()))
    model.train()
    return worst


@torch.no_grad()
def quick_eval(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, split: str, n: int, bf16: bool
) -> dict[str, float]:
    """Teacher-forced first-token accuracy on ``make_sample(split, i)`` for ``i < n`` (for monitoring).

    Greedy generation's first token is exactly this argmax, so it tracks the generated accuracy.
    """
    model.eval()
    tok = processor.tokenizer
    prefix = prefix_ids(processor)
    answer_ids = {a: tok.convert_tokens_to_ids(a) for a in S.ANSWERS}
    correct: dict[str, list[bool]] = {t: [] for t in S.QUESTION_TYPES}
    samples = S.make_split(split, n)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    for b in range(0, n, 16):
        chunk = samples[b : b + 16]
        pv = processor.image_processor([s.image for s in chunk], return_tensors="pt")["pixel_values"]
        encs = [tok(s.question + " ASSISTANT:", add_special_tokens=False)["input_ids"] for s in chunk]
        L = max(len(e) for e in encs)
        suffix = torch.full((len(chunk), 1, L), tok.pad_token_id, dtype=torch.long)
        smask = torch.zeros(len(chunk), 1, L, dtype=torch.long)
        for k, e in enumerate(encs):
            suffix[k, 0, : len(e)] = torch.tensor(e)
            smask[k, 0, : len(e)] = 1
        with ctx:
            logits, _ = qa_logits(model, prefix, pv, suffix, smask, vision_grad=False)
        for k, (s, e) in enumerate(zip(chunk, encs, strict=True)):
            pred = int(logits[k, len(e) - 1].argmax())
            correct[s.qtype].append(pred == answer_ids[s.answer])
    model.train()
    result = {t: float(np.mean(v)) for t, v in correct.items() if v}
    result["overall"] = float(np.mean([x for v in correct.values() for x in v]))
    return result


# ----------------------------------------------------------------------------------------------
# Training loops
# ----------------------------------------------------------------------------------------------


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _adapt_threads(cfg: TrainConfig) -> None:
    """Drop to one intra-op thread while other processes keep the CPU busy, go back to ``cfg.threads`` after.

    On a 2-core machine shared with other jobs, two OpenMP threads plus a foreign busy process make
    every parallel region wait for a descheduled thread: measured 4x slower than uncontended, whereas
    one thread is only 2x slower. Thread count does not change the maths, only the summation order.
    """
    if not cfg.adaptive_threads or cfg.threads <= 1:
        return
    mine = torch.get_num_threads()
    others = os.getloadavg()[0] - mine - 0.2  # 0.2: our data-loading worker
    want = 1 if others > 0.7 else cfg.threads
    if want != mine:
        torch.set_num_threads(want)
        logger.info("CPU load %.2f: using %d thread(s)", os.getloadavg()[0], want)


def _autocast(cfg: TrainConfig) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()


def train_vision(model: LlavaForConditionalGeneration, processor: LlavaProcessor, cfg: TrainConfig) -> None:
    """Stage A: pre-train the vision tower with the [CLS] and dense auxiliary heads."""
    if cfg.stage_a_steps <= 0:
        return
    vision = model.model.vision_tower
    heads = VisionAuxHeads(cfg.vision_hidden)
    params = [*vision.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.stage_a_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, cfg.stage_a_steps, cfg.stage_a_warmup)
    )
    data = _loader(
        _VisionDataset(processor, 0, cfg.stage_a_steps * cfg.stage_a_batch, cfg.seed),
        cfg.stage_a_batch,
        cfg.workers,
    )
    vision.train()
    t0 = time.time()
    logger.info("stage A: %d steps x %d images", cfg.stage_a_steps, cfg.stage_a_batch)
    for step in range(cfg.stage_a_steps):
        batch = next(data)
        with _autocast(cfg):
            out = vision(batch["pixel_values"], output_hidden_states=True)
            loss, parts = vision_aux_loss(heads, out, batch, cfg.fg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        if step % 5 == 0:
            _adapt_threads(cfg)
        if step % cfg.log_every == 0 or step == cfg.stage_a_steps - 1:
            elapsed = time.time() - t0
            logger.info(
                "A step %d/%d loss %.4f %s | %.1f img/s, %.1f min",
                step + 1,
                cfg.stage_a_steps,
                float(loss.detach()),
                " ".join(f"{k} {v:.3f}" for k, v in parts.items()),
                (step + 1) * cfg.stage_a_batch / elapsed,
                elapsed / 60,
            )
    logger.info("stage A done in %.1f min", (time.time() - t0) / 60)


def train_qa(model: LlavaForConditionalGeneration, processor: LlavaProcessor, cfg: TrainConfig) -> None:
    """Stage B: train projector + LLM (+ vision at ``vision_lr_mult``) on question answering."""
    if cfg.stage_b_steps <= 0:
        return
    vision_params = list(model.model.vision_tower.parameters())
    vision_ids = {id(p) for p in vision_params}
    other = [p for p in model.parameters() if id(p) not in vision_ids]
    groups: list[dict[str, Any]] = [{"params": other, "lr": cfg.stage_b_lr}]
    vision_grad = cfg.vision_lr_mult > 0
    for p in vision_params:
        p.requires_grad_(vision_grad)
    if vision_grad:
        groups.append({"params": vision_params, "lr": cfg.stage_b_lr * cfg.vision_lr_mult})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, cfg.stage_b_steps, cfg.stage_b_warmup)
    )
    data = _loader(
        _QADataset(
            processor,
            "train",
            STAGE_B_OFFSET,
            cfg.stage_b_steps * cfg.stage_b_batch,
            cfg.seed,
            single=cfg.curriculum_single_steps * cfg.stage_b_batch,
            ramp=cfg.curriculum_ramp_steps * cfg.stage_b_batch,
        ),
        cfg.stage_b_batch,
        cfg.workers,
    )
    prefix = prefix_ids(processor)
    mask_gen = torch.Generator().manual_seed(cfg.seed)
    layer_inputs: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
    hook = None
    if cfg.attn_weight > 0:
        supervised = model.model.language_model.layers[cfg.attn_layer]

        def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            layer_inputs.append((hidden, kwargs["position_embeddings"]))

        hook = supervised.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        image_slots = prefix == model.config.image_token_id
        all_params = [p for g in groups for p in g["params"]]
        model.train()
        t0 = time.time()
        logger.info("stage B: %d steps x %d scenes x <= 16 questions", cfg.stage_b_steps, cfg.stage_b_batch)
        run_loss, run_ground = 0.0, 0.0
        run_hits, run_counts = np.zeros(len(S.QUESTION_TYPES)), np.zeros(len(S.QUESTION_TYPES))
        for step in range(cfg.stage_b_steps):
            batch = next(data)
            layer_inputs.clear()  # what validation calls left behind
            with _autocast(cfg):
                visible = min(1.0, step / cfg.mask_steps) if cfg.mask_steps > 0 else 1.0
                prefix_mask = curriculum_prefix_mask(
                    prefix, model.config.image_token_id, batch["dense"], visible, mask_gen
                )
                logits, image_embeds = qa_logits(
                    model,
                    prefix,
                    batch["pixel_values"],
                    batch["suffix"],
                    batch["suffix_mask"],
                    vision_grad,
                    prefix_mask,
                )
                loss_qa = qa_loss(logits, batch["suffix"].flatten(0, 1), batch["target_mask"].flatten(0, 1))
                loss_ground = torch.zeros(())
                if cfg.grounding_weight > 0:
                    loss_ground = grounding_loss(model, processor, image_embeds, batch["dense"])
                loss = loss_qa + cfg.grounding_weight * loss_ground
                loss_attn = torch.zeros(())
                if cfg.attn_weight > 0:
                    B, Q, L = batch["suffix"].shape
                    tm = batch["target_mask"].flatten(0, 1)
                    rows_pos = (tm.float().argmax(-1) - 1).clamp(min=0)
                    pm = (
                        prefix_mask
                        if prefix_mask is not None
                        else torch.ones(B, prefix.shape[0], dtype=torch.long)
                    )
                    key_mask = torch.cat(
                        [
                            pm.bool().repeat_interleave(Q, dim=0),
                            (torch.arange(L)[None] <= rows_pos[:, None])
                            & batch["suffix_mask"].flatten(0, 1).bool(),
                        ],
                        dim=1,
                    )
                    dense = batch["dense"]  # (B, 576, 4)
                    ref = batch["ref"]  # (B, Q)
                    on_object = (dense[:, None, :, 0] == ref[..., None]) & (ref[..., None] > 0)
                    on_tag = (dense[:, None, :, 2] > 0) & (ref[..., None] == -1)
                    target = torch.zeros(B, Q, prefix.shape[0], dtype=torch.bool)
                    target[..., image_slots] = on_object | on_tag
                    target = target.flatten(0, 1) & tm.any(-1, keepdim=True)
                    loss_attn = attention_loss(
                        supervised, layer_inputs[0], layer_inputs[-1], key_mask, rows_pos, target
                    )
                    loss = loss + cfg.attn_weight * loss_attn
                layer_inputs.clear()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(all_params, cfg.clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                # answer-token accuracy per type (first target token of each real question)
                tm = batch["target_mask"].flatten(0, 1)
                valid = tm.any(-1)
                first = tm.float().argmax(-1)
                rows = torch.arange(tm.shape[0])
                pred = logits[rows, (first - 1).clamp(min=0)].argmax(-1)
                hit = pred == batch["suffix"].flatten(0, 1)[rows, first]
                qtypes = batch["qtype"].flatten()
                for t in range(len(S.QUESTION_TYPES)):
                    sel = valid & (qtypes == t)
                    run_hits[t] += float(hit[sel].sum())
                    run_counts[t] += float(sel.sum())
            run_loss += float(loss_qa.detach())
            run_ground += float(loss_ground.detach()) + float(loss_attn.detach())
            if step % 5 == 0:
                _adapt_threads(cfg)
            if (step + 1) % cfg.log_every == 0 or step == cfg.stage_b_steps - 1:
                n = cfg.log_every if (step + 1) % cfg.log_every == 0 else (step + 1) % cfg.log_every
                elapsed = time.time() - t0
                logger.info(
                    "B step %d/%d qa-loss %.4f aux %.4f train-acc %s | %.2f scenes/s, %.1f min",
                    step + 1,
                    cfg.stage_b_steps,
                    run_loss / n,
                    run_ground / n,
                    " ".join(
                        f"{t} {h / max(c, 1):.2f}"
                        for t, h, c in zip(S.QUESTION_TYPES, run_hits, run_counts, strict=True)
                    ),
                    (step + 1) * cfg.stage_b_batch / elapsed,
                    elapsed / 60,
                )
                run_loss, run_ground = 0.0, 0.0
                run_hits, run_counts = np.zeros(len(S.QUESTION_TYPES)), np.zeros(len(S.QUESTION_TYPES))
            if cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or step == cfg.stage_b_steps - 1):
                acc = quick_eval(model, processor, "validation", cfg.eval_n, cfg.bf16)
                logger.info(
                    "B step %d validation (teacher-forced, n=%d): %s",
                    step + 1,
                    cfg.eval_n,
                    " ".join(f"{k} {v:.3f}" for k, v in acc.items()),
                )
                # A loadable checkpoint at every validation, so a run can be stopped early and still used.
                model.save_pretrained(Path(cfg.out) / "checkpoint", safe_serialization=True)
                processor.save_pretrained(Path(cfg.out) / "checkpoint")
    finally:
        if hook is not None:
            hook.remove()
    for p in vision_params:
        p.requires_grad_(True)
    logger.info("stage B done in %.1f min", (time.time() - t0) / 60)


def _setup_logging(out: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(out / "train_log.txt", mode="a")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: train and save model + processor into ``--out``."""
    cfg = parse_args(argv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    logger.info(
        "command: python -m visiondrop.testbed.train %s", " ".join(sys.argv[1:] if argv is None else argv)
    )
    logger.info("config: %s", json.dumps(dataclasses.asdict(cfg)))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    processor = build_processor()
    if cfg.init_from:
        from ..weights import check_safetensors

        check_safetensors(cfg.init_from)
        model = LlavaForConditionalGeneration.from_pretrained(
            cfg.init_from, dtype=torch.float32, use_safetensors=True
        )
        logger.info("initialised from %s", cfg.init_from)
    else:
        model = build_model(cfg, processor)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("parameters: %.2fM", n_params / 1e6)
    diff = check_prefix_sharing(model, processor)
    logger.info("prefix-sharing check: max |logit diff| vs full forward = %.2e", diff)
    if diff > 1e-3:
        raise RuntimeError(f"prefix-shared forward differs from the full forward by {diff}")

    t0 = time.time()
    train_vision(model, processor, cfg)
    t_a = time.time() - t0
    if cfg.stage_a_steps > 0:
        model.save_pretrained(out / "stage_a", safe_serialization=True)
    t1 = time.time()
    train_qa(model, processor, cfg)
    t_b = time.time() - t1
    logger.info(
        "wall time: stage A %.1f min, stage B %.1f min, total %.1f min", t_a / 60, t_b / 60, (t_a + t_b) / 60
    )

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "training_args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    logger.info("saved to %s", out)


if __name__ == "__main__":
    main()

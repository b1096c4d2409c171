"""FastV (Chen et al., ECCV 2024): after layer K, keep the image tokens the last prompt token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..schedule import Stage
from ..tokens import LLMTokens
from .base import MethodInfo, OneBoundaryMethod, register

__all__ = ["FastV"]


@register
@dataclass
class FastV(OneBoundaryMethod):
    """FastV: every layer before ``layer`` sees all image tokens; from ``layer`` on only the top ones remain.

    The rank is the attention the last prompt token gives each image token, averaged over heads. As everywhere in
    visiondrop it is computed from q/k (here those of the first pruned layer, index ``layer``), never from
    ``output_attentions``, so FastV runs under SDPA. The budget fixes how many tokens survive:
    ``(N * layer + n * (L - layer)) / L = budget`` in ``average`` mode, ``n = budget`` in ``input`` mode.

    Decoding: tokens are pruned once, at prefill, with the prompt's last token as the query (as in the paper); with
    ``generate(use_cache=False)`` every step re-runs the prefill with the newest token as the query, so its outputs
    differ from cached decoding by design.

    Parameters
    ----------
    layer : int
        K: the number of LLM layers that see every image token (the paper's default 2).
    """

    budget: int | float = 64
    budget_mode: str = "average"
    layer: int = 2

    name = "fastv"
    info = MethodInfo(
        stages="LLM",
        signal="text-guided",
        merges=False,
        paper="Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024",
    )

    def select_llm(self, tokens: LLMTokens, stage: Stage) -> ops.Selection:
        return ops.Selection(keep=ops.top_k_sorted(tokens.text_attention(), stage.dominant))

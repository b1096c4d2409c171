"""Measure the testbed model: ``python -m visiondrop.testbed.evaluate --split test --n 500``.

Prints overall and per-question-type greedy exact-match accuracy of the shipped model (or of
``--model DIR``) on the first ``n`` samples of a split.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence

import torch

from ..tools.common import torch_dtype
from . import DEFAULT_MODEL_PATH, evaluate, load_testbed
from .scenes import QUESTION_TYPES, SPLITS, make_split

__all__ = ["main"]

#: The ``--dtype`` names this command takes (the table behind them is :data:`visiondrop.tools.common.DTYPES`).
_DTYPE_CHOICES = ("bfloat16", "float32")


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """CLI entry point; returns the :func:`visiondrop.testbed.evaluate` result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--n", type=int, default=500, help="number of samples (indices 0..n-1)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH), help="model folder")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=_DTYPE_CHOICES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the result (without predictions) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    model, processor = load_testbed(dtype=torch_dtype(args.dtype), path=args.model)
    samples = make_split(args.split, args.n, seed=args.seed)
    t0 = time.time()
    result = evaluate(model, processor, samples, batch_size=args.batch_size)
    elapsed = time.time() - t0
    print(f"split={args.split} n={result['n']} seed={args.seed} model={args.model} dtype={args.dtype}")
    print(f"{'type':<8} {'n':>5} {'accuracy':>9}")
    for qtype in QUESTION_TYPES:
        if qtype in result["per_type"]:
            print(f"{qtype:<8} {result['n_per_type'][qtype]:>5} {result['per_type'][qtype]:>9.3f}")
    print(f"{'overall':<8} {result['n']:>5} {result['accuracy']:>9.3f}")
    print(f"({elapsed:.1f} s, {result['n'] / elapsed:.1f} samples/s)")
    if args.json:
        summary = {k: v for k, v in result.items() if k != "predictions"}
        summary.update(split=args.split, seed=args.seed, model=args.model)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return result


if __name__ == "__main__":
    main()

"""Which scene objects survive pruning, and what the model answers then.

``python -m visiondrop.testbed.coverage --method visiondrop --budget 64 --type count --n 300`` takes the
questions of one type among the first ``n`` samples of a split, answers them unpruned and pruned, and prints

- accuracy unpruned and pruned;
- object coverage per stage: the share of the scenes' objects that still have at least one of their patches
  among the stage's dominant (unmerged) tokens (an object counts as present on a patch when
  :func:`visiondrop.testbed.scenes.patch_labels` puts its colour there);
- the answers: ``expected -> predicted`` counts, unpruned and pruned.

It separates "the method lost the object" (low coverage) from "the model misreads what was kept" (high
coverage, wrong answers): the README's pocket-benchmark section quotes it for the counting questions.
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..tools.common import parse_budget
from ..tools.evaluation import parse_method_spec
from . import ANSWER_TOKENS, _default_generate, evaluate, load_testbed
from .scenes import QUESTION_TYPES, SPLITS, Sample, make_split, patch_labels

__all__ = ["main", "measure", "object_coverage"]


def object_coverage(sample: Sample, image_report: Any) -> list[tuple[int, int]]:
    """Per stage of ``image_report``, ``(objects with a dominant patch kept, objects)`` for ``sample``'s scene.

    Objects are told apart by colour (colours are unique within a scene); an object none of whose patches
    carries its colour label (too small for the grid) is not counted.
    """
    labels = patch_labels(sample.scene)["color"].reshape(-1)
    objects = sorted(set(labels[labels > 0].tolist()))
    out = []
    for stage in image_report.stages:
        present = set(labels[np.asarray(stage.kept_patches(), dtype=np.int64)].tolist())
        out.append((sum(1 for o in objects if o in present), len(objects)))
    return out


def measure(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    method: Any,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Accuracy, per-stage object coverage and answer counts of ``samples`` unpruned and under ``method``."""
    unpruned = evaluate(model, processor, samples, batch_size=batch_size, progress=False)
    reports: list[Any] = []
    with method.apply(model) as run:

        def generate_and_keep_report(m: Any, inputs: dict) -> Any:
            out = _default_generate(m, inputs, ANSWER_TOKENS)
            reports.extend(sample.images[0] for sample in run.report.samples)
            return out

        pruned = evaluate(
            model,
            processor,
            samples,
            batch_size=batch_size,
            generate_fn=generate_and_keep_report,
            progress=False,
        )
    per_stage = np.zeros((len(reports[0].stages), 2), dtype=np.int64)
    for sample, image_report in zip(samples, reports, strict=True):
        per_stage += np.asarray(object_coverage(sample, image_report), dtype=np.int64)
    answers = {
        label: collections.Counter(
            f"{s.answer} -> {p}" for s, p in zip(samples, result["predictions"], strict=True)
        )
        for label, result in (("unpruned", unpruned), ("pruned", pruned))
    }
    return {
        "n": len(samples),
        "accuracy": {"unpruned": unpruned["accuracy"], "pruned": pruned["accuracy"]},
        "stages": [
            {
                "name": stage.name,
                "tokens": stage.tokens,
                "objects_kept": int(k),
                "objects": int(t),
                "coverage": float(k / t),
            }
            for stage, (k, t) in zip(reports[0].stages, per_stage, strict=True)
        ],
        "answers": {label: dict(sorted(c.items())) for label, c in answers.items()},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns what it prints (as a dict)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--method", default="visiondrop", help="a method spec, e.g. visiondrop:positions=compact"
    )
    parser.add_argument(
        "--budget", type=parse_budget, default=64, help="layer-average budget (int tokens or a fraction)"
    )
    parser.add_argument("--budget-mode", default="average", choices=("average", "input"))
    parser.add_argument("--type", default="count", choices=QUESTION_TYPES, help="question type")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument(
        "--n", type=int, default=300, help="first N samples of the split (then filtered by type)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped testbed)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    budget = args.budget
    spec = parse_method_spec(args.method)
    method = spec.build(budget, args.budget_mode)
    samples = [s for s in make_split(args.split, args.n, args.seed) if s.qtype == args.type]
    if not samples:
        raise SystemExit(f"no {args.type!r} questions among the first {args.n} samples of {args.split!r}")
    model, processor = load_testbed(path=args.model)
    result = {"method": spec.label, "budget": budget, "budget_mode": args.budget_mode, "type": args.type}
    result |= measure(model, processor, samples, method)
    acc = result["accuracy"]
    print(
        f"{spec.label} at {budget} ({args.budget_mode}), {result['n']} {args.type!r} questions of {args.split}"
    )
    print(f"accuracy: unpruned {acc['unpruned']:.3f}, pruned {acc['pruned']:.3f}")
    print("objects with at least one dominant patch kept, per stage:")
    for stage in result["stages"]:
        print(
            f"  {stage['name']:>9} ({stage['tokens']} tokens): "
            f"{stage['objects_kept']}/{stage['objects']} = {stage['coverage']:.1%}"
        )
    for label, counts in result["answers"].items():
        print(f"answers {label}: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

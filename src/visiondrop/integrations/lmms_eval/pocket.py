"""The lmms-eval task ``visiondrop_pocket``: its task class and functions (the YAML in ``tasks/visiondrop_pocket``).

A document holds what identifies a sample (split, index, dataset seed) and its question and answer; the image is
drawn again from the seed by :func:`visiondrop.testbed.make_sample`, so nothing but code ships with the task.

The dataset is made here, not downloaded: lmms-eval builds a task from its YAML through ``datasets.load_dataset``
(a hub id or files), and a task YAML may instead name its own task class (``class: !function ...``), which is what
``visiondrop_pocket.yaml`` does. :class:`PocketTask` only replaces ``download``: it builds the documents with
:meth:`datasets.Dataset.from_generator` (cached under ``HF_HOME`` like any dataset, no network).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lmms_eval.api.task import ConfigurableMessagesTask

from ...testbed import first_word, make_sample

__all__ = ["PocketTask", "doc_to_text", "doc_to_visual", "docs", "process_results"]


def docs(split: str = "test", n: int = 500, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The first ``n`` samples of ``split`` (dataset seed ``seed``) as documents, in index order.

    Parameters
    ----------
    split : str
        ``"train"``, ``"validation"`` or ``"test"``.
    n : int
        Number of samples.
    seed : int
        Dataset seed (``visiondrop eval --seed``).

    Yields
    ------
    dict
        ``split``, ``index``, ``seed``, ``question``, ``answer``, ``qtype``.
    """
    for index in range(n):
        sample = make_sample(split, index, seed)
        yield {
            "split": split,
            "index": index,
            "seed": seed,
            "question": sample.question,
            "answer": sample.answer,
            "qtype": sample.qtype,
        }


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The sample's image (336 x 336 RGB), drawn again from its seed."""
    return [make_sample(doc["split"], doc["index"], doc["seed"]).image]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question as the user's text; the model's chat template adds the image and the roles."""
    return str(doc["question"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match of the first generated word, as ``visiondrop eval`` scores it."""
    return {"accuracy": float(first_word(results[0]) == doc["answer"])}


class PocketTask(ConfigurableMessagesTask):
    """lmms-eval task whose documents are generated (``dataset_kwargs``: ``split``, ``n``, ``seed``).

    A messages task (the chat form of requests, lmms-eval's default for chat models); the ``visiondrop`` model
    reads both request forms, so ``--force_simple`` works with it as well.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        # lmms-eval passes the whole YAML, including the `class` key that named this class.
        config = {key: value for key, value in (config or {}).items() if key != "class"}
        super().__init__(config=config)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        import datasets

        kwargs = dict(dataset_kwargs or {})
        settings = {
            "split": str(kwargs.pop("split", "test")),
            "n": int(kwargs.pop("n", 500)),
            "seed": int(kwargs.pop("seed", 0)),
        }
        if kwargs:
            raise ValueError(
                f"visiondrop_pocket: unknown dataset_kwargs {sorted(kwargs)} (use split, n, seed)"
            )
        docs_of_split = datasets.Dataset.from_generator(docs, gen_kwargs=settings)
        self.dataset = datasets.DatasetDict({self.config.test_split: docs_of_split})
        # No image column to drop: images are drawn from the seeds when a request is built.
        self.dataset_no_image = self.dataset

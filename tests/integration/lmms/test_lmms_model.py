"""The lmms-eval model class in process: both request forms lmms-eval sends, and its errors."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance

from visiondrop.testbed import DEFAULT_MODEL_PATH, first_word, make_split


@pytest.fixture(scope="module")
def model():
    from visiondrop.integrations.lmms_eval.model import VisionDropSimple

    lm = VisionDropSimple(pretrained=str(DEFAULT_MODEL_PATH), method="visiondrop", budget=64, batch_size=2)
    samples = make_split("test", 5, seed=0)
    lm.task_dict = {"pocket": {"test": [{"image": s.image, "question": s.question} for s in samples]}}
    return lm, samples


GEN = {"max_new_tokens": 2, "temperature": 0, "until": []}


def _meta(doc_id: int) -> dict:
    return {"task": "pocket", "doc_id": doc_id, "repeats": 1}


def _simple(doc_id: int, text: str) -> Instance:
    args = (text, dict(GEN), lambda doc: [doc["image"]], doc_id, "pocket", "test")
    return Instance("generate_until", args, 0, _meta(doc_id))


def _chat(doc_id: int) -> Instance:
    def messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]}]  # fmt: skip

    return Instance("generate_until", ("", messages, dict(GEN), doc_id, "pocket", "test"), 0, _meta(doc_id))


def test_simple_and_chat_requests_give_the_same_answers_and_counts(model):
    lm, samples = model
    simple = [_simple(i, sample.question) for i, sample in enumerate(samples)]
    by_simple = lm.generate_until(simple)
    by_chat = lm.generate_until([_chat(i) for i in range(len(samples))])
    assert [r.text for r in by_simple] == [r.text for r in by_chat]
    assert [r.token_counts.to_dict() for r in by_simple] == [r.token_counts.to_dict() for r in by_chat]
    assert sum(first_word(r.text) == s.answer for r, s in zip(by_chat, samples, strict=True)) >= 3
    assert all(r.token_counts.visual_tokens_layer_average == pytest.approx(64, abs=1) for r in by_chat)


def test_unsupported_requests_stop_the_run(model):
    from visiondrop.integrations.lmms_eval.model import RunStopped

    lm, _ = model
    with pytest.raises(RunStopped, match="loglikelihood") as info:
        lm.loglikelihood([])
    assert isinstance(info.value.__cause__, NotImplementedError)
    not_an_image = Instance("generate_until", ("q", dict(GEN), lambda doc: ["video.mp4"], 0, "pocket", "test"), 0, _meta(0))  # fmt: skip
    with pytest.raises(RunStopped, match="takes images only, got a str"):
        lm.generate_until([not_an_image])

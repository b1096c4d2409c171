"""The vLLM plugin on Qwen2.5-VL and Qwen2-VL, run end to end in vLLM's CPU engine against our Hugging Face path.

The checkpoints are tiny random models built here (visiondrop.testing's Qwen configs with a 2-head LLM, since vLLM's
CPU attention needs a head size of 32 or more) with a real processor: Qwen2VLImageProcessor and a word-level tokenizer
holding Qwen's special tokens, saved with ``save_pretrained`` so that vLLM loads them offline. Needs ``.venv-vllm``
(``bash scripts/setup.sh vllm``); skipped where vLLM is not installed.
"""

from __future__ import annotations

import gc
import os

import pytest

# In-process engine, small KV cache, no hub: set before vLLM is imported.
for _key, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)

vllm = pytest.importorskip("vllm")

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import visiondrop as vd  # noqa: E402
from visiondrop import testing  # noqa: E402
from visiondrop.models.qwen2_vl import qwen2_vl_resize  # noqa: E402
from visiondrop.vllm import ARCHITECTURES, CONFIG_KEY, hf_overrides  # noqa: E402

ARCH = {"2.5": "Qwen2_5_VLForConditionalGeneration", "2": "Qwen2VLForConditionalGeneration"}
NEW_TOKENS = 4
BUDGET = 16
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 128  # the processor's bounds: at most 128 tokens an image
#: Image sizes (width, height): wide, tall and square, 20 to 108 units (tokens) after the processor's resize.
SIZES = [
    (150, 100),
    (224, 224),
    (112, 300),
    (300, 120),
    (200, 260),
    (180, 180),
    (260, 150),
    (120, 240),
    (330, 200),
    (250, 330),
    (140, 392),
    (364, 112),
]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_SPECIAL = {
    testing.PAD: "<|endoftext|>",
    testing.BOS: "<|im_start|>",
    testing.EOS: "<|im_end|>",
    testing.QWEN_VISION_START: "<|vision_start|>",
    testing.QWEN_VISION_END: "<|vision_end|>",
    testing.QWEN_VIDEO: "<|video_pad|>",
    testing.IMAGE_TOKEN: "<|image_pad|>",
}


def _grid(width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of merged units the processor gives an image of this size."""
    h, w = qwen2_vl_resize(height, width, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return h // 28, w // 28


def _image_tokens(width: int, height: int) -> int:
    rows, cols = _grid(width, height)
    return rows * cols


def _expected_lengths(stock, method, num_layers: int) -> list[int]:
    """Prompt lengths with each image's placeholders cut to the count the method's schedule gives its unit grid."""
    lengths = []
    for (_, n), (_, images) in zip(stock, SAMPLES, strict=True):
        for image in images:
            rows, cols = _grid(*image.size)
            n += method.schedule(rows * cols, num_layers, ((rows, cols),)).vision.tokens - rows * cols
        lengths.append(n)
    return lengths


def _samples() -> list[tuple[str, list[Image.Image]]]:
    """(prompt, images) per sample: noise images of every size in SIZES, one per prompt, the image before or after
    some text; and two prompts with two images each."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    samples = []
    for i, image in enumerate(images):
        words = " ".join(f"w{10 + (7 * i + j) % 80}" for j in range(3))
        prompt = f"{IMAGE} {words}" if i % 3 else f"{words} {IMAGE} w5"
        samples.append((prompt, [image]))
    samples.append((f"w7 {IMAGE} w8 w9 {IMAGE} w11", [images[0], images[3]]))
    samples.append((f"{IMAGE}{IMAGE} w12 w13", [images[2], images[1]]))
    return samples


SAMPLES = _samples()


def _build_checkpoint(version: str, folder) -> None:
    """A tiny random Qwen2-VL / Qwen2.5-VL with its processor and tokenizer, saved in ``folder``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    config = testing.tiny_qwen2_vl_config(version=version)
    text = config.text_config
    text.num_attention_heads, text.num_key_value_heads = (
        2,
        1,
    )  # head size 32: vLLM's CPU attention needs >= 32
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [4, 6, 6]}
    torch.manual_seed(0)
    model_cls = Qwen2VLForConditionalGeneration if version == "2" else Qwen2_5_VLForConditionalGeneration
    model_cls(config).eval().save_pretrained(folder)

    vocab = {_SPECIAL.get(i, f"w{i}"): i for i in range(text.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()
    words.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL.values()])
    template = (
        "{% for m in messages %}<|im_start|>{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}"
        + IMAGE
        + "{% elif c['type'] == "
        "'text' %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token=_SPECIAL[testing.PAD], eos_token=_SPECIAL[testing.EOS]
    )
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor_cls = Qwen2VLProcessor if version == "2" else Qwen2_5_VLProcessor
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(autouse=True)
def _collect_engines():
    """Free every engine a test made before the next starts: an engine kept alive by an exception's traceback and
    collected while another one runs would tear down vLLM's process-wide parallel state under it."""
    yield
    gc.collect()


@pytest.fixture(scope="module", params=["2.5", "2"], ids=["qwen2.5-vl", "qwen2-vl"])
def checkpoint(request, tmp_path_factory):
    """(version, path) of a tiny checkpoint on disk."""
    folder = tmp_path_factory.mktemp(f"qwen{request.param}")
    _build_checkpoint(request.param, folder)
    return request.param, str(folder)


def _engine(path: str, **kwargs):
    return vllm.LLM(
        model=path,
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        limit_mm_per_prompt={"image": 2},
        **kwargs,
    )


def _run_vllm(llm, samples=SAMPLES) -> list[tuple[list[int], int]]:
    """(greedy ids, prompt token count) per sample."""
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": images}} for prompt, images in samples]
    outs = llm.generate(requests, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), len(o.prompt_token_ids)) for o in outs]


_RESULTS: dict[tuple[str, str], list[tuple[list[int], int]]] = {}


def _vllm_results(checkpoint, method=None, **engine) -> list[tuple[list[int], int]]:
    """vLLM's (greedy ids, prompt token count) per sample: stock vLLM with ``method=None``, else the plugin running
    ``method``; one engine per settings, kept for the module."""
    version, path = checkpoint
    overrides = None if method is None else hf_overrides(method, architecture=ARCH[version])
    key = (path, json.dumps([overrides, engine], sort_keys=True))
    if key not in _RESULTS:
        llm = (
            _engine(path, **engine) if overrides is None else _engine(path, hf_overrides=overrides, **engine)
        )
        try:
            _RESULTS[key] = _run_vllm(llm)
        finally:
            del llm
            gc.collect()
    return _RESULTS[key]


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, path = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


@torch.no_grad()
def _run_hf(hf, method=None) -> list[tuple[list[int], int]]:
    """(greedy ids, prompt tokens the LLM saw) per sample, one sample per call; ``method`` applied when given."""
    model, processor = hf
    results = []
    for prompt, images in SAMPLES:
        inputs = processor(images=images, text=[prompt], return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        placeholders = sum(_image_tokens(*image.size) for image in images)
        if method is None:
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            kept = placeholders
        else:
            with method.apply(model) as run:
                out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            kept = sum(image.stages[0].tokens for image in run.report.images)
        results.append((out[0, length:].tolist(), length - placeholders + kept))
    return results


def test_samples_cover_sizes():
    """The images differ in size and shape (wide, tall) and each has more tokens than the budget."""
    tokens = [_image_tokens(w, h) for w, h in SIZES]
    assert len(set(SIZES)) == len(SIZES) >= 10
    assert min(tokens) > BUDGET and len(set(tokens)) >= 8
    assert any(w > h for w, h in SIZES) and any(h > w for w, h in SIZES)


def test_stock_vllm_equals_transformers(checkpoint, hf):
    """Stock vLLM (no plugin) on the tiny checkpoint gives transformers' greedy ids and prompt lengths."""
    got = _vllm_results(checkpoint)
    want = _run_hf(hf)
    assert [n for _, n in got] == [n for _, n in want]
    assert [ids for ids, _ in got] == [ids for ids, _ in want]


@pytest.mark.parametrize(
    "method",
    [vd.build("visiondrop", budget=BUDGET, boundaries=()), vd.build("visiondrop", budget=1.0, boundaries=())],
    ids=["visiondrop16", "keep-all"],
)
def test_plugin_equals_hf_path(checkpoint, hf, method):
    """The plugin's greedy ids and prompt token counts equal the HF path's with the same settings (kept tokens at
    their own M-RoPE positions); keeping every token gives stock vLLM's results."""
    got = _vllm_results(checkpoint, method)
    want = _run_hf(hf, method)
    assert [n for _, n in got] == [n for _, n in want]
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    stock = _vllm_results(checkpoint)
    if method.budget == 1.0:
        assert got == stock
    else:  # BUDGET tokens an image
        images = [len(images) for _, images in SAMPLES]
        placeholders = [sum(_image_tokens(*im.size) for im in ims) for _, ims in SAMPLES]
        assert [n for _, n in got] == [
            n - p + BUDGET * k for (_, n), p, k in zip(stock, placeholders, images, strict=True)
        ]


def test_chunked_prefill_keeps_positions(checkpoint, hf):
    """With prefill chunks of 16 tokens an image's kept tokens reach the LLM over several steps; each step still
    gets its tokens' positions (the HF path's ids)."""
    if checkpoint[0] != "2.5":
        pytest.skip("one family is enough for the chunked path (the code is shared)")
    method = vd.build("visiondrop", budget=BUDGET, boundaries=())
    got = _vllm_results(checkpoint, method, max_num_batched_tokens=16, enable_prefix_caching=False)
    want = _run_hf(hf, method)
    assert max(n for _, n in got) > 16  # prompts span more than one chunk
    assert [ids for ids, _ in got] == [ids for ids, _ in want]


def test_positions_are_checked(checkpoint, hf, monkeypatch):
    """Control for the equality above: the same plugin with every kept unit left at its image's start position (the
    (row, column) offsets dropped before ``forward``) keeps the counts but gives other greedy ids than the HF path."""
    if checkpoint[0] != "2.5":
        pytest.skip("one family is enough for the control")
    from visiondrop.integrations.vllm import qwen2_vl as plugin

    embed = plugin._PrunedQwen.embed_input_ids

    def embed_without_offsets(self, *args, **kwargs):
        out = embed(self, *args, **kwargs)
        self._pending = None
        return out

    monkeypatch.setattr(plugin._PrunedQwen, "embed_input_ids", embed_without_offsets)
    method = vd.build("visiondrop", budget=BUDGET, boundaries=())
    llm = _engine(checkpoint[1], hf_overrides=hf_overrides(method, architecture=ARCH[checkpoint[0]]))
    try:
        got = _run_vllm(llm)
    finally:
        del llm
        gc.collect()
    want = _run_hf(hf, method)
    assert [n for _, n in got] == [n for _, n in want]
    assert sum(g != w for (g, _), (w, _) in zip(got, want, strict=True)) >= len(SAMPLES) // 2


#: Every registered method that prunes before the LLM only (the registry decides, so a new one joins here).
VISION_METHODS = [name for name in vd.available_methods() if vd.method_class(name).info.stages == "vision"]


@pytest.mark.parametrize("name", VISION_METHODS)
def test_pre_llm_method_equals_hf_path(checkpoint, hf, name):
    """Each pre-LLM method at budget 16 runs inside vLLM with the HF path's prompt token counts and greedy ids;
    a [CLS]-ranked one is refused at engine start with the HF path's one line (Qwen's ViT has no [CLS])."""
    method = vd.build(name, budget=BUDGET)
    if method.requires_cls:
        with pytest.raises(Exception) as caught:
            _vllm_results(checkpoint, method)
        error = _root_value_error(caught.value)
        assert f"{name} ranks patches by [CLS] attention" in str(error) and "\n" not in str(error)
        with pytest.raises(ValueError, match=r"\[CLS\]"):
            _run_hf(hf, method)
        return
    got = _vllm_results(checkpoint, method)
    want = _run_hf(hf, method)
    # text tokens + the schedule's count per image, which the HF path's report must give too
    expected = _expected_lengths(
        _vllm_results(checkpoint), method, hf[0].config.text_config.num_hidden_layers
    )
    assert any(n < stock for n, (_, stock) in zip(expected, _vllm_results(checkpoint), strict=True))
    assert [n for _, n in want] == expected
    assert [n for _, n in got] == expected
    assert [ids for ids, _ in got] == [ids for ids, _ in want]


def _root_value_error(error: BaseException) -> BaseException:
    while not isinstance(error, ValueError) and error.__cause__ is not None:
        error = error.__cause__
    return error


@pytest.mark.parametrize(
    ("settings", "engine", "named"),
    [
        ({"method": "fastv", "budget": 16}, {}, "method='fastv'"),
        ({"method": "visiondrop", "budget": 16, "boundaries": [2]}, {}, "boundaries=(2,)"),
        (
            {"method": "visiondrop", "budget": 16, "boundaries": [], "positions": "compact"},
            {},
            "positions='compact'",
        ),
        ({"method": "visiondrop", "budget": 1000, "boundaries": []}, {}, "budget=1000"),
        (
            {"method": "visiondrop", "budget": 16, "boundaries": []},
            {"video_pruning_rate": 0.5},
            "video_pruning_rate=0.5",
        ),
    ],
)
def test_bad_settings_fail_at_engine_start(checkpoint, settings, engine, named):
    """Settings the plugin cannot honour (as `vllm serve --hf-overrides` JSON would pass them) stop the engine with
    one line naming the value."""
    version, path = checkpoint
    overrides = {"architectures": [ARCHITECTURES[ARCH[version]]], CONFIG_KEY: settings}
    with pytest.raises(Exception) as caught:  # vLLM may wrap the plugin's ValueError
        _engine(path, hf_overrides=overrides, **engine)
    error = _root_value_error(caught.value)
    is_value, message, raised = isinstance(error, ValueError), str(error), repr(caught.value)
    # The traceback holds the half-built engine: drop it now, so that its teardown cannot run later, inside the
    # next engine of this process, and take vLLM's process groups with it.
    del caught, error
    gc.collect()
    assert is_value, raised
    assert named in message and "\n" not in message


def test_requests_the_plugin_cannot_run_are_refused(checkpoint):
    """An image with fewer units than the budget is refused per request with the HF path's one line; a video is
    refused by vLLM (the plugin declares images only)."""
    if checkpoint[0] != "2.5":
        pytest.skip("one family is enough: the processing code is shared")
    version, path = checkpoint
    method = vd.build("visiondrop", budget=BUDGET, boundaries=())
    llm = _engine(path, hf_overrides=hf_overrides(method, ARCH[version]))
    try:
        small = Image.new("RGB", (56, 84))  # 2 x 3 units
        with pytest.raises(ValueError, match=r"budget=16 is more than the 6 visual tokens") as caught:
            llm.generate({"prompt": f"{IMAGE} w5", "multi_modal_data": {"image": small}}, use_tqdm=False)
        assert "\n" not in str(caught.value)
        del caught  # its traceback holds the engine (see test_bad_settings_fail_at_engine_start)
        frames = np.zeros((4, 112, 112, 3), dtype=np.uint8)
        metadata = {"fps": 2.0, "duration": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}
        video = {
            "prompt": "<|vision_start|><|video_pad|><|vision_end|> w5",
            "multi_modal_data": {"video": (frames, metadata)},
        }
        with pytest.raises(Exception, match=r"At most 0 video"):
            llm.generate(video, use_tqdm=False)
    finally:
        del llm
        gc.collect()

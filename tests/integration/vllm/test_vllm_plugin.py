"""The vLLM plugin run end to end in vLLM's CPU engine on the shipped pocket model, against our HF path.

Needs ``.venv-vllm`` (``bash scripts/setup.sh vllm``); skipped where vLLM is not installed.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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

import torch  # noqa: E402

import visiondrop as vd  # noqa: E402
from visiondrop.testbed import DEFAULT_MODEL_PATH, build_prompt, load_testbed, make_split  # noqa: E402
from visiondrop.vllm import ARCHITECTURES, CONFIG_KEY, hf_overrides  # noqa: E402

N_SAMPLES = 30
NEW_TOKENS = 2  # the pocket benchmark's answer length (one word and </s>)
IMAGE_TOKENS = 576


def _engine(model: str, **kwargs):
    return vllm.LLM(
        model=model,
        enforce_eager=True,
        dtype="float32",
        max_model_len=1024,
        limit_mm_per_prompt={"image": 1},
        **kwargs,
    )


def _run_vllm(llm, samples) -> list[tuple[list[int], int]]:
    """(greedy ids, prompt token count) per sample."""
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    requests = [{"prompt": build_prompt(s.question), "multi_modal_data": {"image": s.image}} for s in samples]
    outs = llm.generate(requests, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), len(o.prompt_token_ids)) for o in outs]


def _close(llm) -> None:
    del llm
    gc.collect()


# In-process plugin results per method settings, so that the `vllm serve` test compares with the same run.
_PLUGIN_RESULTS: dict[str, list[tuple[list[int], int]]] = {}


def _plugin_results(method, samples) -> list[tuple[list[int], int]]:
    """(greedy ids, prompt token count) per sample from an in-process ``LLM`` with the plugin running ``method``."""
    key = json.dumps(hf_overrides(method), sort_keys=True)
    if key not in _PLUGIN_RESULTS:
        llm = _engine(str(DEFAULT_MODEL_PATH), hf_overrides=hf_overrides(method))
        try:
            _PLUGIN_RESULTS[key] = _run_vllm(llm, samples)
        finally:
            _close(llm)
    return _PLUGIN_RESULTS[key]


@pytest.fixture(scope="module")
def samples():
    return make_split("test", N_SAMPLES)


@pytest.fixture(scope="module")
def hf():
    return load_testbed()


@torch.no_grad()
def _run_hf(hf, samples, method=None) -> list[tuple[list[int], int]]:
    """(greedy ids, prompt tokens the LLM saw) per sample, one sample per call (no padding)."""
    model, processor = hf
    results = []
    for sample in samples:
        inputs = processor(images=[sample.image], text=[build_prompt(sample.question)], return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        if method is None:
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            kept = IMAGE_TOKENS
        else:
            with method.apply(model) as run:
                out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            kept = run.report.images[0].stages[0].tokens
        results.append((out[0, length:].tolist(), length - IMAGE_TOKENS + kept))
    return results


def test_stock_vllm_equals_transformers(tmp_path_factory, samples, hf):
    """Stock vLLM (no plugin) on the shipped weights gives transformers' greedy ids."""
    from visiondrop.tools.serve_bench import stock_model_dir

    # Stock vLLM 0.32 wants CLIP weights under vision_tower.vision_model.* (transformers 5 saves vision_tower.*):
    # a renamed copy of the same tensors.
    folder = stock_model_dir(DEFAULT_MODEL_PATH, tmp_path_factory.mktemp("stock_names"))
    assert folder != DEFAULT_MODEL_PATH
    llm = _engine(str(folder))
    try:
        got = _run_vllm(llm, samples)
    finally:
        _close(llm)
    want = _run_hf(hf, samples)
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert [n for _, n in got] == [n for _, n in want]


@pytest.mark.parametrize(
    "method",
    [
        vd.build("visiondrop", budget=64, boundaries=(), positions="compact"),
        vd.build("visiondrop", budget=IMAGE_TOKENS, boundaries=(), positions="compact"),
    ],
    ids=["visiondrop64", "keep-all"],
)
def test_plugin_equals_hf_path(samples, hf, method):
    """The plugin's greedy ids and prompt token counts equal the HF path's with the same settings."""
    got = _plugin_results(method, samples)
    want = _run_hf(hf, samples, method)
    assert [n for _, n in got] == [n for _, n in want]
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    if method.budget < IMAGE_TOKENS:
        assert all(n < 100 for _, n in got)  # 576 placeholders became the kept count


#: Every registered method that prunes before the LLM only (the registry decides, so a new one joins here).
VISION_METHODS = [name for name in vd.available_methods() if vd.method_class(name).info.stages == "vision"]


def test_every_pre_llm_method_is_covered():
    """The issue's list is a subset of what the registry calls vision-only (a method that moved would drop out)."""
    assert {"visionzip", "divprune", "random", "pooling"} <= set(VISION_METHODS)


@pytest.mark.parametrize("name", VISION_METHODS)
def test_pre_llm_method_equals_hf_path(samples, hf, name):
    """Each pre-LLM method at budget 64 runs inside vLLM: vLLM's prompt token counts are the count the HF path's
    report gives (and the schedule's), and its greedy ids equal the HF path's with the same settings."""
    method = vd.build(name, budget=64, positions="compact")
    llm = _engine(str(DEFAULT_MODEL_PATH), hf_overrides=hf_overrides(method))
    try:
        got = _run_vllm(llm, samples)
    finally:
        _close(llm)
    want = _run_hf(hf, samples, method)
    kept = method.schedule(IMAGE_TOKENS, hf[0].config.text_config.num_hidden_layers).vision.tokens
    assert kept < IMAGE_TOKENS
    # text tokens + the schedule's count, which the HF path's report must give too (its n is text + reported count)
    expected = [_text_tokens(hf, sample) + kept for sample in samples]
    assert [n for _, n in want] == expected
    assert [n for _, n in got] == expected
    assert [ids for ids, _ in got] == [ids for ids, _ in want]


def _text_tokens(hf, sample) -> int:
    """Prompt tokens of ``sample`` other than the image's placeholders (unpruned prompt minus 576)."""
    _, processor = hf
    inputs = processor(images=[sample.image], text=[build_prompt(sample.question)], return_tensors="pt")
    return inputs["input_ids"].shape[1] - IMAGE_TOKENS


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"method": "fastv", "budget": 64}, "method='fastv'"),
        ({"method": "visiondrop", "budget": 64, "boundaries": [2]}, "boundaries=(2,)"),
        ({"method": "visiondrop", "budget": 64}, "boundaries=None"),
        ({"method": "visiondrop", "budget": 1000, "boundaries": []}, "budget=1000"),
    ],
)
def test_bad_settings_fail_at_engine_start(settings, named):
    """Settings vLLM cannot honour (as `vllm serve --hf-overrides` JSON would pass them) stop the engine with one
    line naming the value."""
    overrides = {"architectures": [ARCHITECTURES["LlavaForConditionalGeneration"]], CONFIG_KEY: settings}
    with pytest.raises(Exception) as caught:  # vLLM may wrap the plugin's ValueError
        _engine(str(DEFAULT_MODEL_PATH), hf_overrides=overrides)
    error = caught.value
    while not isinstance(error, ValueError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ValueError), repr(caught.value)
    assert named in str(error) and "\n" not in str(error)


@pytest.mark.parametrize(
    ("method", "named"),
    [
        (vd.build("pyramiddrop", budget=64), "method='pyramiddrop'"),
        (vd.build("visiondrop", budget=64, boundaries=(4,)), "boundaries=(4,)"),
        (vd.build("vscan", budget=64), "method='vscan'"),
    ],
)
def test_hf_overrides_refuses_in_llm_settings(method, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        hf_overrides(method)


SERVED = vd.build("visiondrop", budget=64, boundaries=(), positions="compact")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``vllm serve`` (the real CLI, vLLM's default processes) on the shipped model with the plugin's settings as the
    README shows them; yields the server's base URL."""
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        str(DEFAULT_MODEL_PATH),
        "--hf-overrides",
        json.dumps(hf_overrides(SERVED)),
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(
        "VLLM_ENABLE_V1_MULTIPROCESSING", None
    )  # the server as users run it: API server, engine core, worker
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not up after 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _chat(url: str, sample) -> dict:
    """One OpenAI chat completion for ``sample``: the image as a PNG data URL (lossless), greedy, 2 tokens."""
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {
        "model": str(DEFAULT_MODEL_PATH),
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": sample.question},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": NEW_TOKENS,
        # The shipped chat template writes no <s>; the processor (and so the HF path) adds it.
        "add_special_tokens": True,
        "return_token_ids": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def test_vllm_serve_equals_in_process(served, samples, hf):
    """`vllm serve --hf-overrides '<json>'` answers OpenAI chat requests with images exactly as the in-process
    ``LLM`` with the same settings does: same prompt token counts (the kept count, not 576), same greedy ids, and
    the chat template renders the prompt the HF path uses."""
    from visiondrop.testbed import first_word

    replies = [_chat(served, sample) for sample in samples]
    want = _plugin_results(SERVED, samples)
    _, processor = hf
    prompts = [build_prompt(sample.question) for sample in samples]
    assert [r["usage"]["prompt_tokens"] for r in replies] == [n for _, n in want]
    assert [r["choices"][0]["token_ids"] for r in replies] == [ids for ids, _ in want]
    assert [len(r["prompt_token_ids"]) for r in replies] == [n for _, n in want]
    # the served prompt is the HF prompt with its 576 placeholders cut to the kept count
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for reply, prompt in zip(replies, prompts, strict=True):
        ids = processor.tokenizer(prompt)["input_ids"]
        served_text = [t for t in reply["prompt_token_ids"] if t != image_id]
        assert served_text == [t for t in ids if t != image_id]
    texts = [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in want]
    assert [first_word(r["choices"][0]["message"]["content"]) for r in replies] == [
        first_word(t) for t in texts
    ]


def test_serve_bench_command(tmp_path, samples, hf):
    """`visiondrop serve-bench` (the real command, vLLM's async engine with its engine core in another process) on 8
    pocket requests at concurrency 1 and 4: both engines answer every request, the plugin's prompts are the kept
    count, its answers are the in-process plugin's and stock's are transformers', at every concurrency."""
    from visiondrop.testbed import first_word

    n = 8
    out = tmp_path / "serve_bench.json"
    command = [
        str(Path(sys.executable).with_name("visiondrop")),
        "serve-bench",
        "--n",
        str(n),
        "--concurrency",
        "1,4",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    _, processor = hf
    plugin_want = _plugin_results(SERVED, samples)[:n]
    stock_want = _run_hf(hf, samples[:n])
    words = {
        "plugin": [
            first_word(processor.tokenizer.decode(ids, skip_special_tokens=True)) for ids, _ in plugin_want
        ],
        "stock": [
            first_word(processor.tokenizer.decode(ids, skip_special_tokens=True)) for ids, _ in stock_want
        ],
    }
    tokens = {
        "plugin": sum(count for _, count in plugin_want) / n,
        "stock": sum(count for _, count in stock_want) / n,
    }
    assert result["settings"]["method"] == hf_overrides(SERVED)[CONFIG_KEY]
    for engine in ("stock", "plugin"):
        runs = result[engine]["runs"]
        assert [run["concurrency"] for run in runs] == [1, 4]
        for run in runs:
            assert run["requests"] == n and run["requests_per_s"] > 0
            assert 0 < run["ttft_p50_s"] <= run["ttft_p95_s"]
            assert run["prompt_tokens_mean"] == pytest.approx(tokens[engine])
            assert run["predictions"] == words[engine]
            answers = [sample.answer for sample in samples[:n]]
            assert (
                run["accuracy"] == sum(p == a for p, a in zip(run["predictions"], answers, strict=True)) / n
            )
    assert tokens["plugin"] < tokens["stock"] - 400

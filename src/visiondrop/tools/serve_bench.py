"""``visiondrop serve-bench``: stock vLLM vs vLLM with the visiondrop plugin, served, on pocket-benchmark requests.

Both engines get the same settings and the same requests (the pocket benchmark's test split: one image and one
question each, greedy, the answer's two tokens). Requests go through vLLM's async engine API (``AsyncLLM``, the
object behind ``vllm serve``: the engine core runs in its own process and the client overlaps requests), without
HTTP. At each concurrency ``c`` all requests are submitted with at most ``c`` in flight; the run reports requests/s
(requests / wall time), time to first token (submit to the first generated token) p50/p95, mean prompt tokens and
accuracy (first generated word == the answer, as ``visiondrop eval`` scores it).

Prefix caching and the multimodal processor cache are off, so a request repeated at the next concurrency is
computed again rather than read from a cache. Needs vLLM (``bash scripts/setup.sh vllm``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import logging
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from . import common
from .common import CLIError, parse_budget, parse_settings

logger = logging.getLogger(__name__)

__all__ = ["add_parser", "markdown_table", "percentile", "run_serve_bench", "stock_model_dir"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stock_model_dir(model: Path, workdir: Path) -> Path:
    """``model``, or a copy (in ``workdir/stock``) whose CLIP weights carry the names stock vLLM 0.32 loads.

    transformers 5 saves LLaVA's CLIP tower as ``vision_tower.encoder.*``; stock vLLM wants
    ``vision_tower.vision_model.*`` (the plugin maps the names itself). The copy holds the same tensors.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = sorted(model.glob("*.safetensors"))
    with safe_open(str(weights[0]), "pt") as handle:
        names = list(handle.keys())
    if not any(name.startswith("vision_tower.encoder.") for name in names):
        return model
    copy = workdir / "stock"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    for path in weights:
        tensors = load_file(path)
        renamed = {
            (
                k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                if k.startswith("vision_tower.")
                else k
            ): v
            for k, v in tensors.items()
        }
        save_file(renamed, copy / path.name, metadata={"format": "pt"})
    logger.info("stock vLLM: serving a copy of %s with vLLM's CLIP weight names", model)
    return copy


async def _one(engine: Any, request: dict[str, Any], params: Any, request_id: str) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    final = None
    async for output in engine.generate(request, params, request_id):
        if first is None and output.outputs and output.outputs[0].token_ids:
            first = time.perf_counter() - start
        final = output
    return {
        "ttft": first,
        "latency": time.perf_counter() - start,
        "text": final.outputs[0].text,
        "prompt_tokens": len(final.prompt_token_ids),
    }


async def _measure(
    engine: Any, requests: list[dict[str, Any]], params: Any, concurrency: int, tag: str
) -> tuple[float, list[dict[str, Any]]]:
    """All ``requests`` with at most ``concurrency`` in flight: (wall seconds, per-request results in order)."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(index: int, request: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            return await _one(engine, request, params, f"{tag}-{index}")

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(i, r) for i, r in enumerate(requests)))
    return time.perf_counter() - start, list(results)


async def _bench_engine(
    engine_kwargs: dict[str, Any],
    requests: list[dict[str, Any]],
    answers: list[str],
    concurrency: list[int],
    warmup: int,
    max_tokens: int,
    tag: str,
) -> dict[str, Any]:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from ..testbed import first_word

    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))
    try:
        startup = time.perf_counter() - started
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        if warmup:
            await _measure(engine, requests[:warmup], params, warmup, f"{tag}-warmup")
        runs = []
        for c in concurrency:
            wall, results = await _measure(engine, requests, params, c, f"{tag}-c{c}")
            ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
            correct = [first_word(r["text"]) == answer for r, answer in zip(results, answers, strict=True)]
            runs.append(
                {
                    "concurrency": c,
                    "requests": len(results),
                    "wall_s": wall,
                    "requests_per_s": len(results) / wall,
                    "ttft_p50_s": percentile(ttfts, 50),
                    "ttft_p95_s": percentile(ttfts, 95),
                    "latency_mean_s": statistics.fmean(r["latency"] for r in results),
                    "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in results),
                    "accuracy": sum(correct) / len(correct),
                    "predictions": [first_word(r["text"]) for r in results],
                }
            )
            logger.info(
                "%s c=%d: %.2f req/s, TTFT p50 %.3f s p95 %.3f s, accuracy %.3f",
                tag,
                c,
                runs[-1]["requests_per_s"],
                runs[-1]["ttft_p50_s"],
                runs[-1]["ttft_p95_s"],
                runs[-1]["accuracy"],
            )
        return {"startup_s": startup, "runs": runs}
    finally:
        engine.shutdown()
        del engine  # vLLM's __del__ shuts down again; at interpreter exit that raises inside vLLM
        gc.collect()


def run_serve_bench(
    model: str | Path | None = None,
    method: Any = None,
    *,
    n: int = 64,
    concurrency: tuple[int, ...] = (1, 4, 16),
    dtype: str = "float32",
    max_model_len: int = 1024,
    warmup: int = 4,
    max_tokens: int = 2,
) -> dict[str, Any]:
    """Serve the same ``n`` pocket requests with stock vLLM and with the plugin running ``method``; one dict.

    Parameters
    ----------
    model : path, optional
        A checkpoint folder whose ``architectures[0]`` the plugin runs (:data:`visiondrop.vllm.ARCHITECTURES`;
        default: the shipped pocket model).
    method : PruningMethod
        A vision-stage method (``vd.build("visiondrop", budget=64, boundaries=())``, ``visionzip``, ...).
    n : int
        Requests (test-split samples 0..n-1), each sent once per concurrency.
    concurrency : tuple of int
        Requests in flight at most, one measured round each.
    dtype, max_model_len : engine settings shared by both engines (``enforce_eager`` too).
    warmup : int
        Untimed requests per engine first.
    max_tokens : int
        Tokens generated per request (2: the pocket answer and ``</s>``).

    Returns
    -------
    dict
        ``settings``, ``machine`` and, per engine (``stock``, ``plugin``), ``startup_s`` and one ``runs`` row per
        concurrency (``requests_per_s``, ``ttft_p50_s``, ``ttft_p95_s``, ``latency_mean_s``,
        ``prompt_tokens_mean``, ``accuracy``, ``predictions``).
    """
    import os

    from ..testbed import DEFAULT_MODEL_PATH, build_prompt, make_split
    from ..vllm import hf_overrides

    # Every check before vLLM is imported or an engine starts.
    if n < 1:
        raise ValueError(f"n={n}: need at least one request")
    if not concurrency or any(c < 1 for c in concurrency):
        raise ValueError(f"concurrency={concurrency!r}: give positive ints")
    hf_overrides(method)  # refuses in-LLM settings
    model_dir = Path(model) if model is not None else DEFAULT_MODEL_PATH
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model={str(model_dir)!r}: no config.json there")
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or [None]
    overrides = hf_overrides(method, architectures[0])  # refuses an architecture the plugin does not run
    import torch
    import transformers
    import vllm

    samples = make_split("test", n)
    requests = [{"prompt": build_prompt(s.question), "multi_modal_data": {"image": s.image}} for s in samples]
    answers = [s.answer for s in samples]
    engine = {
        "enforce_eager": True,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "limit_mm_per_prompt": {"image": 1},
        "enable_prefix_caching": False,
        "mm_processor_cache_gb": 0,
        "disable_log_stats": True,
    }
    result: dict[str, Any] = {
        "settings": {
            "model": str(model_dir),
            "method": overrides["visiondrop"],
            "n": n,
            "concurrency": list(concurrency),
            "max_tokens": max_tokens,
            "warmup": warmup,
            "engine": engine,
            "api": "vllm AsyncLLM (vllm serve's engine client; engine core in its own process), no HTTP",
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "vllm_cpu_kvcache_space": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": vllm.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            # other jobs on a shared machine: the 1-minute load average before and after the run
            "load_average_before": os.getloadavg()[0],
        },
    }
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as workdir:
        stock_dir = stock_model_dir(model_dir, Path(workdir))
        for tag, kwargs in (
            ("stock", {"model": str(stock_dir)}),
            ("plugin", {"model": str(model_dir), "hf_overrides": overrides}),
        ):
            logger.info("%s: starting the engine", tag)
            result[tag] = asyncio.run(
                _bench_engine(
                    {**engine, **kwargs}, requests, answers, list(concurrency), warmup, max_tokens, tag
                )
            )
    result["machine"]["load_average_after"] = os.getloadavg()[0]
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """One row per engine and concurrency: requests/s, TTFT p50/p95 (ms), prompt tokens, accuracy."""
    lines = [
        "| engine | concurrency | requests/s | TTFT p50 (ms) | TTFT p95 (ms) | prompt tokens | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for tag in ("stock", "plugin"):
        for run in result[tag]["runs"]:
            lines.append(
                f"| {tag} | {run['concurrency']} | {run['requests_per_s']:.2f} | {run['ttft_p50_s'] * 1e3:.0f} | "
                f"{run['ttft_p95_s'] * 1e3:.0f} | {run['prompt_tokens_mean']:.1f} | {run['accuracy']:.3f} |"
            )
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    """Register ``visiondrop serve-bench`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "serve-bench",
        help="serve pocket requests with stock vLLM and with the plugin: requests/s, TTFT, accuracy",
        description=(
            "Start stock vLLM, then vLLM with the visiondrop plugin (same engine settings), and send the same pocket "
            "requests through vLLM's async engine at each concurrency: requests/s, time to first token p50/p95, "
            "prompt tokens and accuracy. Needs vLLM (bash scripts/setup.sh vllm)."
        ),
    )
    parser.add_argument(
        "--model",
        help="a checkpoint folder of an architecture the plugin runs (default: the shipped pocket model)",
    )
    parser.add_argument("--method", default="visiondrop", help="a vision-stage method (default visiondrop)")
    parser.add_argument("--budget", default="64", help="visual tokens per image, or a fraction (default 64)")
    parser.add_argument("--budget-mode", default="average", choices=["average", "input"])
    parser.add_argument(
        "--set",
        dest="settings",
        default="boundaries=,positions=compact",
        help="method fields (default 'boundaries=,positions=compact': VisionDrop's vision stage, as vLLM runs it)",
    )
    parser.add_argument("--n", type=int, default=64, help="requests (pocket test samples; default 64)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated (default 1,4,16)")
    parser.add_argument("--dtype", default="float32", help="engine dtype (default float32)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests per engine (default 4)")
    parser.add_argument(
        "--json", dest="json_path", metavar="PATH", help="also write the results as JSON to PATH"
    )
    parser.set_defaults(func=run_serve_bench_command)


def run_serve_bench_command(args: argparse.Namespace) -> int:
    """Entry point of ``visiondrop serve-bench``: runs, prints the table, writes ``--json``."""
    from .. import build

    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
        if not logging.getLogger().handlers and not logger.handlers:
            logger.addHandler(logging.StreamHandler())
    if args.json_path:
        common.check_output_file(args.json_path, "--json")
    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        raise CLIError(f"--concurrency {args.concurrency!r}: give comma-separated ints") from None
    method = build(
        args.method,
        budget=parse_budget(args.budget),
        budget_mode=args.budget_mode,
        **parse_settings(args.settings),
    )
    result = run_serve_bench(
        args.model,
        method,
        n=args.n,
        concurrency=concurrency,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        warmup=args.warmup,
    )
    print(markdown_table(result))
    if args.json_path:
        common.write_json(args.json_path, result)
    return 0

"""``visiondrop run | eval | bench | flops | methods``: a thin layer over the library's objects."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import (
    CLIError,
    check_output_dir,
    check_output_file,
    parse_budget,
    parse_settings,
    torch_dtype,
    write_json,
)

__all__ = ["main"]

logger = logging.getLogger("visiondrop")


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the commands (the parsers, dtypes and output checks live in .common)
# ---------------------------------------------------------------------------------------------------------------

#: The question ``run --image`` asks when none is given: in the testbed's vocabulary (no <unk> warning).
DEFAULT_QUESTION = "how many shapes are there?"


def load_model(name_or_path: str | None, dtype_name: str = "float32"):
    """Load an LVLM and its processor: the shipped testbed model by default, else an HF id or a local folder."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    from ..testbed import DEFAULT_MODEL_PATH
    from ..weights import check_safetensors

    dtype = torch_dtype(dtype_name)
    path = Path(name_or_path) if name_or_path else DEFAULT_MODEL_PATH
    if name_or_path is None and not (path / "config.json").is_file():
        raise CLIError(f"the shipped testbed model is missing from {path}; pass --model")
    if path.is_dir():
        try:
            check_safetensors(path)  # a pickle is never opened: one line naming the file
        except ValueError as err:
            raise CLIError(f"--model {name_or_path or str(path)!r}: {err}") from None
    source = str(path) if path.exists() else str(name_or_path)
    # A local folder loads in a blink: no "Loading weights" bar in front of the answer (or of a one-line error).
    quiet = path.exists() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except OSError as err:
        raise CLIError(f"--model {source!r}: cannot load it ({str(err).splitlines()[0]})") from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    return model, processor


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if file.is_dir():
        raise CLIError(f"--image {path!r}: is a folder; give an image file")
    if not file.is_file():
        raise CLIError(f"--image {path!r}: no such file")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both are refused, before any decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
            width, height = image.size
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        size = re.search(r"\((\d+) pixels\)", str(err))
        raise CLIError(
            f"--image {path!r}: too large to decode safely ({size.group(1) + ' pixels' if size else err}; "
            f"the limit is {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CLIError(f"--image {path!r}: not a readable image ({type(err).__name__})") from None
    if width < 1 or height < 1:
        raise CLIError(f"--image {path!r}: empty image ({width}x{height})")
    return image.convert("RGB")


def _prompt(processor: Any, question: str) -> str:
    template = getattr(processor, "chat_template", None)
    if template:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


# ---------------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------------


def methods_table() -> str:
    """The registry as a markdown table (the README's methods table is this output)."""
    from ..methods import available_methods, method_class

    lines = ["| name | stages | signal | merges | paper |", "|---|---|---|---|---|"]
    for name in available_methods():
        info = method_class(name).info
        lines.append(
            f"| `{name}` | {info.stages} | {info.signal} | {'yes' if info.merges else 'no'} | {info.paper} |"
        )
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    print(methods_table())
    return 0


# ---------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------


def prepare_inputs(model: Any, processor: Any, image: Any, question: str, *, testbed: bool) -> Any:
    """One image and question as the model's inputs, on its device and in its dtype (``visiondrop run`` and ``demo``).

    Parameters
    ----------
    model, processor
        As :func:`load_model` returns them.
    image : PIL.Image.Image
        RGB image.
    question : str
        The user's question, wrapped in the testbed's prompt (``testbed=True``) or the processor's chat template.
    testbed : bool
        Whether ``model`` is the shipped testbed model (its prompt has no chat template).

    Returns
    -------
    transformers.BatchFeature
        ``input_ids`` / ``attention_mask`` ``(1, T)``, ``pixel_values`` (e.g. ``(1, 3, 336, 336)``) and whatever
        else the processor adds.
    """
    from ..testbed import build_prompt

    prompt = build_prompt(question) if testbed else _prompt(processor, question)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def generate_answer(
    model: Any, processor: Any, inputs: Any, max_new_tokens: int, method: Any = None
) -> tuple[str, Any]:
    """Greedy answer to :func:`prepare_inputs`' batch, unpruned (``method=None``) or under ``method``.

    Returns
    -------
    answer : str
        The generated text after the prompt, special tokens removed.
    report : visiondrop.report.Report or None
        ``run.report`` of the pruned call (``None`` unpruned).
    """
    import torch

    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        if method is None:
            out, report = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False), None
        else:
            with method.apply(model) as run:
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            report = run.report
    answer = processor.batch_decode(out[:, prompt_length:], skip_special_tokens=True)[0].strip()
    return answer, report


def cmd_run(args: argparse.Namespace) -> int:
    # Everything the user gave is checked before the model loads: budget, method fields, question, image, --out.
    # (Parsed here, not as argparse types: argparse lets a CLIError from a type out as a traceback.)
    args.budget = parse_budget(args.budget)
    torch_dtype(args.dtype)  # an unknown --dtype before anything loads
    from .. import build
    from ..testbed import first_word, make_sample, unknown_words

    method = build(args.method, budget=args.budget, budget_mode=args.budget_mode, **parse_settings(args.set))
    if args.question is not None and not args.question.strip():
        raise CLIError("--question '': give a question (or leave --question out for the default)")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens}: generate at least one token")
    if args.seed < 0:
        raise CLIError(f"--seed {args.seed}: use a scene index >= 0")
    if args.out:
        check_output_dir(args.out, "--out", names=("kept.png", "report.json"))
    expected = None
    if args.image is None:
        sample = make_sample("test", args.seed)
        image = sample.image
        question = args.question or sample.question
        expected = sample.answer if args.question is None else None
    else:
        image = _open_image(args.image)
        question = args.question or (DEFAULT_QUESTION if args.model is None else "What is in the image?")
    model, processor = load_model(args.model, args.dtype)
    if args.model is None:
        unknown = unknown_words(question, processor.tokenizer)
        if unknown:
            logger.warning("words outside the testbed vocabulary are read as <unk>: %s", ", ".join(unknown))
    inputs = prepare_inputs(model, processor, image, question, testbed=args.model is None)
    unpruned, _ = generate_answer(model, processor, inputs, args.max_new_tokens)
    pruned, report = generate_answer(model, processor, inputs, args.max_new_tokens, method)
    print(f"model:    {args.model or 'visiondrop testbed (shipped)'}")
    print(f"question: {question}" + (f"   [expected: {expected}]" if expected else ""))
    print(f"unpruned: {unpruned}")
    print(f"{args.method} (budget {args.budget}, {args.budget_mode}): {pruned}")
    print(report)
    if expected is not None:
        ok = [first_word(unpruned) == expected, first_word(pruned) == expected]
        print(f"correct:  unpruned {'yes' if ok[0] else 'no'}, pruned {'yes' if ok[1] else 'no'}")
    if args.out:
        from .viz import save_stages

        title = f"{args.method}, budget {args.budget} ({args.budget_mode}) - Q: {question} A: {pruned}"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = save_stages(image, report.images[0], Path(args.out) / "kept.png", title=title)
        (Path(args.out) / "report.json").write_text(report.to_json())
        print(f"picture:  {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------


def _parse_positions(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from ..methods.base import POSITION_POLICIES

    policies = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in policies if p not in POSITION_POLICIES]
    if bad or not policies:
        raise CLIError(f"--positions {text!r}: use a comma-separated list of {', '.join(POSITION_POLICIES)}")
    return policies


def cmd_eval(args: argparse.Namespace) -> int:
    import time

    from ..methods import available_methods
    from ..testbed import make_split
    from .evaluation import markdown_tables, parse_method_spec, run_eval

    names = (
        args.methods.split(",")
        if args.methods is not None
        else [m for m in available_methods() if m != "none"]
    )
    specs = [parse_method_spec(name) for name in names if name.strip() and name.strip() != "none"]
    if not specs:
        raise CLIError(f"--methods {args.methods!r}: give at least one method (see `visiondrop methods`)")
    budgets = [parse_budget(b) for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise CLIError(f"--budgets {args.budgets!r}: give at least one budget, e.g. 192,128,64")
    for spec in specs:  # every field of every spec at every budget, before the model loads
        for budget in budgets:
            spec.build(budget, args.budget_mode)
    torch_dtype(args.dtype)
    if args.n < 1:
        raise CLIError(f"--n {args.n}: evaluate at least one sample")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size}: use at least 1")
    if args.seed < 0:
        raise CLIError(f"--seed {args.seed}: use a dataset seed >= 0")
    if args.json:
        check_output_file(args.json, "--json")
    model, processor = load_model(args.model, args.dtype)
    samples = make_split(args.split, args.n, seed=args.seed)
    start = time.time()
    rows = run_eval(
        model,
        processor,
        samples,
        specs,
        budgets,
        budget_mode=args.budget_mode,
        batch_size=args.batch_size,
        progress=not args.quiet,
        positions=_parse_positions(args.positions),
    )
    print(markdown_tables(rows))
    print(f"\n({len(rows)} runs in {time.time() - start:.0f} s)")
    if args.json:
        meta = {
            "model": args.model or "visiondrop testbed (shipped)",
            "split": args.split,
            "n": args.n,
            "seed": args.seed,
            "dtype": args.dtype,
            "command": "visiondrop eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None,
        }
        write_json(args.json, {"meta": meta, "results": rows}, "--json")
        print(f"results: {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiondrop", description=__doc__)
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        help="import this module or .py file first, so the methods it registers can be used (repeatable; also "
        "VISIONDROP_PLUGINS=a,b)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one question unpruned and pruned, show what was kept")
    run.add_argument("--model", help="HF id or local folder (default: the shipped testbed model)")
    run.add_argument("--image", help="image file (default: a generated test scene)")
    run.add_argument("--question", help="question (default: the scene's own question)")
    run.add_argument("--method", default="visiondrop", help="registry name (see `visiondrop methods`)")
    run.add_argument("--budget", default="64", help="tokens per image, or a fraction (default 64)")
    run.add_argument("--budget-mode", default="average", choices=["average", "input"])
    run.add_argument("--set", help="other method fields, e.g. positions=preserve,merge=mean")
    run.add_argument("--seed", type=int, default=0, help="which generated test scene (default 0)")
    run.add_argument("--dtype", default="float32")
    run.add_argument("--max-new-tokens", type=int, default=8)
    run.add_argument("--out", help="folder for kept.png and report.json")
    run.set_defaults(func=cmd_run)

    evaluate = sub.add_parser("eval", help="accuracy of methods x budgets on the testbed, with retention")
    evaluate.add_argument("--model", help="HF id or local folder (default: the shipped testbed model)")
    evaluate.add_argument(
        "--methods",
        help="comma-separated method specs, e.g. visiondrop,fastv:layer=1,visiondrop:score=visual (default: all)",
    )
    evaluate.add_argument(
        "--budgets", default="192,128,64", help="comma-separated budgets (default 192,128,64)"
    )
    evaluate.add_argument("--budget-mode", default="average", choices=["average", "input"])
    evaluate.add_argument(
        "--positions",
        help="run every method under each of these position policies, e.g. preserve,compact (default: each "
        "method's own default)",
    )
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"])
    evaluate.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    evaluate.add_argument("--n", type=int, default=300, help="samples (default 300)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--dtype", default="float32")
    evaluate.add_argument("--json", help="write {meta, results: [...]} here")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=cmd_eval)

    methods = sub.add_parser("methods", help="list the methods: stages, signal, merging, paper")
    methods.set_defaults(func=cmd_methods)

    from . import bench, flops_cmd  # their subcommands: `visiondrop flops`, `visiondrop bench`

    flops_cmd.add_parser(sub)
    bench.add_parser(sub)
    from . import demo  # `visiondrop demo` (gradio is imported only when the command runs)

    demo.add_parser(sub)
    from . import table  # `visiondrop table`, `visiondrop lmms-tasks` (lmms-eval outputs and tasks)

    table.add_parser(sub)
    from . import plot  # `visiondrop plot`

    plot.add_parser(sub)
    from . import serve_bench  # `visiondrop serve-bench` (vLLM is imported only when the command runs)

    serve_bench.add_parser(sub)
    return parser


def load_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin (a module name, or a path to a ``.py`` file) for the methods it registers."""
    import importlib
    import importlib.util

    for plugin in plugins:
        plugin = plugin.strip()
        if plugin.endswith(".py"):
            path = Path(plugin)
            if not path.is_file():
                raise CLIError(f"--plugin {plugin!r}: no such file")
            spec = importlib.util.spec_from_file_location(f"visiondrop_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up while building the class
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(plugin)
            except ModuleNotFoundError as err:
                raise CLIError(f"--plugin {plugin!r}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        load_plugins([*filter(None, os.environ.get("VISIONDROP_PLUGINS", "").split(",")), *args.plugin])
        return args.func(args)
    except (CLIError, ValueError, TypeError, OSError) as err:
        if os.environ.get("VISIONDROP_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line, whatever the error's own text
        print(f"visiondrop {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

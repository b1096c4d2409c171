"""``visiondrop demo``: a local web page to ask a question about an image and see what a pruning method keeps.

The page (Gradio) answers the question unpruned and under one or two methods, side by side, and shows per method the
picture of kept / merged / dropped patches per stage (:func:`visiondrop.tools.viz.draw_stages`), the schedule in the
three budget conventions, the prefill FLOPs and KV cache saved (``run.report``) and the time taken.

The work is done by :class:`DemoSession`, which needs no Gradio (the main test suite runs it); :func:`build_app` is
the thin page around it. The model loads once; requests queue one at a time; nothing reaches the network: Gradio's
analytics and version check are off, there is no share link, and the default theme's fonts are served locally.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..report import Report

__all__ = ["DemoSession", "MethodOutcome", "Outcome", "add_parser", "build_app"]

#: The compare dropdown's "no second method" entry.
NO_METHOD = "(none)"
INSTALL_HINT = "the web demo needs gradio: pip install 'visiondrop[demo]' (or: bash scripts/setup.sh demo)"


@dataclass
class MethodOutcome:
    """One method's answer to one request.

    Attributes
    ----------
    method : str
        Registry name.
    settings : str
        The budget, mode and fields as the user gave them.
    answer : str
        Generated text.
    seconds : float
        Wall time of ``generate`` under the method.
    report : Report
        ``run.report`` of the call.
    picture : PIL.Image.Image
        :func:`~visiondrop.tools.viz.draw_stages` of the image.
    """

    method: str
    settings: str
    answer: str
    seconds: float
    report: Report
    picture: Any


@dataclass
class Outcome:
    """Everything the page shows after Run."""

    question: str
    unpruned: str
    unpruned_seconds: float
    methods: list[MethodOutcome]
    expected: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Markdown: per method, tokens per stage, the three budget conventions, FLOPs, KV cache and time (a table),
        then each schedule; the answers are shown beside it."""
        lines = [
            "| | visual tokens per stage | input | layer-avg | final | prefill FLOPs | KV cache | time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        first = self.methods[0].report.images[0] if self.methods and self.methods[0].report.images else None
        full = first.image_tokens if first is not None else "-"
        lines.append(
            f"| unpruned | {full} | {full} | {full} | {full} | 1x | 1x | {self.unpruned_seconds:.2f} s |"
        )
        for m in self.methods:
            image = m.report.images[0]
            stages = " → ".join(str(c) for c in [image.image_tokens, *image.counts()])
            flops, kv = "-", "-"
            if m.report.flops:
                f = m.report.flops
                flops = f"{f['ratio']:.2f}x fewer"
                kv = f"{_mib(f['kv_bytes'])} of {_mib(f['unpruned_kv_bytes'])}"
            lines.append(
                f"| **{m.method}** ({_cell(m.settings)}) | {stages} | {image.input_count} | "
                f"{image.layer_average:.1f} | {image.final_count} | {flops} | {kv} | {m.seconds:.2f} s |"
            )
        for m in self.methods:
            for tokens, desc in m.report.schedules.items():
                lines.append(f"\n**{m.method}** schedule ({tokens} tokens/image): {_cell(desc)}")
        if self.expected is not None:
            lines.append(f"\nThe generated scene's answer: **{self.expected}**")
        lines += [f"\n{note}" for note in self.notes]
        return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


def _mib(count: float) -> str:
    return f"{count / (1 << 20):.2f} MiB" if count >= 1 << 20 else f"{count / 1024:.1f} KiB"


def _build_method(name: str, budget: str, budget_mode: str, fields: str) -> Any:
    """A method from the page's fields, through the CLI's own parsers (``--budget`` and ``--set`` rules)."""
    from .. import build
    from ..methods import available_methods
    from .common import parse_budget, parse_settings

    if name not in available_methods():
        raise ValueError(f"method {name!r}: not in the registry ({', '.join(available_methods())})")
    return build(
        name, budget=parse_budget(str(budget).strip()), budget_mode=budget_mode, **parse_settings(fields)
    )


class DemoSession:
    """The demo's work without the page: one loaded model, one request at a time.

    Parameters
    ----------
    model, processor
        As :func:`visiondrop.tools.cli.load_model` returns them.
    testbed : bool
        Whether the model is the shipped testbed model (its own prompt; generated scenes are its domain).
    max_new_tokens : int
        Tokens generated per answer.
    """

    def __init__(self, model: Any, processor: Any, *, testbed: bool, max_new_tokens: int = 8) -> None:
        self.model = model
        self.processor = processor
        self.testbed = testbed
        self.max_new_tokens = max_new_tokens

    @staticmethod
    def scene(seed: int | float | None) -> tuple[Any, str, str]:
        """The generated test scene ``seed``: ``(image, question, answer)`` (as ``visiondrop run --seed``)."""
        from ..testbed import make_sample

        if seed is None or float(seed) != int(seed) or int(seed) < 0:
            raise ValueError(f"scene seed {seed!r}: use a whole number >= 0")
        sample = make_sample("test", int(seed))
        return sample.image, sample.question, sample.answer

    @staticmethod
    def open_image(path: str | None) -> Any:
        """The uploaded file as an RGB image, or a one-line error naming the file."""
        from .cli import CLIError, _open_image

        if not path:
            raise ValueError("no image: upload one or pick a generated scene")
        try:
            return _open_image(path)
        except CLIError as err:
            # The CLI names the option and the full temporary path; the page names the file the user picked.
            raise ValueError(str(err).replace(f"--image {path!r}", f"image {Path(path).name!r}")) from None

    def ask(
        self,
        image: Any,
        question: str,
        methods: list[tuple[str, str, str, str]],
        expected: str | None = None,
    ) -> Outcome:
        """Answer ``question`` about ``image`` unpruned and under each method.

        Parameters
        ----------
        image : PIL.Image.Image
            RGB image.
        question : str
            The question.
        methods : list of (name, budget, budget_mode, fields)
            Text as typed in the page; ``fields`` uses ``visiondrop run --set`` syntax (``key=value,key=value``).
        expected : str, optional
            The generated scene's answer, shown next to the result.

        Raises
        ------
        ValueError, TypeError, visiondrop.tools.cli.CLIError
            One line naming the field and value; the model is left as it was.
        """
        from ..testbed import unknown_words
        from .cli import generate_answer, prepare_inputs
        from .viz import draw_stages

        question = (question or "").strip()
        if not question:
            raise ValueError("no question: type one")
        built = [
            (name, _build_method(name, budget, mode, fields), budget, mode, fields)
            for name, budget, mode, fields in methods
        ]
        notes = []
        if self.testbed:
            unknown = unknown_words(question, self.processor.tokenizer)
            if unknown:
                notes.append(
                    f"Words outside the testbed vocabulary are read as `<unk>`: {', '.join(unknown)}"
                )
        inputs = prepare_inputs(self.model, self.processor, image, question, testbed=self.testbed)
        start = time.perf_counter()
        unpruned, _ = generate_answer(self.model, self.processor, inputs, self.max_new_tokens)
        unpruned_seconds = time.perf_counter() - start
        outcomes = []
        for name, method, budget, mode, fields in built:
            start = time.perf_counter()
            answer, report = generate_answer(self.model, self.processor, inputs, self.max_new_tokens, method)
            seconds = time.perf_counter() - start
            settings = f"budget {budget}, {mode}" + (f", {fields}" if fields else "")
            title = f"{name}, {settings} - Q: {question} A: {answer}"
            picture = draw_stages(image, report.images[0], title=title)
            outcomes.append(MethodOutcome(name, settings, answer, seconds, report, picture))
        return Outcome(question, unpruned, unpruned_seconds, outcomes, expected=expected, notes=notes)


def build_app(session: DemoSession, title: str = "visiondrop demo") -> Any:
    """The Gradio page around ``session`` (``gradio.Blocks``, not launched).

    Every error the library or the CLI's parsers raise for bad input (``ValueError``, ``TypeError``, ``CLIError``)
    is shown in the page as its one line (``gradio.Error``); the server goes on serving.
    """
    import gradio as gr

    from ..methods import available_methods
    from .cli import CLIError

    names = available_methods()
    user_errors = (ValueError, TypeError, CLIError)

    def on_scene(seed: Any) -> tuple[Any, str, str]:
        try:
            image, question, answer = session.scene(seed)
        except user_errors as err:
            raise gr.Error(str(err), print_exception=False) from None
        return image, question, answer

    def on_run(
        image: Any,
        question: str,
        method: str,
        budget: str,
        mode: str,
        fields: str,
        compare: str,
        compare_fields: str,
        scene_answer: str,
    ) -> tuple[Any, ...]:
        # The listener runs with preprocess=False: ``image`` is Gradio's file payload (or None), so that a file that
        # is not an image reaches our own check and its one-line error instead of failing inside Gradio.
        path = image.get("path") if isinstance(image, dict) else image
        try:
            picture = session.open_image(path)
            requests = [(method, budget, mode, fields or "")]
            if compare and compare != NO_METHOD:
                requests.append((compare, budget, mode, compare_fields or ""))
            outcome = session.ask(picture, question, requests, expected=scene_answer or None)
        except user_errors as err:
            raise gr.Error(str(err), print_exception=False) from None
        first = outcome.methods[0]
        second = outcome.methods[1] if len(outcome.methods) > 1 else None
        return (
            outcome.unpruned,
            first.answer,
            second.answer if second else "",
            outcome.summary(),
            first.picture,
            gr.update(value=second.picture if second else None, visible=second is not None),
            "\n\n".join(str(m.report) for m in outcome.methods),
        )

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(
            f"## {title}\nUpload an image or pick a generated scene, ask a question, and compare the unpruned answer "
            "with what a pruning method answers from the visual tokens it keeps. In the pictures, kept patches are "
            "outlined in white, merged ones are tinted with their token's colour, dropped ones are dark."
        )
        scene_answer = gr.State("")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(
                    label="image",
                    type="filepath",
                    sources=["upload"],
                    # PNG, not Gradio's default webp: a generated scene must reach the model pixel for pixel.
                    format="png",
                    buttons=["fullscreen"],
                    elem_id="image",
                    height=300,
                )
                with gr.Row():
                    seed = gr.Number(label="scene seed", value=0, precision=0, minimum=0, elem_id="seed")
                    scene = gr.Button("generated scene", elem_id="scene")
                question = gr.Textbox(label="question", elem_id="question")
                with gr.Row():
                    method = gr.Dropdown(names, value="visiondrop", label="method", elem_id="method")
                    budget = gr.Textbox(
                        value="64", label="budget (tokens per image, or a fraction)", elem_id="budget"
                    )
                    mode = gr.Radio(
                        ["average", "input"], value="average", label="budget mode", elem_id="mode"
                    )
                fields = gr.Textbox(
                    label="fields (key=value,key=value as `visiondrop run --set`)",
                    placeholder="e.g. positions=compact,merge=mean",
                    elem_id="fields",
                )
                with gr.Row():
                    compare = gr.Dropdown(
                        [NO_METHOD, *names], value=NO_METHOD, label="compare with", elem_id="compare"
                    )
                    compare_fields = gr.Textbox(label="its fields", elem_id="compare-fields")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                with gr.Row():
                    answer_none = gr.Textbox(
                        label="unpruned answer", interactive=False, elem_id="answer-unpruned"
                    )
                    answer_a = gr.Textbox(label="method's answer", interactive=False, elem_id="answer-a")
                    answer_b = gr.Textbox(
                        label="compared method's answer", interactive=False, elem_id="answer-b"
                    )
                summary = gr.Markdown(elem_id="summary")
        # Full width: one panel per stage side by side. No "share" button (it posts to the Hugging Face hub).
        picture_a = gr.Image(
            label="what the method keeps, per stage",
            show_label=False,  # the picture carries its own title (method, budget, question, answer)
            interactive=False,
            format="png",
            buttons=["download", "fullscreen"],
            elem_id="picture-a",
        )
        picture_b = gr.Image(
            label="what the compared method keeps",
            show_label=False,  # the picture carries its own title (method, budget, question, answer)
            interactive=False,
            visible=False,
            buttons=["download", "fullscreen"],
            elem_id="picture-b",
        )
        with gr.Accordion("report (as `visiondrop run` prints it)", open=False):
            report = gr.Textbox(show_label=False, lines=8, interactive=False, elem_id="report")

        scene.click(on_scene, inputs=seed, outputs=[image, question, scene_answer])
        # A new upload is no generated scene any more: forget the scene's answer.
        image.upload(lambda: "", outputs=scene_answer)
        run.click(
            on_run,
            inputs=[image, question, method, budget, mode, fields, compare, compare_fields, scene_answer],
            outputs=[answer_none, answer_a, answer_b, summary, picture_a, picture_b, report],
            preprocess=False,
        )
    return app


def _import_gradio() -> Any:
    # Before the import: Gradio reads these when it loads and when Blocks are made.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        from .cli import CLIError

        raise CLIError(INSTALL_HINT) from None
    return gradio


def cmd_demo(args: argparse.Namespace) -> int:
    """``visiondrop demo``: load the model once, serve the page until interrupted."""
    import logging

    if args.model is None:
        # The shipped model is on disk: nothing needs the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _import_gradio()
    from .cli import load_model

    model, processor = load_model(args.model, args.dtype)
    session = DemoSession(model, processor, testbed=args.model is None, max_new_tokens=args.max_new_tokens)
    app = build_app(session, title=f"visiondrop demo - {args.model or 'the shipped testbed model'}")
    # One request at a time: the model is shared and a method's hooks are installed on it for the call.
    app.queue(default_concurrency_limit=1)
    logging.getLogger("visiondrop").warning("serving on http://%s:%d (Ctrl+C stops)", args.host, args.port)
    app.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        footer_links=[],
        quiet=True,
    )
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``visiondrop demo``."""
    demo = subparsers.add_parser(
        "demo", help="web page: ask about an image, see what each method keeps (gradio)"
    )
    demo.add_argument("--model", help="HF id or local folder (default: the shipped testbed model)")
    demo.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)"
    )
    demo.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    demo.add_argument("--dtype", default="float32")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.set_defaults(func=cmd_demo)

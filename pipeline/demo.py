"""`hlwq demo ARTIFACT_OR_REPO`: a browser chat with an artifact (Gradio), on 127.0.0.1 unless --share is given.

Text and image messages, answers streamed, sliders for max new tokens / temperature / KV-cache bits, and a panel
with the artifact's card figures and the last answer's tok/s and peak memory. Gradio is an optional extra
(`pip install hlwq[demo]`); only this module imports it, and only when the demo starts. Analytics and its version
check are off, so the page and the server contact nothing but the machine they run on.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.chat import COMPILE_HELP
from pipeline.errors import InputError, PipelineError

if TYPE_CHECKING:
    from pipeline.runtime.engine import Engine, Message

log = logging.getLogger(__name__)
ERROR = "⚠ "  # starts every message the demo writes in place of an answer; such exchanges never reach the model


def register_cli(sub: Any) -> None:
    d = sub.add_parser("demo", help="a browser chat with an artifact (Gradio), on 127.0.0.1")
    d.add_argument("artifact", metavar="ARTIFACT_OR_REPO")
    d.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (7860)")
    d.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    d.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    d.add_argument(
        "--decoder",
        choices=["auto", "lean", "hf"],
        default="auto",
        help="greedy answers by the lean CUDA-graph decoder or transformers' generate (auto: lean on a GPU)",
    )
    d.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    d.set_defaults(func=run)


def _quiet_gradio() -> None:
    """Before gradio is imported: no analytics, no version check, no Hub telemetry."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("GRADIO_SERVER_NAME", "127.0.0.1")


def run(args: argparse.Namespace) -> int:
    from pipeline.runtime.engine import MAX_IMAGE_BYTES, Engine

    _quiet_gradio()
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise PipelineError("the demo needs gradio: pip install 'hlwq[demo]' (or -r requirements.lock)") from None
    engine, error = None, None
    try:
        engine = Engine.open(args.artifact, args.device, args.decoder, args.compile)
    except PipelineError as e:  # the page says why; a demo that will not start tells nobody anything
        error = str(e)
        log.error("%s", error)
    app = build_app(engine, error, args.artifact)
    try:
        app.queue(default_concurrency_limit=1).launch(
            server_name="127.0.0.1", server_port=args.port, share=args.share, ssr_mode=False, mcp_server=False,
            max_file_size=MAX_IMAGE_BYTES, show_error=False, quiet=True, footer_links=[], prevent_thread_lock=True,
        )  # fmt: skip
    except OSError as e:  # the port is taken (Gradio says so in its own words)
        raise PipelineError(f"cannot serve on 127.0.0.1:{args.port}: {e}") from None
    print(f"hlwq demo: http://127.0.0.1:{args.port}/" + (f" and {app.share_url}" if app.share_url else "")
          + " (Ctrl-C stops it)", flush=True)  # fmt: skip
    app.block_thread()  # until Ctrl-C or SIGTERM
    return 0


# ---------------------------------------------------------------------------------------------------------------
# History and figures


def _parts(content: Any) -> tuple[str, list[str]]:
    """(text, file paths) of one Gradio chat message's content, whatever shape this Gradio version uses."""
    texts: list[str] = []
    files: list[str] = []
    for item in content if isinstance(content, list | tuple) else [content]:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            if item.get("type") == "text":
                texts.append(str(item.get("text", "")))
            elif "path" in item or "file" in item:
                f = item.get("file", item)
                files.append(str(f["path"] if isinstance(f, dict) else f))
        elif hasattr(item, "path"):
            files.append(str(item.path))
    return "".join(texts), files


def to_messages(history: list[dict[str, Any]]) -> list[Message]:
    """The page's history as engine messages: consecutive user entries (an image, then its text) merge into one;
    an exchange whose answer is a demo error is left out."""
    from pipeline.runtime.engine import Message, open_image

    out: list[Message] = []
    user_text, user_images = "", []
    for entry in history:
        text, files = _parts(entry.get("content"))
        if entry.get("role") == "user":
            user_text += text
            user_images += [open_image(f) for f in files]
        else:
            if not text.startswith(ERROR):
                out += [Message("user", user_text, tuple(user_images)), Message("assistant", text)]
            user_text, user_images = "", []
    return out


def card_markdown(engine: Engine | None, error: str | None, source: str) -> str:
    if engine is None:
        return f"### {source}\n\n{ERROR}**The artifact did not load.** {error}"
    rows = "\n".join(f"| {k} | {v} |" for k, v in engine.card())
    return f"### Artifact\n\n| figure | value |\n|---|---|\n{rows}\n"


# ---------------------------------------------------------------------------------------------------------------
# The app


def build_app(engine: Engine | None, error: str | None, source: str) -> Any:
    _quiet_gradio()
    import gradio as gr

    from pipeline.runtime.engine import Message, Settings, kv_support, open_image

    def respond(message: dict[str, Any], history: list[dict[str, Any]], max_new: float, temperature: float,
                kv_bits: float) -> Iterator[tuple[str, str]]:  # fmt: skip
        if engine is None:
            yield f"{ERROR}The artifact did not load: {error}", f"{ERROR}{error}"
            return
        try:
            text = str(message.get("text") or "").strip()
            images = tuple(open_image(f if isinstance(f, str) else f["path"]) for f in message.get("files") or [])
            if not text and not images:
                raise InputError("empty prompt: type a message (or attach an image)")
            settings = Settings(max_new_tokens=int(max_new), temperature=float(temperature),
                                kv_bits=int(kv_bits) or None)  # fmt: skip
            gen = engine.generate([*to_messages(history), Message("user", text, images)], settings)
            answer = ""
            for piece in gen:
                answer += piece
                yield answer, f"**Streaming:** {gen.tokens} tokens · {gen.live_tok_s():.1f} tok/s"
            yield answer, f"**Last answer:** {gen.stats.line() if gen.stats else ''}"
        except PipelineError as e:
            yield f"{ERROR}{e}", f"{ERROR}{e}"
        except Exception as e:  # a bug or an out-of-memory: one line in the page, the traceback in the server log
            log.exception("answer failed")
            yield f"{ERROR}internal error: {type(e).__name__}: {e}", f"{ERROR}internal error"

    # Built unrendered, placed below: ChatInterface renders its own parts, the panel goes in the right column.
    stats = gr.Markdown("", elem_id="stats", render=False)
    box = gr.MultimodalTextbox(elem_id="prompt", file_types=["image"], sources=["upload"], render=False,
                               placeholder="Type a message, attach an image…")  # fmt: skip
    settings: list[Any] = [
        gr.Slider(1, 2048, value=128, step=1, label="max new tokens", elem_id="max_new", render=False),
        gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)", render=False),
        gr.Slider(0, 8, value=0, step=1, label="KV-cache bits (0 = BF16)", elem_id="kv_bits", render=False),
    ]
    with gr.Blocks(title="HLWQ demo", analytics_enabled=False) as app:
        gr.Markdown(f"## HLWQ — chat with `{source}`")
        with gr.Row():
            with gr.Column(scale=3):
                gr.ChatInterface(
                    respond,
                    multimodal=True,
                    chatbot=gr.Chatbot(elem_id="chatbot", height=440, render=False),
                    textbox=box,
                    additional_inputs=settings,
                    additional_inputs_accordion=gr.Accordion("generation settings", open=True, render=False),
                    additional_outputs=[stats],
                    flagging_mode="never",
                    analytics_enabled=False,
                    fill_height=False,
                )
            with gr.Column(scale=2):
                gr.Markdown(card_markdown(engine, error, source), elem_id="card")
                stats.render()
                note = kv_support(4, "the KV-cache slider") if engine is not None else None
                if note:
                    gr.Markdown(f"*{note}.*", elem_id="kv_note")
    return app

"""`hlwq chat` and the engine behind it, on the tiny artifact (random weights: the answers are gibberish, the tests
check streaming, the conversation, images and refusals). The terminal chat runs in a real pseudo-terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import InputError
from pipeline.runtime.engine import Chat, Engine, IncrementalDecoder, Message, Settings, kv_support, open_image
from tests.conftest import ROOT

TEST_IMAGE = ROOT / "pipeline" / "assets" / "test_image.png"
CLI = [sys.executable, "-m", "pipeline.cli", "chat"]


@pytest.fixture(scope="module")
def engine(tiny_artifact: Path) -> Engine:
    return Engine.open(tiny_artifact, "cpu")


@pytest.fixture(scope="module")
def huge_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8000x7000 PNG: small on disk (one colour), over the engine's pixel limit."""
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "huge.png"
    Image.new("RGB", (8000, 7000), (20, 160, 40)).save(path)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------------------------
# The engine


def test_incremental_decoder_never_splits_a_character() -> None:
    """Byte-level tokens: a multi-byte character spans several tokens; no piece may end inside it, and the pieces
    add up to the full decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "héllo wörld — 日本語 ok"
    ids = fast(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode())  # one token per byte: the case the hold-back exists for
    dec, pieces = IncrementalDecoder(fast), []
    for i in range(1, len(ids) + 1):
        pieces.append(dec.step(ids[:i]))
    pieces.append(dec.flush(ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 10  # it streamed, not one piece at the end


def test_answers_stream_and_report_figures(engine: Engine) -> None:
    chat = Chat(engine, Settings(max_new_tokens=10))
    gen = chat.send("hello there")
    pieces, counts = [], []
    for piece in gen:
        pieces.append(piece)
        counts.append(gen.tokens)
    assert counts == list(range(1, 11)) and gen.live_tok_s() > 0  # live figures while it streams
    assert len(pieces) == gen.stats.new_tokens == 10  # the word-level tokenizer: one piece per token
    assert "".join(pieces) == gen.text and re.fullmatch(r"w\d+( w\d+){9}", gen.text)
    s = gen.stats
    assert s.tok_s > 0 and s.first_token_s > 0 and s.prompt_tokens > 2
    assert s.memory_kind == "peak RSS" and 0.05 < s.peak_memory_gb < 64
    assert not s.stopped and "10 tokens" in s.line() and "tok/s" in s.line()
    assert [m.role for m in chat.messages] == ["user", "assistant"] and chat.messages[1].text == gen.text


def test_stop_ends_a_streaming_answer(engine: Engine) -> None:
    """Stopping after the first piece ends the answer early: the text arrives while it is being generated."""
    gen = Chat(engine, Settings(max_new_tokens=400)).send("count")
    got = []
    for piece in gen:
        got.append(piece)
        gen.stop()
    assert gen.stats.stopped and 1 <= gen.stats.new_tokens < 50 and len(got) == gen.stats.new_tokens


def test_conversation_images_and_reset(engine: Engine) -> None:
    chat = Chat(engine, Settings(max_new_tokens=8))
    first = "".join(chat.send("hello there"))
    second = "".join(chat.send("hello there"))  # same words, now after a first exchange
    chat.attach(TEST_IMAGE)
    with_image = chat.send("hello there")
    assert "".join(with_image) and with_image.stats.prompt_tokens > 60  # the image's soft tokens are in the prompt
    chat.reset()
    assert chat.messages == [] and chat.pending == []
    assert "".join(chat.send("hello there")) == first  # greedy: after reset, the first answer again
    assert first != second or first != with_image.text


def test_the_pixels_reach_the_vision_tower(engine: Engine) -> None:
    """Same prompt, same image size, other pixels: another answer (the image is seen, not just its token count)."""
    from PIL import ImageOps

    def answer(image: object) -> str:
        chat = Chat(engine, Settings(max_new_tokens=8))
        chat.pending.append(image)
        return "".join(chat.send("w5 w6"))

    picture = open_image(TEST_IMAGE)
    assert answer(picture) == answer(picture.copy())  # deterministic
    assert answer(picture) != answer(ImageOps.invert(picture))


def test_chat_template_and_image_block(engine: Engine) -> None:
    """With a chat template, the prompt is the template's text; each image becomes begin-of-image, one token per
    soft token, end-of-image, where the image stood."""
    cfg = engine.model.config
    template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    template += "{% if add_generation_prompt %}w9{% endif %}"
    engine.tokenizer.chat_template = template
    try:
        msgs = [Message("user", "w5 w6", (open_image(TEST_IMAGE),))]
        assert engine.render(msgs) == ("user \x00hlwq-image\x00w5 w6 w9", True)
        inputs = engine.inputs(msgs)
    finally:
        engine.tokenizer.chat_template = None
    ids = inputs["input_ids"][0].tolist()
    n = int(inputs["mm_token_type_ids"].sum())  # soft tokens: 70 at most, fewer for a non-square image
    assert 30 < n <= 70 and inputs["pixel_values"].shape[0] == 1
    unk = engine.tokenizer.unk_token_id
    assert ids == [unk, cfg.boi_token_id, *[cfg.image_token_id] * n, cfg.eoi_token_id, 5, 6, 9]


def test_bad_inputs_are_one_line(engine: Engine, tmp_path: Path, huge_image: Path) -> None:
    chat = Chat(engine)
    with pytest.raises(InputError, match="no such file"):
        chat.attach(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="not a readable image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(InputError, match=r"8000x7000 pixels is over the 50-megapixel limit"):
        open_image(huge_image)
    with pytest.raises(InputError, match="empty prompt"):
        chat.send("   ")
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"kv_bits": 12}):
        with pytest.raises(InputError):
            Settings(**bad)  # type: ignore[arg-type]
    assert chat.messages == []


def test_kv_bits_are_applied_or_the_ui_says_why(engine: Engine) -> None:
    try:
        import pipeline.runtime.kv_cache  # noqa: F401
    except ImportError:
        assert kv_support(3) == "KV cache stays BF16: --kv-bits needs pipeline.runtime.kv_cache, which this build lacks"
        gen = Chat(engine, Settings(max_new_tokens=4, kv_bits=3)).send("hello")
        "".join(gen)
        assert "3-bit not applied" in gen.stats.kv
    else:
        assert kv_support(3) is None
        gen = Chat(engine, Settings(max_new_tokens=4, kv_bits=3)).send("hello")
        assert "".join(gen) and gen.stats.kv == "KV cache HLWQ 3-bit"
    assert kv_support(None) is None


def test_card_figures_come_from_the_artifact(engine: Engine, tiny_artifact: Path) -> None:
    import json

    card = dict(engine.card())
    summary = json.loads((tiny_artifact / "hlwq_report.json").read_text())["summary"]
    assert card["bits per quantized weight"] == f"{summary['bits_per_weight_quantized']:.3f}"
    assert card["median weight cos-sim"] == f"{summary['median_cos_sim']:.6f}"
    assert card["weight bits"] == "5" and card["output KL vs BF16"].startswith("not benched")


# ---------------------------------------------------------------------------------------------------------------
# The terminal chat in a pseudo-terminal


class Terminal:
    """A child process on a real pseudo-terminal (it is the controlling tty: Ctrl-C sends SIGINT)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec or die, never return into pytest
            try:
                os.chdir(ROOT)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        termios.tcsetwinsize(fd, (40, 200))  # a real size: readline misbehaves on a 0x0 terminal
        self.buf = ""
        self.transcript = ""
        self.exited = False

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Everything up to and including the first match of `pattern`."""
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.buf)):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{self.transcript[-3000:]}")
            try:
                data = os.read(self.fd, 65536).decode(errors="replace")
            except OSError:  # EIO: the child closed the terminal
                data = ""
            if not data:
                raise AssertionError(f"chat exited waiting for {pattern!r}; output:\n{self.transcript[-3000:]}")
            self.buf += data
            self.transcript += data
        out, self.buf = self.buf[: m.end()], self.buf[m.end() :]
        return out

    def answer(self) -> tuple[str, str]:
        """(streamed answer text, status line) of the next answer."""
        out = self.expect(r"\[[^\]\n]*tok/s[^\]\n]*\]\r?\n")
        m = re.search(r"model> (.*?)\r?\n\[([^\]]*)\]", out, re.S)
        assert m, out
        return m.group(1), m.group(2)

    def close(self) -> int:
        """Exit status, after EOF; SIGKILL by pid if it does not exit."""
        for _ in range(100):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exited = True
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        self.kill()
        raise AssertionError("chat did not exit")

    def kill(self) -> None:
        if not self.exited:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)
            self.exited = True


def test_terminal_chat_in_a_pty(tiny_artifact: Path) -> None:
    term = Terminal([*CLI, str(tiny_artifact), "--max-new-tokens", "8"], _env())
    try:
        term.expect(r"hlwq chat: .*5-bit weights")
        term.expect("you> ")
        term.send("hello there\n")
        first, status = term.answer()
        assert re.fullmatch(r"w\d+( w\d+){7}", first), first
        assert re.search(r"8 tokens in [\d.]+ s · [\d.]+ tok/s decode · .* peak RSS [\d.]+ GB · KV cache BF16", status)

        term.expect("you> ")
        term.send(f"/image {TEST_IMAGE}\n")
        term.expect(r"\[image .*test_image\.png attached to your next message\]")
        term.expect("you> ")
        term.send("hello there\n")
        with_image, _ = term.answer()
        assert with_image and with_image != first

        term.expect("you> ")
        term.send("/image /no/such/picture.png\n")
        out = term.expect("you> ")
        lines = [ln for ln in out.replace("\r", "").split("\n") if ln.strip() and ln != "you> "]
        assert lines == ["/image /no/such/picture.png", "hlwq: image /no/such/picture.png: no such file"], lines

        term.send("/reset\n")
        term.expect(r"\[conversation reset\]")
        term.expect("you> ")
        term.send("hello there\n")
        again, _ = term.answer()
        assert again == first  # greedy, and the conversation really was forgotten

        # Ctrl-C while an answer streams stops that answer; the chat goes on.
        term.expect("you> ")
        term.send("/max 3000\n")
        term.expect(r"\[max new tokens: 3000\]")
        term.expect("you> ")
        term.send("count\n")
        term.expect(r"model> w\d+")
        term.send("\x03")
        stopped = re.search(r"\[(\d+) tokens \(stopped\) in", term.expect(r"tok/s[^\]\n]*\]\r?\n"))
        assert stopped and int(stopped.group(1)) < 3000
        term.expect("you> ")
        term.send("\x04")  # Ctrl-D at the prompt quits
        assert term.close() == 0
    finally:
        term.kill()
    assert "Traceback" not in term.transcript


@pytest.mark.parametrize("decoder", ["auto", "lean"])
def test_piped_chat_reads_one_prompt_per_line(tiny_artifact: Path, decoder: str) -> None:
    lines = ["hello there", f"/image {TEST_IMAGE}", "hello there", "", "/reset", "hello there"]
    r = subprocess.run([*CLI, str(tiny_artifact), "--max-new-tokens", "6", "--decoder", decoder],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, env=_env(), cwd=ROOT,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == 3 and all(re.fullmatch(r"w\d+( w\d+){5}", a) for a in answers), r.stdout
    assert answers[0] == answers[2] != answers[1]
    figures = re.findall(r"^\[6 tokens in .* tok/s decode .*\]$", r.stderr, re.M)
    assert len(figures) == 3 and all(("lean decoder" in f) == (decoder == "lean") for f in figures)


def test_piped_chat_goes_on_after_a_refused_line(tiny_artifact: Path) -> None:
    lines = ["/image /no/such/picture.png", "/frobnicate", "hello there"]
    r = subprocess.run([*CLI, str(tiny_artifact), "--max-new-tokens", "4"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)  # fmt: skip
    assert r.returncode == 1  # refused lines make a script's run fail, after every line was handled
    assert re.fullmatch(r"w\d+( w\d+){3}\n", r.stdout)
    refusals = [ln for ln in r.stderr.splitlines() if ln.startswith("hlwq: ")]
    assert len(refusals) == 2 and refusals[0] == "hlwq: image /no/such/picture.png: no such file"
    assert refusals[1].startswith("hlwq: unknown command /frobnicate")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{art}", "--image", "/no/such/picture.png"], "hlwq: error: image /no/such/picture.png: no such file"),
        (["/no/such/artifact"], "not an artifact folder nor a Hub repo id"),
        (["nobody/nothing"], "hlwq: error: nobody/nothing: cannot load: "),
        (["{art}", "--kv-bits", "12"], "hlwq: error: KV-cache bits must be 1..8"),
    ],
)
def test_chat_refuses_bad_arguments_in_one_line(tiny_artifact: Path, args: list[str], message: str) -> None:
    argv = [a.format(art=tiny_artifact) for a in args]
    r = subprocess.run([*CLI, *argv], input="", capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("hlwq:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_the_pipeline_does_not_import_gradio() -> None:
    """gradio is an optional extra: the CLI (chat and demo subcommands registered) loads without it."""
    code = "import sys, pipeline.cli as c; c.build_parser(); print('gradio' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_demo_history_becomes_engine_messages() -> None:
    """The page's history as Gradio 6 hands it to the chat function (shape recorded from a live run): an image and
    its text make one user message; an exchange the demo answered with an error is left out."""
    from pipeline.demo import ERROR, to_messages

    file = {"path": str(TEST_IMAGE), "url": "/gradio_api/file=x", "mime_type": "image/png",
            "meta": {"_type": "gradio.FileData"}}  # fmt: skip
    history = [
        {"role": "user", "content": [{"file": file, "type": "file"}, {"text": "hello there", "type": "text"}]},
        {"role": "assistant", "metadata": None, "content": [{"text": "w206 w69", "type": "text"}]},
        {"role": "user", "content": [{"text": "   ", "type": "text"}]},
        {"role": "assistant", "content": [{"text": f"{ERROR}empty prompt: type a message", "type": "text"}]},
        {"role": "user", "content": "w5"},
        {"role": "assistant", "content": "w7"},
    ]
    msgs = to_messages(history)
    want = [("user", "hello there", 1), ("assistant", "w206 w69", 0), ("user", "w5", 0), ("assistant", "w7", 0)]
    assert [(m.role, m.text, len(m.images)) for m in msgs] == want
    assert msgs[0].images[0].size == open_image(TEST_IMAGE).size


def test_the_lean_decoder_answers_as_generate_does(tiny_artifact: Path) -> None:
    """decoder "lean" (auto picks it on a GPU): the same greedy answers, with and without an image; sampling and a
    compressed KV cache still go through generate."""
    lean = Engine.open(tiny_artifact, "cpu", decoder="lean")
    hf = Engine.open(tiny_artifact, "cpu", decoder="hf")
    for eng in (lean, hf):  # float32: the tokens then depend on the arithmetic, not on bf16 rounding order
        eng.model.float()
    for image in (None, TEST_IMAGE):
        answers = []
        for eng in (lean, hf):
            chat = Chat(eng, Settings(max_new_tokens=12))
            if image is not None:
                chat.attach(image)
            gen = chat.send("hello there")
            answers.append(("".join(gen), gen.stats.new_tokens, gen.stats.kv))
        (text, n, kv), (ref_text, ref_n, ref_kv) = answers
        assert (text, n) == (ref_text, ref_n) and n > 0
        assert kv.endswith("lean decoder") and "lean" not in ref_kv
    assert lean.lean_for(lean.inputs([Message("user", "hi")]), Settings(temperature=0.7)) is None


def test_kv_bits_answer_through_the_lean_decoder_with_its_compressed_cache(tiny_artifact: Path) -> None:
    """--kv-bits with the lean decoder: the answer is that of a LeanDecoder holding the same compressed cache
    (full-attention layers as codes, sliding layers BF16), and the decoder is rebuilt when the bits change."""
    from pipeline.runtime.decode import LeanDecoder
    from pipeline.runtime.kv_cache import KVCacheConfig

    eng = Engine.open(tiny_artifact, "cpu", decoder="lean")
    eng.model.float()
    gen = Chat(eng, Settings(max_new_tokens=10, kv_bits=4)).send("hello there")
    text = "".join(gen)
    assert gen.stats.kv == "KV cache HLWQ 4-bit (full-attention layers; sliding BF16) · lean decoder"
    assert gen.stats.new_tokens > 0
    assert eng._lean.packed is not None and eng._lean_bits == 4
    ids = eng.inputs([Message("user", "hello there")])["input_ids"]
    ref = LeanDecoder(eng.model, max_len=2048, kv_cache=KVCacheConfig(bits=4, sliding="bf16"))
    tokens = ref.generate(ids, gen.stats.new_tokens).tokens
    assert text == eng.tokenizer.decode(tokens, skip_special_tokens=True)
    gen = Chat(eng, Settings(max_new_tokens=4)).send("hello there")
    "".join(gen)
    assert gen.stats.kv == "KV cache BF16 · lean decoder" and eng._lean.packed is None
    with pytest.raises(InputError, match="decoder must be one of"):
        Engine.open(tiny_artifact, "cpu", decoder="fast")


def test_the_compiled_lean_decoder_answers_as_generate_does(tiny_artifact: Path) -> None:
    """--compile: the lean decoder's layers go through torch.compile (on the CPU too), with generate's answer, and the
    status line says so."""
    answers = []
    for eng in (Engine.open(tiny_artifact, "cpu", decoder="lean", compile_layers=True),
                Engine.open(tiny_artifact, "cpu", decoder="hf")):  # fmt: skip
        eng.model.float()
        gen = Chat(eng, Settings(max_new_tokens=8)).send("hello there")
        answers.append(("".join(gen), gen.stats.new_tokens, gen.stats.kv))
    (text, n, kv), (ref_text, ref_n, _) = answers
    assert kv.endswith("lean decoder, compiled") and (text, n) == (ref_text, ref_n) and n > 0


def test_a_lean_decoder_that_fails_hands_the_answer_to_generate(tiny_artifact: Path, monkeypatch) -> None:
    from pipeline.runtime.decode import LeanDecoder

    ref = "".join(Chat(Engine.open(tiny_artifact, "cpu", decoder="hf"), Settings(max_new_tokens=6)).send("hi"))

    def broken(*args: object, **kwargs: object):
        raise RuntimeError("capture failed")
        yield 0  # a generator, as the real one

    monkeypatch.setattr(LeanDecoder, "stream", broken)
    eng = Engine.open(tiny_artifact, "cpu", decoder="lean")
    gen = Chat(eng, Settings(max_new_tokens=6)).send("hi")
    assert "".join(gen) == ref and "lean" not in gen.stats.kv and eng.decoder == "hf"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("compile_layers", "status"), [(False, "lean decoder"), (True, "lean decoder, compiled")])
def test_the_engine_answers_through_the_lean_decoder_on_a_gpu(tiny_artifact: Path, compile_layers: bool,
                                                              status: str) -> None:  # fmt: skip
    """On a GPU, decoder "auto" is the lean decoder (native kernels, fused step, CUDA graph; with --compile its layers
    through torch.compile too) and it keeps serving: two answers on the same decoder, each equal to generate's on the
    same engine settings (float32, so bf16 rounding order cannot differ)."""
    auto = Engine.open(tiny_artifact, "cuda", compile_layers=compile_layers)
    hf = Engine.open(tiny_artifact, "cuda", decoder="hf")
    for eng in (auto, hf):
        eng.model.float()
    for prompt in ("hello there", "and again"):
        answers = []
        for eng in (auto, hf):
            gen = Chat(eng, Settings(max_new_tokens=12)).send(prompt)
            answers.append(("".join(gen), gen.stats.new_tokens, gen.stats.kv))
        (text, n, kv), (ref_text, ref_n, ref_kv) = answers
        assert kv.endswith(status) and "lean" not in ref_kv, f"the lean decoder fell back to generate: {kv!r}"
        assert auto.decoder != "hf"
        assert (text, n) == (ref_text, ref_n) and n > 0

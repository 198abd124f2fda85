"""One engine behind `hlwq chat` and `hlwq demo`: load an artifact (folder or Hub repo), build the prompt with its
chat template (images through its processor), stream the answer as it is generated, and measure it (decode tok/s,
time to first token, peak memory).

Each answer re-encodes the whole conversation, so a conversation is just a list of messages: the terminal keeps one
in a `Chat`, the browser demo rebuilds it from the page's history (one engine, many browser sessions).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import queue
import re
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import FormatError, InputError, PipelineError, RuntimeBackendError

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 50_000_000  # the vision tower sees at most a few hundred patches; bigger only costs decode RAM
MAX_IMAGE_BYTES = 32 * 2**20
MAX_NEW_TOKENS = 8192
DECODERS = ("auto", "lean", "hf")
IMAGE_SLOT = "\x00hlwq-image\x00"  # stands for one image in rendered template text; never typed by a user


# ---------------------------------------------------------------------------------------------------------------
# Settings, messages, figures


@dataclass(frozen=True)
class Settings:
    """Per-answer generation settings. temperature 0 = greedy; kv_bits None = the model's own BF16 cache."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    kv_bits: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InputError(f"max new tokens must be 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise InputError(f"temperature must be 0..5, got {self.temperature}")
        if self.kv_bits is not None and not 1 <= self.kv_bits <= 8:
            raise InputError(f"KV-cache bits must be 1..8 (or none for BF16), got {self.kv_bits}")


@dataclass(frozen=True)
class Message:
    role: str  # "user" or "assistant"
    text: str
    images: tuple[Any, ...] = ()  # PIL images, shown before the text


@dataclass(frozen=True)
class Stats:
    """Figures of one answer. tok_s counts decode only (tokens after the first over the time after the first), so
    the prompt's prefill shows in first_token_s and not in the rate."""

    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_s: float
    tok_s: float
    peak_memory_gb: float
    memory_kind: str
    kv: str
    stopped: bool = False

    def line(self) -> str:
        stop = " (stopped)" if self.stopped else ""
        return (
            f"{self.new_tokens} tokens{stop} in {self.seconds:.2f} s · {self.tok_s:.1f} tok/s decode · first token "
            f"{self.first_token_s:.2f} s · {self.memory_kind} {self.peak_memory_gb:.2f} GB · {self.kv}"
        )


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GB, what it is): CUDA max allocated since the engine loaded on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "peak GPU memory"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "peak RSS"  # Linux reports KiB


def open_image(source: str | Path) -> Any:
    """An image file as RGB, refused with one line when it is missing, unreadable or too large."""
    from PIL import Image, UnidentifiedImageError

    p = Path(source)
    if not p.is_file():
        raise InputError(f"image {source}: no such file")
    size = p.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise InputError(f"image {p.name}: {size / 2**20:.0f} MB is over the {MAX_IMAGE_BYTES // 2**20} MB limit")
    try:
        with Image.open(p) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise InputError(f"image {p.name}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS // 10**6}-megapixel "
                                 "limit; downscale it first")  # fmt: skip
            return im.convert("RGB")
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"image {p.name}: over the {MAX_IMAGE_PIXELS // 10**6}-megapixel limit") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"image {p.name}: not a readable image ({type(e).__name__})") from None


def kv_support(bits: int | None, setting: str = "--kv-bits") -> str | None:
    """None when a `bits` KV-cache setting will be applied (or none was asked); else the line saying why not."""
    if bits is None:
        return None
    try:
        import pipeline.runtime.kv_cache  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return f"KV cache stays BF16: {setting} needs pipeline.runtime.kv_cache, which this build lacks"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loading


DEQUANTIZED = "reference (dequantized at load)"


def load_model(path_or_repo: str | Path, device: torch.device) -> tuple[nn.Module, Path, str]:
    """The one call into the loader: (model, artifact folder, runtime). The native kernels on CUDA when they are
    installed; else the weights dequantized once at load by the reference codec (same numbers as the reference
    runtime, without dequantizing at every forward)."""
    from pipeline.runtime import load, resolve

    folder = resolve(path_or_repo)
    if device.type == "cuda" and importlib.util.find_spec("pipeline.runtime.kernels") is not None:
        return load(folder, runtime="native", device=device), folder, "native"
    return load(folder, runtime="dequantize", device=device), folder, DEQUANTIZED


def _processor(folder: Path) -> Any | None:
    """The artifact's processor when it ships one that builds; else None (images then use the Gemma-4 layout)."""
    if not any((folder / n).exists() for n in ("processor_config.json", "preprocessor_config.json")):
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder)
    except Exception as e:  # a broken processor should not stop a text chat
        log.warning("the artifact's processor does not build (%s: %s); using the built-in image layout",
                    type(e).__name__, e)  # fmt: skip
        return None


def _tokenizer(folder: Path, processor: Any | None) -> Any:
    if processor is not None and getattr(processor, "tokenizer", None) is not None:
        return processor.tokenizer
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise FormatError(f"{folder}: the artifact ships no tokenizer; chat needs one")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _generation_config(model: nn.Module, folder: Path) -> None:
    """The artifact's generation_config.json (its stop tokens, e.g. Gemma's <end_of_turn>) replaces the one
    derived from config.json."""
    if (folder / "generation_config.json").exists():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------------
# Streaming


class _Queue:
    """A transformers streamer that hands each new token id to the consumer thread (the prompt is skipped)."""

    def __init__(self) -> None:
        self.q: queue.Queue[list[int] | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.q.put(None)


class IncrementalDecoder:
    """Text of a growing token list, piece by piece, in linear time: decode a short window behind the newest
    tokens and emit what it adds (the window absorbs tokenizers whose spacing depends on the previous token);
    hold back while the tail is an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.prefix = 0
        self.read = 0

    def _text(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def step(self, ids: list[int]) -> str:
        before = self._text(ids[self.prefix : self.read])
        now = self._text(ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            return now[len(before) :]
        return ""

    def flush(self, ids: list[int]) -> str:
        before = self._text(ids[self.prefix : self.read])
        now = self._text(ids[self.prefix :])
        self.prefix = self.read = len(ids)
        return now[len(before) :]


class Generation:
    """One answer being generated in a worker thread: iterate it for text pieces as they come; `text` and
    `stats` once it is done; `stop()` ends it early (the tokens so far are kept). Leaving the loop early stops it."""

    def __init__(self, engine: Engine, inputs: dict[str, Any], kwargs: dict[str, Any], kv: str,
                 on_done: Callable[[Generation], None] | None = None, lean: Any = None):  # fmt: skip
        self.engine = engine
        self.inputs = inputs
        self.kwargs = kwargs
        self.lean = lean  # a LeanDecoder that makes this (greedy) answer, or None: transformers' generate
        self.kv = kv
        self.on_done = on_done
        self.text = ""
        self.stats: Stats | None = None
        self.tokens = 0  # so far, for a live figure while it streams
        self.t_first: float | None = None
        self._stop = threading.Event()

    def live_tok_s(self) -> float:
        """Decode rate so far (tokens after the first over the time since the first)."""
        if self.t_first is None or self.tokens < 2:
            return 0.0
        return (self.tokens - 1) / max(time.perf_counter() - self.t_first, 1e-9)

    def stop(self) -> None:
        self._stop.set()

    def _lean_answer(self, streamer: _Queue, stop_flag: threading.Event) -> bool:
        """Stream this answer from the lean decoder; False if it failed before its first token (the answer then goes
        through generate, and so do the engine's next ones: a GPU path that cannot run must not cost the chat)."""
        inp, sent = self.inputs, 0
        try:
            for tok in self.lean.stream(inp["input_ids"], self.kwargs["max_new_tokens"], inp.get("pixel_values"),
                                        inp.get("image_position_ids"), stop_ids=self.engine.eos_ids(),
                                        stop=stop_flag.is_set):  # fmt: skip
                streamer.q.put([tok])
                sent += 1
        except Exception as e:
            if sent:
                raise
            log.warning("the lean decoder failed (%s: %s); answers go through generate", type(e).__name__, e)
            self.engine.decoder, self.engine._lean = "hf", None
            self.kv = self.kv.split(" · lean decoder")[0]
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop_flag = self._stop

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
                done = torch.full((input_ids.shape[0],), stop_flag.is_set(), dtype=torch.bool, device=input_ids.device)
                return done  # type: ignore[return-value]

        eng = self.engine
        streamer = _Queue()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                if self.lean is not None and self._lean_answer(streamer, stop_flag):
                    return
                with torch.inference_mode():
                    eng.model.generate(**self.inputs, **self.kwargs, streamer=streamer,  # type: ignore[operator]
                                       stopping_criteria=StoppingCriteriaList([_Stop()]))  # fmt: skip
            except BaseException as e:  # handed to the consumer, which raises it in its own thread
                errors.append(e)
            finally:
                streamer.end()

        decoder = IncrementalDecoder(eng.tokenizer)
        ids: list[int] = []
        stopped = False
        with eng.lock:  # one generation at a time: the model (and a compressed cache's attention hook) is shared
            t0 = time.perf_counter()
            t_first = t_last = t0
            worker = threading.Thread(target=work, name="hlwq-generate", daemon=True)
            worker.start()
            try:
                while (item := streamer.q.get()) is not None:
                    t_last = time.perf_counter()
                    if not ids:
                        t_first = self.t_first = t_last
                    ids.extend(item)
                    self.tokens = len(ids)
                    piece = decoder.step(ids)
                    if piece:
                        self.text += piece
                        yield piece
                stopped = self._stop.is_set()
                worker.join()
                if errors:
                    raise errors[0]
                tail = decoder.flush(ids)
                if tail:
                    self.text += tail
                    yield tail
            finally:
                self._stop.set()  # a consumer that left early (Ctrl-C, a closed browser tab) ends the worker too
                worker.join()
        n = len(ids)
        gb, kind = peak_memory(eng.device)
        self.stats = Stats(prompt_tokens=int(self.inputs["input_ids"].shape[1]), new_tokens=n,
                           seconds=round(t_last - t0, 3), first_token_s=round(t_first - t0, 3),
                           tok_s=round((n - 1) / (t_last - t_first), 2) if n > 1 and t_last > t_first else 0.0,
                           peak_memory_gb=round(gb, 3), memory_kind=kind, kv=self.kv, stopped=stopped)  # fmt: skip
        if self.on_done is not None:
            self.on_done(self)


# ---------------------------------------------------------------------------------------------------------------
# The engine


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise InputError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")


def _lean_kv_config(bits: int) -> Any:
    """The lean decoder's compressed KV cache for --kv-bits: full-attention layers as codes, sliding layers BF16."""
    from pipeline.runtime.kv_cache import KVCacheConfig  # type: ignore[import-not-found]

    try:
        return KVCacheConfig(bits=bits, sliding="bf16")
    except ValueError as e:
        raise InputError(f"KV-cache bits {bits}: {e}") from None


class Engine:
    """A loaded artifact, ready to answer conversations."""

    def __init__(self, model: Any, folder: Path, tokenizer: Any, processor: Any | None, device: torch.device,
                 runtime: str, source: str, decoder: str = "auto", compile_layers: bool = False):  # fmt: skip
        _check_decoder(decoder)
        self.model: Any = model  # a transformers model (generate, config)
        self.decoder = decoder
        self.compile_layers = compile_layers  # the lean decoder's layers through torch.compile
        self._lean: Any = None  # the LeanDecoder, built on the first answer it makes
        self._lean_bits: int | None = None  # its compressed KV cache's bits (None: BF16)
        self._lean_refused: set[int] = set()  # KV bits the lean decoder could not hold for this model
        self.folder = folder
        self.tokenizer = tokenizer
        self.processor = processor
        self.device = device
        self.runtime = runtime
        self.source = source
        self.lock = threading.Lock()  # one generation at a time: the model and its caches are shared

    @classmethod
    def open(cls, path_or_repo: str | Path, device: str | torch.device | None = None, decoder: str = "auto",
             compile_layers: bool = False) -> Engine:  # fmt: skip
        """Load an artifact folder or Hub repo id: on the GPU when CUDA is present, else on the CPU. decoder: who
        makes greedy answers ("lean": the static-cache CUDA-graph LeanDecoder, "hf": transformers' generate,
        "auto": lean on a GPU); sampled answers always go through generate. A compressed KV cache (kv_bits) in the
        lean decoder holds the full-attention layers as codes and keeps sliding-window layers BF16.
        compile_layers: the lean decoder compiles its layers (the first answer, and the first after the cache grows,
        wait for the compile; later ones decode faster)."""
        _check_decoder(decoder)  # before the load, which takes long
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            model, folder, runtime = load_model(path_or_repo, dev)
            processor = _processor(folder)
            tokenizer = _tokenizer(folder, processor)
            _generation_config(model, folder)
        except PipelineError:
            raise
        except Exception as e:  # a Hub or transformers failure: one line naming the artifact and the cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FormatError(f"{path_or_repo}: cannot load: {type(e).__name__}: {first[:300]}") from None
        return cls(model.eval(), folder, tokenizer, processor, dev, runtime, str(path_or_repo), decoder, compile_layers)

    @property
    def has_vision(self) -> bool:
        return getattr(self.model.config, "vision_config", None) is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype  # type: ignore[operator, union-attr, return-value]

    # -- settings the engine passes on

    def kv_cache(self, bits: int | None) -> tuple[Any | None, str]:
        """(cache to pass to generate or None, a line saying what the KV cache is). The compressed cache is used
        only when pipeline.runtime.kv_cache is installed; otherwise the line says the setting was not applied."""
        if bits is None:
            return None, "KV cache BF16"
        try:
            from pipeline.runtime.kv_cache import make_cache  # type: ignore[import-not-found]
        except ImportError:
            return None, f"KV cache BF16 ({bits}-bit not applied: pipeline.runtime.kv_cache is not in this build)"
        try:
            return make_cache(self.model, bits=bits), f"KV cache HLWQ {bits}-bit"
        except ValueError as e:
            raise InputError(f"KV-cache bits {bits}: {e}") from None

    def generate_kwargs(self, s: Settings) -> tuple[dict[str, Any], str]:
        cache, kv = self.kv_cache(s.kv_bits)
        kw: dict[str, Any] = {"max_new_tokens": s.max_new_tokens}
        if s.temperature > 0:
            kw.update(do_sample=True, temperature=s.temperature)
        else:  # greedy: clear the sampling knobs a generation_config may carry, which generate would warn about
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if cache is not None:
            kw["past_key_values"] = cache
        return kw, kv

    # -- prompts

    def inputs(self, messages: Sequence[Message]) -> dict[str, Any]:
        """Model inputs for a conversation ending with a user message, on the engine's device."""
        if not messages or messages[-1].role != "user":
            raise InputError("the conversation must end with a user message")
        if any(m.images for m in messages) and not self.has_vision:
            raise InputError("this model has no vision tower: it cannot take images")
        if self.processor is not None and getattr(self.processor, "chat_template", None):
            enc = dict(self._processor_inputs(messages))
        else:
            enc = self._manual_inputs(messages)
        out = {}
        for k, v in enc.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
        out.pop("num_soft_tokens_per_image", None)
        return out

    def _processor_inputs(self, messages: Sequence[Message]) -> Any:
        conv = [{"role": m.role, "content": [*({"type": "image", "image": im} for im in m.images),
                                             {"type": "text", "text": m.text}]} for m in messages]  # fmt: skip
        return self.processor.apply_chat_template(  # type: ignore[union-attr]
            conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )

    def render(self, messages: Sequence[Message]) -> tuple[str, bool]:
        """(prompt text with IMAGE_SLOT per image, whether it came from the tokenizer's chat template). Without
        a template: 'user: ...' / 'assistant: ...' lines and an open 'assistant:' line."""
        if getattr(self.tokenizer, "chat_template", None):
            texts = [IMAGE_SLOT * len(m.images) + m.text for m in messages]
            conv: list[dict[str, Any]] = [{"role": m.role, "content": t} for m, t in zip(messages, texts, strict=True)]
            try:
                return str(self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)), True
            except Exception:  # templates that only take content as a list of typed parts
                for c, t in zip(conv, texts, strict=True):
                    c["content"] = [{"type": "text", "text": t}]
                return str(self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)), True
        lines = [f"{m.role}: {IMAGE_SLOT * len(m.images)}{m.text}\n" for m in messages]
        return "".join(lines) + "assistant:", False

    def _manual_inputs(self, messages: Sequence[Message]) -> dict[str, Any]:
        """Token ids built by hand: the rendered text, each image slot replaced by the Gemma-4 image block
        (begin-of-image, one token per soft token, end-of-image)."""
        text, templated = self.render(messages)
        images = [im for m in messages for im in m.images]
        px = self._pixels(images) if images else None
        cfg = self.model.config
        bos = self.tokenizer.bos_token_id
        ids: list[int] = [] if templated or bos is None else [bos]
        pieces = text.split(IMAGE_SLOT)
        for i, piece in enumerate(pieces):
            ids += self.tokenizer(piece, add_special_tokens=False).input_ids if piece else []
            if i < len(pieces) - 1:
                n = int(px["num_soft_tokens_per_image"][i])  # type: ignore[index]
                ids += [cfg.boi_token_id, *[cfg.image_token_id] * n, cfg.eoi_token_id]
        t = torch.tensor([ids])
        out: dict[str, Any] = {"input_ids": t, "attention_mask": torch.ones_like(t)}
        if px is not None:
            out |= {"pixel_values": px["pixel_values"], "image_position_ids": px["image_position_ids"],
                    "mm_token_type_ids": (t == cfg.image_token_id).long()}  # fmt: skip
        return out

    def _pixels(self, images: list[Any]) -> Any:
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        vc = self.model.config.vision_config
        # Gemma-4's processors use 280 soft tokens per image; the small test towers use 70 (as the loader does).
        proc = Gemma4ImageProcessorPil(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                       max_soft_tokens=280 if vc.hidden_size >= 512 else 70)  # fmt: skip
        return proc(images=images, return_tensors="pt")

    # -- answers

    def eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return set() if eos is None else {int(t) for t in (eos if isinstance(eos, list | tuple) else [eos])}

    def lean_for(self, inputs: dict[str, Any], s: Settings) -> Any | None:
        """The LeanDecoder that makes this answer, or None where generate does: sampling, decoder "hf" (or "auto" off
        the GPU), a model it does not run, a compressed KV cache it cannot hold. Its static cache is sized in powers
        of two (>= 2048 tokens) and rebuilt larger when a conversation outgrows it, or when the KV bits change."""
        if s.temperature > 0 or self.decoder == "hf" or s.kv_bits in self._lean_refused:
            return None
        if self.decoder == "auto" and self.device.type != "cuda":
            return None
        text_cfg = self.model.config.get_text_config()
        if "pixel_values" in inputs and getattr(text_cfg, "use_bidirectional_attention", None) is not None:
            return None  # image blocks attended both ways: masks the lean decoder does not build
        need = int(inputs["input_ids"].shape[1]) + s.max_new_tokens
        if self._lean is None or self._lean.max_len < need or self._lean_bits != s.kv_bits:
            from pipeline.runtime.decode import LeanDecoder

            self._lean = None  # the old static cache goes before the new one is allocated
            length = max(2048, 1 << (need - 1).bit_length())
            try:
                kv = None if s.kv_bits is None else _lean_kv_config(s.kv_bits)
                self._lean = LeanDecoder(self.model, max_len=length, compile_layers=self.compile_layers, kv_cache=kv)
            except TypeError as e:  # no decoder stack it knows
                log.info("answers through generate: %s", e)
                self.decoder = "hf"
                return None
            except (ImportError, RuntimeBackendError) as e:
                if s.kv_bits is None:
                    raise
                # a compressed cache it cannot hold: generate has one, for this and later answers at these bits
                log.info("a %s-bit KV cache goes through generate: %s", s.kv_bits, e)
                self._lean_refused.add(s.kv_bits)
                return None
            self._lean_bits = s.kv_bits
        return self._lean

    def generate(self, messages: Sequence[Message], settings: Settings | None = None,
                 on_done: Callable[[Generation], None] | None = None) -> Generation:  # fmt: skip
        """Start answering `messages` (ending with the user's); iterate the result for the streamed text."""
        inputs = self.inputs(messages)
        s = settings or Settings()
        kwargs, kv = self.generate_kwargs(s)
        # A rebuilt decoder does not disturb an answer in progress: that one holds its own (answers run one at a
        # time under the engine's lock).
        lean = self.lean_for(inputs, s)
        how = "" if lean is None else " · lean decoder" + (", compiled" if self.compile_layers else "")
        if lean is not None and lean.packed is not None and lean.window is not None:
            kv += " (full-attention layers; sliding BF16)"  # what the lean decoder's cache compresses
        return Generation(self, inputs, kwargs, kv + how, on_done, lean)

    def card(self) -> list[tuple[str, str]]:
        """The artifact's figures for a status panel: what the card states, read from its files."""
        rows = [("artifact", self.source), ("runtime", f"{self.runtime} on {self.device.type}")]
        qc = json.loads((self.folder / "config.json").read_text()).get("quantization_config") or {}
        if qc.get("bits"):
            rows.append(("weight bits", str(qc["bits"])))
        size = sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))
        rows.append(("size on disk", f"{size / 1e9:.3f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"))
        report = self.folder / "hlwq_report.json"
        s = json.loads(report.read_text()).get("summary", {}) if report.exists() else {}
        fmt_row = [
            ("bits per quantized weight", "bits_per_weight_quantized", "{:.3f}"),
            ("bits per weight, all tensors", "bits_per_weight_all", "{:.3f}"),
            ("median weight cos-sim", "median_cos_sim", "{:.6f}"),
            ("min weight cos-sim", "min_cos_sim", "{:.6f}"),
        ]
        rows += [(label, spec.format(s[key])) for label, key, spec in fmt_row if s.get(key) is not None]
        rows.append(("output KL vs BF16", kl_from_card(self.folder) or "not benched (`hlwq bench` measures it)"))
        return rows


def kl_from_card(folder: Path) -> str | None:
    """Mean KL as the model card's 'Output quality' table states it (written from `hlwq bench`), or None."""
    readme = folder / "README.md"
    if not readme.exists():
        return None
    m = re.search(r"## Output quality.*?\n(\|.*?)(?:\n\n|\Z)", readme.read_text(errors="replace"), re.S)
    if not m:
        return None
    figures = []
    for row in m.group(1).splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) >= 3 and cells[0] != "float":
            figures.append(f"{cells[0]}: {cells[2]}")
    return "; ".join(figures) or None


# ---------------------------------------------------------------------------------------------------------------
# A conversation


@dataclass
class Chat:
    """A conversation held in memory (the terminal chat): images attached wait for the next message; `reset`
    forgets everything."""

    engine: Engine
    settings: Settings = field(default_factory=Settings)
    messages: list[Message] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)

    def attach(self, path: str | Path) -> None:
        if not self.engine.has_vision:
            raise InputError("this model has no vision tower: it cannot take images")
        self.pending.append(open_image(path))

    def reset(self) -> None:
        self.messages.clear()
        self.pending.clear()

    def send(self, text: str) -> Generation:
        """Start the answer to `text` (with the attached images); the exchange joins the history when it ends."""
        text = text.strip()
        if not text and not self.pending:
            raise InputError("empty prompt: type a message (or attach an image first)")
        user = Message("user", text, tuple(self.pending))
        gen = self.engine.generate([*self.messages, user], self.settings, on_done=self._keep(user))
        self.pending.clear()
        return gen

    def _keep(self, user: Message) -> Callable[[Generation], None]:
        def done(gen: Generation) -> None:
            self.messages += [user, Message("assistant", gen.text)]

        return done

"""``bp-apps serve``: one HTTP server for the checkpoint of any task, with micro-batching.

FastAPI on uvicorn, rather than LitServe: one process holds the model (the suite runs on 2-core CPU machines, where
LitServe's worker processes would each copy the model and add an inter-process hop to every request), and the
request-size limit, the batching queue and the exact 4xx messages are ours to set.

``POST /predict`` takes what the checkpoint's task reads:

- image classifier: an image (``multipart/form-data`` field ``file``, or a raw ``image/*`` or
  ``application/octet-stream`` body); query ``top_k`` (default 5) → ``{"top": [{"class", "probability"}]}``;
- speech: a WAV (or any file soundfile reads) the same ways → ``{"text": ...}``, the greedy transcript, or a
  digit classifier's digit word (silence gives ``""``);
- token labeling: JSON ``{"text": ..., "predicate": INDEX|WORD, "predicate_pos": TAG}`` (the predicate for SRL
  models) → ``{"tokens", "tags", "spans" | "text", "predicate"}``, as ``bp-apps label --json`` prints;
- summarization: JSON ``{"text": ...}`` (or a ``text/plain`` body) → ``{"summary": ...}``.

Requests are decoded as they arrive; the model runs in :class:`MicroBatcher`'s queue, which gathers up to
``max_batch_size`` requests (waiting at most ``max_wait_ms`` after the first) and runs them as one model call in a
worker thread, so the event loop keeps accepting requests meanwhile. Bodies over ``max_request_bytes`` get 413;
a wrong content type 415; an undecodable image or audio file, or malformed JSON, 400; a missing or bad field 422 —
each with ``{"error": "<one line>"}``. ``GET /health`` names the task and checkpoint; ``GET /stats`` counts
requests and batch sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bp_apps.deploy.checkpoints import (
    LABELING,
    RECOGNIZER,
    SPOKEN_DIGITS,
    SUMMARIZATION,
    VISION,
    checkpoint_task,
    require,
)

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "MicroBatcher", "Predictor", "RequestError", "build_app", "load_predictor",
           "serve"]

DEFAULT_MAX_REQUEST_BYTES = 10 * 2**20
IMAGE_TYPES = ("image/",)
AUDIO_TYPES = ("audio/",)
RAW = "application/octet-stream"


class RequestError(Exception):
    """A request the server refuses: the HTTP ``status`` and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Predictor:
    """A task's side of the server: ``prepare(body, content_type, query)`` turns one request into the model's input
    (in a worker thread; a :class:`RequestError` refuses it), ``run(items)`` predicts for many in one model call."""

    task: str
    reads: str  # "file" (an upload) or "json"
    prepare: Callable[[bytes, str, dict[str, str]], Any]
    run: Callable[[list[Any]], list[dict[str, Any]]]


# -- reading requests ---------------------------------------------------------------------------

def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _json_body(body: bytes, content_type: str, accepts_plain: bool = False) -> dict[str, Any]:
    """The JSON object of the body (or ``{"text": body}`` for ``text/plain`` when ``accepts_plain``)."""
    media = _media_type(content_type)
    if accepts_plain and media == "text/plain":
        try:
            return {"text": body.decode("utf-8")}
        except UnicodeDecodeError:
            raise RequestError(400, "the text/plain body is not UTF-8") from None
    if media != "application/json":
        plain = " or text/plain" if accepts_plain else ""
        raise RequestError(415, f"send JSON (Content-Type: application/json){plain}, got {media or 'no content type'}")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise RequestError(422, f"the JSON body must be an object with a 'text' field, got {type(value).__name__}")
    return value


def _text_field(payload: dict[str, Any], name: str = "text", required: bool = True) -> str | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise RequestError(422, f"missing field {name!r} (a string)")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RequestError(422, f"field {name!r} must be a string, got {type(value).__name__}")
    return str(value)


def _top_k(query: dict[str, str]) -> int:
    value = query.get("top_k", "5")
    if not value.isdigit() or int(value) < 1:
        raise RequestError(422, f"query parameter top_k must be a positive integer, got {value!r}")
    return int(value)


# -- the predictors -----------------------------------------------------------------------------

def _vision(checkpoint: Path) -> Predictor:
    from bp_apps.vision.data import load_image
    from bp_apps.vision.task import load_image_classifier, rank_images

    model, prep = load_image_classifier(checkpoint)
    channels = prep["input_shape"][0]

    def prepare(data: bytes, content_type: str, query: dict[str, str]) -> tuple[Any, int]:
        top_k = _top_k(query)
        try:
            return load_image(io.BytesIO(data), channels), top_k
        except ValueError as error:
            cause = error.__cause__ or error
            raise RequestError(400, f"the upload is not a readable image: {cause}") from None

    def run(items: list[tuple[Any, int]]) -> list[dict[str, Any]]:
        ranked = rank_images(model, prep, [image for image, _ in items], max(k for _, k in items))
        return [{"top": top[:k]} for top, (_, k) in zip(ranked, items)]

    return Predictor(VISION, "file", prepare, run)


def _speech(checkpoint: Path) -> Predictor:
    from bp_apps.speech.audio import load_audio
    from bp_apps.speech.features import FeatureConfig, make_extractor
    from bp_apps.speech.task import decode_features, default_decoder, load_speech_model, waveform_features

    model, prep = load_speech_model(checkpoint)
    config = FeatureConfig(**prep["features"])
    extract = make_extractor(config)
    decoder = default_decoder(model, prep)  # as transcribe decodes by default

    def prepare(data: bytes, content_type: str, query: dict[str, str]) -> list[Any]:
        with tempfile.TemporaryDirectory(prefix="bp_apps_serve_") as folder:  # soundfile reads what transcribe reads
            path = Path(folder) / "upload"
            path.write_bytes(data)
            try:
                waveform = load_audio(path, config.sample_rate, allow_silent=True)
            except ValueError as error:
                message = str(error).replace(f"audio {path}", "the upload").replace(str(path), "the upload")
                raise RequestError(400, f"the upload is not readable audio: {message}") from None
        return waveform_features(waveform, config, extract)

    def run(items: list[list[Any]]) -> list[dict[str, Any]]:
        pieces = [piece for item in items for piece in item]
        texts = iter(decode_features(model, prep, pieces, decoder) if pieces else [])
        return [{"text": " ".join(t for t in (next(texts) for _ in item) if t)} for item in items]

    return Predictor(RECOGNIZER if model.task_name == RECOGNIZER else SPOKEN_DIGITS, "file", prepare, run)


def _labeling(checkpoint: Path) -> Predictor:
    from bp_apps.text.labeling.task import label_sentences, labeled_result, load_labeler, text_sentence

    module = load_labeler(checkpoint)

    def prepare(data: bytes, content_type: str, query: dict[str, str]) -> Any:
        payload = _json_body(data, content_type)
        text = _text_field(payload)
        predicate = _text_field(payload, "predicate", required=False)
        pos = _text_field(payload, "predicate_pos", required=False)
        try:
            return text_sentence(module, text or "", predicate, pos)
        except ValueError as error:
            raise RequestError(422, str(error).replace("--predicate", "predicate")) from None

    def run(items: list[Any]) -> list[dict[str, Any]]:
        tags = label_sentences(module, items, batch_size=len(items))
        return [labeled_result(module, sentence, t) for sentence, t in zip(items, tags)]

    return Predictor(LABELING, "json", prepare, run)


def _summarization(checkpoint: Path) -> Predictor:
    from bp_apps.text.summarization.task import load_summarizer, summarize

    module = load_summarizer(checkpoint)

    def prepare(data: bytes, content_type: str, query: dict[str, str]) -> str:
        text = _text_field(_json_body(data, content_type, accepts_plain=True)) or ""
        if not text.strip():
            raise RequestError(422, "field 'text' is empty")
        return text

    def run(items: list[str]) -> list[dict[str, Any]]:
        return [{"summary": s} for s in summarize(module, items, batch_size=len(items))]

    return Predictor(SUMMARIZATION, "json", prepare, run)


PREDICTORS = {VISION: _vision, RECOGNIZER: _speech, SPOKEN_DIGITS: _speech, LABELING: _labeling,
              SUMMARIZATION: _summarization}


def load_predictor(checkpoint: str | Path) -> Predictor:
    """The :class:`Predictor` of the task that wrote ``checkpoint`` (loaded by the task's safe loader)."""
    checkpoint = Path(checkpoint)
    return PREDICTORS[checkpoint_task(checkpoint)](checkpoint)


# -- micro-batching -----------------------------------------------------------------------------

class MicroBatcher:
    """An asyncio queue in front of ``run``: :meth:`submit` waits for the result of one item, :meth:`work` gathers
    up to ``max_batch_size`` items (at most ``max_wait_ms`` after the first) and runs them as one call of ``run``
    in a worker thread — one batch at a time, so the model is never called concurrently."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_batch_size: int = 8, max_wait_ms: float = 10.0
                 ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future]] | None = None
        self.batch_sizes: Counter[int] = Counter()

    async def submit(self, item: Any) -> Any:
        if self.queue is None:
            raise RuntimeError("the batcher is not running (start work() first)")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        assert self.queue is not None
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                batch.append(self.queue.get_nowait() if remaining <= 0 else
                             await asyncio.wait_for(self.queue.get(), remaining))
            except (asyncio.QueueEmpty, TimeoutError):
                break
        return batch

    async def work(self) -> None:
        """Serve the queue until cancelled."""
        self.queue = asyncio.Queue()
        while True:
            batch = [(item, future) for item, future in await self._gather() if not future.cancelled()]
            if not batch:
                continue
            self.batch_sizes[len(batch)] += 1
            try:
                results = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as error:  # the whole call failed: every request of the batch hears why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def stats(self) -> dict[str, Any]:
        return {"requests": sum(size * n for size, n in self.batch_sizes.items()),
                "batches": sum(self.batch_sizes.values()),
                "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
                "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait * 1000}


# -- the app ------------------------------------------------------------------------------------

async def _read_body(request: Any, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = f"the request body exceeds the limit of {limit} bytes (--max-request-mb)"
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def _upload(request: Any, body: bytes, what: str, media_prefixes: Sequence[str]) -> bytes:
    """The uploaded file: the ``file`` field (or the only file) of a multipart form, or a raw body."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    media = _media_type(request.headers.get("content-type", ""))
    if media == "multipart/form-data":
        async def stream() -> AsyncIterator[bytes]:
            yield body

        try:
            form = await MultiPartParser(request.headers, stream()).parse()
        except MultiPartException as error:
            raise RequestError(400, f"malformed multipart body: {error.message}") from None
        files = [value for value in form.values() if isinstance(value, UploadFile)]
        upload = form.get("file") if isinstance(form.get("file"), UploadFile) else (files[0] if len(files) == 1
                                                                                    else None)
        if upload is None:
            raise RequestError(422, f"the multipart form has no file field 'file' (the {what})")
        data = await upload.read()
    elif media == RAW or any(media.startswith(prefix) for prefix in media_prefixes):
        data = body
    else:
        kinds = " or ".join(f"{p}*" for p in media_prefixes)
        raise RequestError(415, f"send the {what} as multipart/form-data (field 'file') or as a raw {kinds} or {RAW} "
                                f"body, got {media or 'no content type'}")
    if not data:
        raise RequestError(400, f"the {what} is empty (0 bytes)")
    return data


def build_app(checkpoint: str | Path, max_batch_size: int = 8, max_wait_ms: float = 10.0,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> Any:
    """The FastAPI app serving ``checkpoint`` (any task's; loaded now, so a bad file fails before serving)."""
    fastapi = require("fastapi", "serve", "serve")
    require("multipart", "serve", "serve")  # python-multipart, for uploads
    from fastapi.responses import JSONResponse

    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
    checkpoint = Path(checkpoint)
    predictor = load_predictor(checkpoint)
    batcher = MicroBatcher(predictor.run, max_batch_size, max_wait_ms)
    what = "image" if predictor.task == VISION else "audio file"
    media = IMAGE_TYPES if predictor.task == VISION else AUDIO_TYPES

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.work())
        await asyncio.sleep(0)  # let the worker create its queue
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    app = fastapi.FastAPI(title="bp-apps serve", description=f"{predictor.task} from {checkpoint}",
                          lifespan=lifespan)
    app.state.batcher, app.state.predictor = batcher, predictor

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": predictor.task, "checkpoint": str(checkpoint)}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return batcher.stats()

    async def predict(request: Any) -> Any:  # a plain Starlette endpoint: the raw request, read within its limit
        try:
            body = await _read_body(request, max_request_bytes)
            content_type = request.headers.get("content-type", "")
            if predictor.reads == "file":
                body = await _upload(request, body, what, media)
            item = await asyncio.to_thread(predictor.prepare, body, content_type, dict(request.query_params))
            return JSONResponse(await batcher.submit(item))
        except RequestError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        except ValueError as error:  # the task refused the input while predicting
            return JSONResponse({"error": str(error).splitlines()[0]}, status_code=422)

    app.router.add_route("/predict", predict, methods=["POST"])
    return app


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
          max_wait_ms: float = 10.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Serve ``checkpoint`` on ``host:port`` until interrupted (uvicorn, one process)."""
    uvicorn = require("uvicorn", "serve", "serve")
    app = build_app(checkpoint, max_batch_size, max_wait_ms, max_request_bytes)
    print(f"serving {app.state.predictor.task} from {checkpoint} on http://{host}:{port} "
          "(POST /predict, GET /health, GET /stats)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")

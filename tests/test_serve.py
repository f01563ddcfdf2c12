"""``bp-apps serve`` for real: uvicorn serves tiny vision, speech and labeling checkpoints in a background thread,
and a plain HTTP client (urllib) checks that predictions equal the commands' own functions, that concurrent
requests are run as one batch, and that oversized, undecodable or incomplete requests get a one-line 4xx."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from deploy_checkpoints import labeling_checkpoint, speech_checkpoint, vision_checkpoint
from PIL import Image

from bp_apps.cli import main
from bp_apps.speech.audio import save_audio
from bp_apps.speech.task import transcribe
from bp_apps.text.labeling.task import label_text, load_labeler
from bp_apps.vision.task import predict_images

uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra (pip install \"bp_apps[serve]\")")
pytest.importorskip("fastapi", reason="needs the serve extra (pip install \"bp_apps[serve]\")")
pytest.importorskip("multipart", reason="needs the serve extra (pip install \"bp_apps[serve]\")")

from bp_apps.deploy.serve import build_app  # noqa: E402  (after the skips: needs the serve extra)


@contextlib.contextmanager
def running(checkpoint: Path, **settings: Any) -> Iterator[str]:
    """``build_app(checkpoint, **settings)`` served by uvicorn on a free port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(checkpoint, **settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def request(url: str, data: bytes | None = None, content_type: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON) of a GET (no data) or POST."""
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(data: bytes, field: str = "file", filename: str = "upload.bin") -> tuple[bytes, str]:
    boundary = "bp-apps-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def png(path: Path, seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").convert("RGB").save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


def test_vision_predictions_equal_predict_image_and_bad_uploads_get_4xx(folder: Path) -> None:
    ckpt = vision_checkpoint(folder)
    images = [folder / f"image{i}.png" for i in range(2)]
    data = [png(path, i) for i, path in enumerate(images)]
    expected = predict_images(images, ckpt, top_k=3)
    with running(ckpt, max_request_bytes=4000) as url:
        assert request(f"{url}/health") == (200, {"status": "ok", "task": "vision.ImageClassifier",
                                                  "checkpoint": str(ckpt)})
        for raw, want in zip(data, expected):
            for body, content_type in (multipart(raw), (raw, "image/png")):
                status, got = request(f"{url}/predict?top_k=3", body, content_type)
                assert status == 200 and [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
                assert [t["probability"] for t in got["top"]] == pytest.approx(
                    [t["probability"] for t in want["top"]], abs=1e-6)
        assert len(request(f"{url}/predict", data[0], "image/png")[1]["top"]) == 5  # the default top_k
        status, error = request(f"{url}/predict", b"x" * 5000, "image/png")
        assert status == 413 and "exceeds the limit of 4000 bytes" in error["error"]
        status, error = request(f"{url}/predict", b"GIF89a not really", "image/gif")
        assert status == 400 and error["error"].startswith("the upload is not a readable image")
        status, error = request(f"{url}/predict", data[0][:200], "image/png")  # truncated
        assert status == 400 and "not a readable image" in error["error"]
        status, error = request(f"{url}/predict", b'{"text": "an image?"}', "application/json")
        assert status == 415 and "multipart/form-data" in error["error"] and "application/json" in error["error"]
        assert request(f"{url}/predict", *multipart(data[0], field="other"))[0] == 200  # the only file is taken
        body, content_type = multipart(b"", field="file")
        assert request(f"{url}/predict", body, content_type) == (400, {"error": "the image is empty (0 bytes)"})
        no_file = (b"--b\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhello\r\n--b--\r\n")
        status, error = request(f"{url}/predict", no_file, "multipart/form-data; boundary=b")
        assert status == 422 and "no file field 'file'" in error["error"]
        status, error = request(f"{url}/predict?top_k=zero", data[0], "image/png")
        assert status == 422 and "top_k" in error["error"]
        assert request(f"{url}/stats")[1]["requests"] == 6  # refused requests never reach the model


def test_concurrent_requests_run_as_one_batch(folder: Path) -> None:
    ckpt = labeling_checkpoint(folder)
    module = load_labeler(ckpt)
    texts = [("the cat saw a dog in the park", "saw"), ("a dog took the ball", "took"),
             ("the cat took a ball in a park", "4"), ("dog saw cat", "saw")]
    with running(ckpt, max_batch_size=4, max_wait_ms=5000) as url:
        def post(item: tuple[str, str]) -> tuple[int, Any]:
            payload = json.dumps({"text": item[0], "predicate": item[1]}).encode()
            return request(f"{url}/predict", payload, "application/json")

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(post, texts))
        stats = request(f"{url}/stats")[1]
    assert stats["batch_sizes"] == {"4": 1} and stats["batches"] == 1 and stats["requests"] == 4
    # sentences of several lengths padded into one batch give what each gives alone
    assert replies == [(200, label_text(module, text, predicate)) for text, predicate in texts]


def test_labeling_requests_need_json_with_the_fields_the_model_reads(folder: Path) -> None:
    ckpt = labeling_checkpoint(folder)
    with running(ckpt, max_wait_ms=0) as url:
        assert request(f"{url}/health")[1]["task"] == "text.TokenLabeler"
        status, error = request(f"{url}/predict", b'{"predicate": "saw"}', "application/json")
        assert status == 422 and error["error"] == "missing field 'text' (a string)"
        status, error = request(f"{url}/predict", b'{"text": "the cat saw"}', "application/json")
        assert status == 422 and "give the predicate" in error["error"]
        status, error = request(f"{url}/predict", b'{"text": "the cat saw", "predicate": "ran"}', "application/json")
        assert status == 422 and "predicate word 'ran' is not among the tokens" in error["error"]
        status, error = request(f"{url}/predict", b'{"text": ', "application/json")
        assert status == 400 and error["error"].startswith("the body is not valid JSON")
        status, error = request(f"{url}/predict", b'["the cat saw"]', "application/json")
        assert status == 422 and "must be an object" in error["error"]
        status, error = request(f"{url}/predict", b"the cat saw", "text/plain")
        assert status == 415 and "application/json" in error["error"]
        status, reply = request(f"{url}/predict", b'{"text": "the cat saw", "predicate": 2}', "application/json")
        assert status == 200 and reply["predicate"] == 2 and len(reply["tags"]) == 3


@pytest.mark.parametrize("net", ["conv_gru", "digit_cnn"])
def test_speech_transcripts_equal_transcribe(folder: Path, net: str) -> None:
    ckpt = speech_checkpoint(folder, net)
    rng = np.random.default_rng(0)
    t = np.arange(int(0.6 * 16_000)) / 16_000
    wav = save_audio(folder / f"tone_{net}.wav", 0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size),
                     16_000)
    silent = save_audio(folder / "silent.wav", np.zeros(4000), 16_000)
    expected = [r["text"] for r in transcribe([wav, silent], ckpt)]
    assert expected[1] == ""
    with running(ckpt, max_batch_size=3, max_wait_ms=5000) as url:
        task = request(f"{url}/health")[1]["task"]
        assert task == ("speech.SpeechRecognizer" if net == "conv_gru" else "speech.SpokenDigitClassifier")
        bodies = [multipart(wav.read_bytes(), filename="a.wav"), (wav.read_bytes(), "audio/wav"),
                  (silent.read_bytes(), "audio/wav")]
        with ThreadPoolExecutor(3) as pool:  # one batch: the two tones and the silence
            replies = list(pool.map(lambda b: request(f"{url}/predict", *b), bodies))
        assert replies == [(200, {"text": expected[0]}), (200, {"text": expected[0]}), (200, {"text": ""})]
        assert request(f"{url}/stats")[1]["batch_sizes"] == {"3": 1}
        status, error = request(f"{url}/predict", b"RIFF....WAVEfmt garbage", "audio/wav")
        assert status == 400 and error["error"].startswith("the upload is not readable audio")
        assert "bp_apps_serve_" not in error["error"]  # the temporary file is not the client's business
        status, error = request(f"{url}/predict", b"hello", "text/plain")
        assert status == 415 and "audio/*" in error["error"]
    if net == "digit_cnn":
        assert expected[0] in {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}


def test_batched_images_give_what_each_gives_alone(folder: Path) -> None:
    """The vision model call of a batch returns each image's own ranking (no mixing of rows)."""
    ckpt = vision_checkpoint(folder, "cnn_engine_head")
    images = [folder / f"batch{i}.png" for i in range(3)]
    data = [png(path, 10 + i, size=12 + 4 * i) for i, path in enumerate(images)]
    expected = predict_images(images, ckpt, top_k=10)
    with running(ckpt, max_batch_size=3, max_wait_ms=5000) as url:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda raw: request(f"{url}/predict?top_k=10", raw, "image/png"), data))
        assert request(f"{url}/stats")[1]["batch_sizes"] == {"3": 1}
    for (status, got), want in zip(replies, expected):
        assert status == 200
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]


def test_a_checkpoint_of_no_task_is_refused_before_serving(folder: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    crafted = folder / "no_task.ckpt"
    torch.save({"state_dict": {}}, crafted)
    with pytest.raises(ValueError, match=r"no_task\.ckpt: not a bp_apps task checkpoint: it has no task name"):
        build_app(crafted)
    assert main(["serve", "--ckpt", str(crafted), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bp-apps serve: error:") and "no_task.ckpt" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--ckpt", str(folder / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(crafted), "--max-request-mb", "0"]) == 2
    assert "--max-request-mb must be positive" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        build_app(vision_checkpoint(folder), max_batch_size=0)


def test_readable_files_are_not_needed_on_disk(folder: Path) -> None:
    """The server decodes uploads in memory (images) or in its own temporary folder (audio): nothing is left."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("bp_apps_serve_*"))
    ckpt = speech_checkpoint(folder, "digit_cnn")
    buffer = io.BytesIO()
    save_audio(folder / "short.wav", 0.3 * np.sin(np.arange(2000) / 3.0), 8000)
    buffer.write((folder / "short.wav").read_bytes())
    with running(ckpt, max_wait_ms=0) as url:
        assert request(f"{url}/predict", buffer.getvalue(), "application/octet-stream")[0] == 200
    assert set(Path(tempfile.gettempdir()).glob("bp_apps_serve_*")) == before

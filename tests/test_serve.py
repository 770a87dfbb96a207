"""``mask2former serve``: the JSON API against a live uvicorn server on an ephemeral port, the app in-process
(Starlette's TestClient), the request batcher, and the page in headless Chromium.

Oracle: every API answer must equal what the Predictor and ``viz.visualize`` give for the same image, also when
requests run in parallel and share a batch.
"""

import asyncio

import base64
import http.client
import io
import json
import socket
import struct
import threading
import urllib.error
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.data.fashion_scenes import FashionScenes, fashion_scenes_label_space
from mask2former.inference.predictor import Predictor
from mask2former.modeling.model import Mask2Former
from mask2former.serve import BatchingPredictor, SegmentationService, create_app, make_server
from mask2former.viz import visualize

from conftest import tiny_swin_config

LABELS = fashion_scenes_label_space()
MAX_UPLOAD = 200_000
MAX_PIXELS = 192 * 256


def _confident_classes(module, inputs, output):
    # A random model gives every query nearly the same class; make query q confident in class 4q mod K (things and
    # stuff) so results hold several segments of different classes. The random mask logits still decide where.
    queries, classes = output.shape[-2], output.shape[-1] - 1
    pattern = torch.zeros(queries, classes + 1, dtype=output.dtype, device=output.device)
    pattern[torch.arange(queries), (4 * torch.arange(queries)) % classes] = 8.0
    return output + pattern


def make_model() -> Mask2Former:
    torch.manual_seed(1)  # a seed whose random model gives several panoptic segments
    model = Mask2Former(tiny_swin_config(num_classes=LABELS.num_classes), labels=LABELS.to_dict()).eval()
    model.transformer_decoder.heads.class_embed.register_forward_hook(_confident_classes)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # On a busy 2-core machine two intra-op threads in the main thread run this model 20x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def predictor():
    # random masks overlap a lot: a low overlap threshold keeps several panoptic segments
    return Predictor(make_model(), top_k=8, overlap_threshold=0.1)


def running_server(predictor, **options):
    """A test server on a free local port, serving in a thread until the generator is closed."""
    server = make_server(predictor, "127.0.0.1", 0, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def server(predictor):
    # a short stall limit so that the 408 test is quick; local uploads arrive at once
    yield from running_server(predictor, body_timeout_s=2.0)


@pytest.fixture(scope="module")
def scenes():
    dataset = FashionScenes("val", num_images=4, image_size=(96, 128))
    return [dataset[i]["image"] for i in range(len(dataset))]


def png_bytes(image) -> bytes:
    array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def call(server, path, data=None, headers=None, method=None):
    """(status, JSON body) of a request; HTTP errors are answers too."""
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def predict(server, image_bytes, task, content_type="image/png", **params):
    query = "&".join(f"{k}={v}" for k, v in {"task": task, **params}.items())
    return call(server, f"/api/predict?{query}", image_bytes, {"Content-Type": content_type})


def multipart(fields: dict, file_bytes: bytes, file_type="image/png") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="scene.png"\r\n'
                 f"Content-Type: {file_type}\r\n\r\n".encode() + file_bytes + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def overlay_array(body) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert body["overlay_png"].startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"][len(prefix):]))).convert("RGB"))


def expected_rows(predictor, image, task, score_threshold=0.5, legend=True):
    """What the API must answer for ``image``, computed with the Predictor directly, and the overlay."""
    result = predictor.predict_tasks([image], (task,))[0][task]
    if task == "panoptic":
        rows = [(int(s["id"]), LABELS.names[s["category_id"]], bool(s["isthing"]), float(s["score"]), int(s["area"]))
                for s in result[1]]
    elif task == "instance":
        rows = [(LABELS.names[int(label)], float(score), [float(v) for v in box], int(mask.sum()))
                for label, score, box, mask in zip(result["labels"], result["scores"], result["boxes"], result["masks"])
                if score >= score_threshold]
    else:
        rows = [(LABELS.names[c], int((result == c).sum())) for c in result.unique().tolist()]
    options = {"score_threshold": score_threshold} if task == "instance" else {}
    return rows, np.asarray(visualize(image, result, task, LABELS, legend=legend, **options))


def answered_rows(body):
    task = body["task"]
    if task == "panoptic":
        return [(s["id"], s["category"], s["isthing"], s["score"], s["area"]) for s in body["segments"]]
    if task == "instance":
        return [(s["category"], s["score"], s["box"], s["area"]) for s in body["instances"]]
    return [(s["category"], s["area"]) for s in body["classes"]]


# --------------------------------------------------------------------------------------------------- info routes
def test_health(server):
    status, body = call(server, "/api/health")
    assert status == 200
    assert body["status"] == "ok" and body["num_classes"] == LABELS.num_classes
    assert body["tasks"] == ["panoptic", "instance", "semantic"]  # config.TASKS
    assert body["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS}


def test_classes(server):
    status, body = call(server, "/api/classes")
    assert status == 200
    assert [c["name"] for c in body["classes"]] == LABELS.names
    assert [c["category_id"] for c in body["classes"]] == LABELS.dataset_ids
    assert [c["isthing"] for c in body["classes"]] == LABELS.is_thing
    assert [tuple(c["color"]) for c in body["classes"]] == LABELS.colors


def test_page_and_static_files(server):
    with urllib.request.urlopen(server.url, timeout=10) as response:
        html = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert "/static/app.js" in html and "/static/style.css" in html
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(server.url + "static/" + name, timeout=10) as response:
            text = response.read().decode()
            # nothing external: the page must work on a closed network
            assert "http://" not in text and "https://" not in text
    assert "https://" not in html and "http://" not in html
    with urllib.request.urlopen(server.url + "favicon.ico", timeout=10) as response:  # browsers ask for it
        assert response.headers["Content-Type"] == "image/x-icon"
        assert Image.open(io.BytesIO(response.read())).size == (32, 32)


# --------------------------------------------------------------------------------------------------- predictions
@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_predict_matches_predictor_and_viz(server, predictor, scenes, task):
    image = scenes[0]
    status, body = predict(server, png_bytes(image), task, score_threshold=0.3)
    assert status == 200, body
    assert (body["task"], body["height"], body["width"]) == (task, 96, 128)
    rows, overlay = expected_rows(predictor, image, task, score_threshold=0.3)
    assert len(rows) >= 2  # the test model gives several segments, so the comparison means something
    assert answered_rows(body) == rows
    assert np.array_equal(overlay_array(body), overlay)
    shown = {row["category"] for row in body[{"panoptic": "segments", "instance": "instances",
                                               "semantic": "classes"}[task]]}
    assert [entry["category"] for entry in body["legend"]] == [n for n in LABELS.names if n in shown]
    for entry in body["legend"]:
        assert tuple(entry["color"]) == LABELS.colors[entry["label"]]
        assert entry["category_id"] == LABELS.to_dataset(entry["label"])


def test_multipart_form_legend_and_overlay_options(server, predictor, scenes):
    raw = predict(server, png_bytes(scenes[1]), "panoptic", legend=0)
    assert raw[0] == 200
    assert np.array_equal(overlay_array(raw[1]), expected_rows(predictor, scenes[1], "panoptic", legend=False)[1])
    body, content_type = multipart({"task": "panoptic"}, png_bytes(scenes[1]))
    status, form = call(server, "/api/predict?overlay=0", body, {"Content-Type": content_type})
    assert status == 200
    assert form["task"] == "panoptic" and "overlay_png" not in form
    assert form["segments"] == raw[1]["segments"]
    # a JPEG (lossy: compare with the predictor on the decoded JPEG) sent as octet-stream
    buffer = io.BytesIO()
    Image.fromarray(scenes[1].permute(1, 2, 0).numpy()).save(buffer, format="JPEG")
    status, jpeg = predict(server, buffer.getvalue(), "semantic", content_type="application/octet-stream")
    decoded = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).copy()).permute(2, 0, 1)
    assert status == 200 and answered_rows(jpeg) == expected_rows(predictor, decoded, "semantic")[0]


def test_concurrent_requests_match_single_requests(server, predictor, scenes, monkeypatch):
    jobs = [(index, task) for index in range(len(scenes)) for task in ("semantic", "instance", "panoptic")]
    uploads = [png_bytes(image) for image in scenes]
    single = {job: predict(server, uploads[job[0]], job[1], score_threshold=0.2) for job in jobs}
    # count forward passes running at once: the shared model must see one at a time
    active, most_active, counter_lock, batch_sizes = [0], [0], threading.Lock(), []
    original = predictor.predict_tasks

    def counting_predict_tasks(*args, **kwargs):
        with counter_lock:
            batch_sizes.append(len(args[0]))
            active[0] += 1
            most_active[0] = max(most_active[0], active[0])
        try:
            threading.Event().wait(0.01)  # widen the window in which an unguarded second call would overlap
            return original(*args, **kwargs)
        finally:
            with counter_lock:
                active[0] -= 1

    monkeypatch.setattr(predictor, "predict_tasks", counting_predict_tasks)
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(zip(jobs * 2, pool.map(lambda job: predict(server, uploads[job[0]], job[1], score_threshold=0.2),
                                               jobs * 2)))
    assert most_active[0] == 1
    assert sum(batch_sizes) == 2 * len(jobs)  # every request went through exactly one forward pass
    assert len({json.dumps(answered_rows(single[(i, "panoptic")][1])) for i in range(len(scenes))}) == len(scenes)
    for job, (status, body) in parallel:
        assert status == 200 and single[job][0] == 200
        # batched scores may differ from single ones in the last float bits (as test_predictor allows)
        assert_same_rows(answered_rows(body), answered_rows(single[job][1]), job)
        assert body["overlay_png"] == single[job][1]["overlay_png"], job


def assert_same_rows(got, expected, where):
    """Equal rows, floats to 1e-5."""
    assert len(got) == len(expected), where
    for row, other in zip(got, expected):
        for a, b in zip(row, other):
            if isinstance(a, float):
                assert b == pytest.approx(a, rel=1e-5, abs=1e-5), where
            else:
                assert a == b, where


def test_requests_waiting_together_share_one_forward(predictor, scenes):
    # The model thread is held in the first forward while five more requests queue; they then go as one batch of
    # max_batch_size=4 (mixed tasks) and one of 1, and each answer equals the single-image Predictor result.
    calls, gate = [], threading.Event()

    class HeldPredictor:
        batch_size = 4

        def predict_tasks(self, images, tasks):
            calls.append((len(images), tuple(tasks)))
            if len(calls) == 1:
                assert gate.wait(60)
            return predictor.predict_tasks(images, tasks)

    jobs = [(0, "panoptic"), (1, "semantic"), (2, "panoptic"), (3, "instance"), (0, "semantic"), (1, "instance")]

    async def scenario():
        batcher = BatchingPredictor(HeldPredictor(), max_batch_size=4, max_wait_ms=0)
        await batcher.start()
        try:
            futures = [asyncio.ensure_future(batcher.predict(scenes[jobs[0][0]], jobs[0][1]))]
            while not calls:  # until the first request is inside the model
                await asyncio.sleep(0.01)
            futures += [asyncio.ensure_future(batcher.predict(scenes[i], task)) for i, task in jobs[1:]]
            for _ in range(10):  # let every request reach the queue
                await asyncio.sleep(0)
            gate.set()
            return await asyncio.gather(*futures)
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert calls == [(1, ("panoptic",)), (4, ("semantic", "panoptic", "instance")), (1, ("instance",))]
    assert [answer.batch_size for answer in answers] == [1, 4, 4, 4, 4, 1]
    for (index, task), answer in zip(jobs, answers):
        single = predictor.predict_tasks([scenes[index]], (task,))[0][task]
        if task == "semantic":
            assert torch.equal(answer.result, single)
        elif task == "panoptic":
            assert torch.equal(answer.result[0], single[0])
            assert_same_rows([tuple(s.values()) for s in answer.result[1]], [tuple(s.values()) for s in single[1]],
                             task)
        else:
            assert torch.equal(answer.result["labels"], single["labels"])
            assert torch.equal(answer.result["masks"], single["masks"])
            torch.testing.assert_close(answer.result["scores"], single["scores"], atol=1e-5, rtol=1e-5)


def test_a_failing_forward_answers_every_request_in_its_batch(predictor, scenes):
    class FailingOnce:
        batch_size = 4
        calls = 0

        def predict_tasks(self, images, tasks):
            FailingOnce.calls += 1
            if FailingOnce.calls == 1:
                raise RuntimeError("out of memory in the test")
            return predictor.predict_tasks(images, tasks)

    async def scenario():
        batcher = BatchingPredictor(FailingOnce(), max_batch_size=4, max_wait_ms=50)
        await batcher.start()
        try:
            first = await asyncio.gather(*(batcher.predict(scenes[i], "semantic") for i in range(3)),
                                         return_exceptions=True)
            return first, await batcher.predict(scenes[0], "semantic")
        finally:
            await batcher.stop()

    failed, after = asyncio.run(scenario())
    # the three requests may form one batch or several; those in the failing one get its error, none hangs
    expected = [predictor.predict_tasks([scenes[i]], ("semantic",))[0]["semantic"] for i in range(3)]
    assert all(isinstance(a, RuntimeError) or torch.equal(a.result, e) for a, e in zip(failed, expected))
    assert isinstance(failed[0], RuntimeError) and "out of memory" in str(failed[0])
    assert torch.equal(after.result, predictor.predict_tasks([scenes[0]], ("semantic",))[0]["semantic"])


def test_app_in_process_500_and_openapi(scenes):
    from starlette.testclient import TestClient

    broken = Predictor(make_model())
    broken.predict_tasks = lambda images, tasks: (_ for _ in ()).throw(ValueError("weights are\nNaN"))
    app = create_app(SegmentationService(broken, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS))
    with TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False) as client:
        response = client.post("/api/predict?task=semantic", content=png_bytes(scenes[0]),
                               headers={"Content-Type": "image/png"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error: ValueError: weights are NaN", "status": 500}
        assert client.get("/api/health").status_code == 200  # the server goes on
        schema = client.get("/api/openapi.json").json()
        assert {path: sorted(ops) for path, ops in schema["paths"].items()} == {
            "/api/health": ["get"], "/api/classes": ["get"], "/api/predict": ["post"]}
        body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
        assert set(body) == {"image/*", "application/octet-stream", "multipart/form-data"}
        # Host checking is on for a loopback server: TestClient's default Host name is refused
        assert client.get("/api/health", headers={"Host": "testserver"}).status_code == 403


# --------------------------------------------------------------------------------------------------- errors
def assert_error(answer, status, fragment):
    code, body = answer
    assert code == status, body
    assert body["status"] == status and fragment in body["error"] and "\n" not in body["error"]


def test_unknown_task_and_bad_parameters(server, scenes):
    upload = png_bytes(scenes[0])
    assert_error(predict(server, upload, "depth"), 400, "unknown task 'depth'")
    assert_error(predict(server, upload, "instance", score_threshold="high"), 400, "score_threshold")
    assert_error(predict(server, upload, "instance", score_threshold="1.5"), 400, "score_threshold")


def test_not_an_image_content_type(server, scenes):
    assert_error(predict(server, b'{"a": 1}', "panoptic", content_type="application/json"), 415, "application/json")
    body, content_type = multipart({}, b"hello", file_type="text/plain")
    assert_error(call(server, "/api/predict", body, {"Content-Type": content_type}), 415, "text/plain")
    body, content_type = multipart({"task": "semantic"}, b"")
    no_image = body.replace(b'name="image"', b'name="picture"')
    assert_error(call(server, "/api/predict", no_image, {"Content-Type": content_type}), 400, "no 'image' field")


def test_broken_image_bytes(server, scenes):
    assert_error(predict(server, b"this is not an image", "panoptic"), 400, "not a recognised image format")
    assert_error(predict(server, b"", "panoptic"), 400, "empty upload")
    valid = png_bytes(scenes[0])
    assert_error(predict(server, valid[: len(valid) // 2], "panoptic"), 400, "truncated or corrupt image")


def test_upload_too_large(server):
    too_big = np.random.default_rng(0).integers(0, 256, MAX_UPLOAD + 1, dtype=np.uint8).tobytes()
    assert_error(predict(server, too_big, "panoptic"), 413, f"the limit is {MAX_UPLOAD} bytes")
    # the server still answers after refusing an upload
    assert call(server, "/api/health")[0] == 200


def test_image_too_many_pixels(server):
    big = png_bytes(np.zeros((193, 256, 3), dtype=np.uint8))  # compresses far below the upload limit
    assert_error(predict(server, big, "semantic"), 413, f"256x193 = 49408 pixels; the limit is {MAX_PIXELS}")
    assert predict(server, png_bytes(np.zeros((192, 256, 3), dtype=np.uint8)), "semantic")[0] == 200


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB pixels but carries a sliver of data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header(server):
    # 3000x3000 passes PIL's own bomb check (a warning) and is refused by the server's pixel limit before decoding;
    # 30000x30000 is refused by PIL when the header is read. Neither is decompressed.
    assert_error(predict(server, png_header_only(3000, 3000), "panoptic"), 413,
                 f"3000x3000 = 9000000 pixels; the limit is {MAX_PIXELS}")
    # ... and both answers name the server's limit, not PIL's 178,956,970 pixels
    assert_error(predict(server, png_header_only(30000, 30000), "panoptic"), 413,
                 f"image has 900000000 pixels; the limit is {MAX_PIXELS} pixels")
    # a real one: 16 MB of zeros that compress to a few kB, within the upload limit
    bomb = png_bytes(np.zeros((2048, 2048, 3), dtype=np.uint8))
    assert len(bomb) < MAX_UPLOAD
    assert_error(predict(server, bomb, "semantic"), 413, "2048x2048 = 4194304 pixels")


def raw_exchange(server, head: str, body: bytes = b"", timeout: float = 30.0) -> tuple[int, dict]:
    """Send a hand-made request (head + possibly partial body) on a socket; (status, JSON) of the answer."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_stalled_upload_expect_continue_and_chunked(server, scenes):
    # 408: the body stops arriving (the fixture's stall limit is 2 s)
    head = ("POST /api/predict?task=semantic HTTP/1.1\nHost: 127.0.0.1\nContent-Type: image/png\n"
            "Content-Length: 1000\n")
    assert_error(raw_exchange(server, head, b"\x89PNG" + b"0" * 10), 408, "timed out after 14 bytes")
    # 413 before any byte of the body is sent, when the client waits for "100 Continue"
    head = ("POST /api/predict?task=semantic HTTP/1.1\nHost: 127.0.0.1\nContent-Type: image/png\n"
            f"Content-Length: {MAX_UPLOAD + 1}\nExpect: 100-continue\n")
    assert_error(raw_exchange(server, head), 413, f"the limit is {MAX_UPLOAD} bytes")
    # chunked uploads are counted as they arrive: within the limit they work, beyond it they are refused
    host, port = server.server_address[:2]
    upload = png_bytes(scenes[2])
    answers = []
    for parts in ([upload[:1000], upload[1000:]], [b"\0" * 60_000] * 4):
        connection = http.client.HTTPConnection(host, port, timeout=60)
        connection.request("POST", "/api/predict?task=semantic&overlay=0", body=iter(parts), encode_chunked=True,
                           headers={"Content-Type": "image/png", "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        answers.append((response.status, json.loads(response.read())))
        connection.close()
    assert answers[0][0] == 200 and answers[0][1]["classes"] == predict(server, upload, "semantic", overlay=0)[1]["classes"]
    assert_error(answers[1], 413, f"the limit is {MAX_UPLOAD} bytes")


def test_routes_methods_length_and_host(server):
    assert_error(call(server, "/api/predict"), 405, "use POST")
    assert_error(call(server, "/nothing/here"), 404, "/nothing/here")
    assert_error(call(server, "/api/health", b"x", {"Content-Type": "image/png"}), 405, "POST")
    assert_error(call(server, "/api/predict", b"x", {"Content-Type": "image/png"}, method="PUT"), 405, "PUT")
    head = urllib.request.Request(server.url + "api/health", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.status == 200 and response.read() == b""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.putrequest("POST", "/api/predict?task=panoptic")
    connection.putheader("Content-Type", "image/png")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    connection.close()
    assert_error(call(server, "/api/health", headers={"Host": "attacker.example:80"}), 403, "attacker.example")


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_serve_loads_a_checkpoint(tmp_path, monkeypatch, capsys):
    from mask2former import cli
    from mask2former.serve import app

    torch.manual_seed(0)
    Mask2Former(tiny_swin_config(num_classes=LABELS.num_classes), labels=LABELS.to_dict()).save_pretrained(tmp_path / "ckpt")
    started = []

    def recording_make_server(*args, **kwargs):
        started.append(app.make_server.__wrapped__(*args, **kwargs))
        return started[-1]

    recording_make_server.__wrapped__ = app.make_server
    monkeypatch.setattr(app, "make_server", recording_make_server)
    exit_codes = []
    thread = threading.Thread(target=lambda: exit_codes.append(
        cli.main(["serve", "--checkpoint", str(tmp_path / "ckpt"), "--port", "0"])), daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if started or not thread.is_alive():
                break
            thread.join(0.05)
        assert started, f"server did not start: {capsys.readouterr()}"
        with urllib.request.urlopen(started[0].url + "api/classes", timeout=30) as response:
            assert [c["name"] for c in json.loads(response.read())["classes"]] == LABELS.names
    finally:
        if started:
            started[0].shutdown()
        thread.join(10)
    assert exit_codes == [0]
    assert f"open {started[0].url}" in capsys.readouterr().out

# the page in a browser: test_serve_page.py

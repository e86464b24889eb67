"""Bad input of every kind ends in a clear message, never a crash: request bodies over MAX_REQUEST_BYTES (413),
images that are broken, truncated, decompression bombs or not images at all (ImageError; the rest of a /predict
batch is unaffected), and annotations livetrain cannot learn from (dropped with a reason; the good parts train)."""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.api import create_app
from backend.errors import ImageError, LivetrainError
from backend.labelstudio.annotations import labeled_image
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.masks import MAX_MASK_PIXELS, mask_to_rle, rle_to_mask
from backend.training.data import ExampleCache
from tests.conftest import BOX_CONFIG, png_bytes
from tests.test_api import BoxAt, make_settings, predict_payload, serve

BOX = parse_label_config(BOX_CONFIG).primary
POLY = parse_label_config(BOX_CONFIG.replace("RectangleLabels", "PolygonLabels")).primary
BRUSH = parse_label_config(BOX_CONFIG.replace("RectangleLabels", "BrushLabels")).primary
BIG = 64 << 20  # 64 MiB


# -- request bodies over MAX_REQUEST_BYTES ---------------------------------------------------------------------
class Endless(io.RawIOBase):
    """A request body of ``size`` bytes made as it is read, counting what was read."""

    def __init__(self, size: int):
        self.size, self.read_bytes = size, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.size - self.read_bytes)
        buffer[:n] = b"x" * n
        self.read_bytes += n
        return n


def assert_413(reply, limit):
    assert reply.status_code == 413
    message = (reply.get_json() if hasattr(reply, "get_json") else reply.json())["error"]
    assert f"limit of {limit} bytes" in message and "MAX_REQUEST_BYTES" in message, message


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(make_settings(tmp_path_factory.mktemp("bad-input")))


@pytest.mark.parametrize("route", ["/predict", "/setup", "/webhook", "/projects/1/rollback", "/projects/1/complete"])
def test_body_with_content_length_over_the_limit_is_refused_unread(app, route):
    body = Endless(BIG)
    reply = app.test_client().post(route, content_type="application/json", environ_overrides={
        "wsgi.input": body, "CONTENT_LENGTH": str(BIG)})
    assert_413(reply, 20_000_000)
    assert body.read_bytes == 0  # refused on Content-Length alone


@pytest.mark.parametrize("route", ["/predict", "/webhook"])
def test_chunked_body_over_the_limit_is_refused_at_the_limit(app, route):
    # No Content-Length: Werkzeug stops reading at the limit and, by itself, hands the view the first 20 MB as
    # if that were the whole body (a 400 "not valid JSON", or worse a valid prefix); json_body makes it a 413.
    body = Endless(BIG)
    reply = app.test_client().post(route, content_type="application/json", environ_overrides={
        "wsgi.input": body, "wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    assert_413(reply, 20_000_000)
    assert body.read_bytes <= 20_000_001


def test_chunked_body_under_the_limit_is_read_whole(app):
    body = b'{"action": "PROJECT_UPDATED", "project": {"id": 1}}'
    reply = app.test_client().post("/webhook", content_type="application/json", environ_overrides={
        "wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    assert reply.status_code == 200 and reply.get_json()["status"] == "ignored"


def test_limit_follows_the_setting(tmp_path):
    client = create_app(make_settings(tmp_path, max_request_bytes=2048)).test_client()
    ok = {"action": "PROJECT_UPDATED", "project": {"id": 1}, "pad": "x" * 1500}
    assert client.post("/webhook", json=ok).status_code == 200
    assert_413(client.post("/webhook", json=ok | {"pad": "x" * 2100}), 2048)


def test_413_from_a_real_gunicorn(tmp_path):
    """Over HTTP through gunicorn (as `livetrain serve` runs it: gthread), with Content-Length and chunked: the
    client gets the JSON 413, not a reset connection, and the server goes on serving."""
    from backend.simulation.processes import free_port
    from tests.test_serve import wait_for

    port = free_port()
    env = dict(os.environ, MODEL_DIR=str(tmp_path), DOWNLOAD_WEIGHTS="false", TORCH_HOME=str(tmp_path / "torch"),
               MAX_REQUEST_BYTES="1000000")
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "2", "-w", "1", "-b",
                             f"127.0.0.1:{port}", "backend.api:create_app()"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(url + "/health", seconds=60).status_code == 200
        big = b"x" * BIG
        chunks = (big[i : i + (1 << 20)] for i in range(0, BIG, 1 << 20))  # a generator: requests sends it chunked
        for data in (big, chunks):
            reply = requests.post(url + "/predict", data=data, headers={"Content-Type": "application/json"}, timeout=60)
            assert_413(reply, 1_000_000)
        assert requests.post(url + "/webhook", json={"action": "X", "project": 1}, timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)


# -- images ------------------------------------------------------------------------------------------------------
def jpeg_bytes(width=64, height=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 30000) -> bytes:
    """A real, valid side x side 1-bit paletted PNG: about 110 KB on disk, 900 million pixels decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    compress, idat = zlib.compressobj(9), bytearray()
    for start in range(0, side, 1000):
        idat += compress.compress(row * min(1000, side - start))
    idat += compress.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0))
            + _chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") + _chunk(b"IDAT", bytes(idat)) + _chunk(b"IEND", b""))


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_IMAGES = {
    "garbage.png": (b"\x89PNG\r\n\x1a\n\x00\x00garbage" * 10, "could not decode image"),
    "half.png": (half(png_bytes(64, 48)), "could not decode image"),
    "half.jpg": (half(jpeg_bytes()), "could not decode image"),
    "bomb.png": (bomb_png(), "too large to decode safely"),
    "page.html": (b"<!doctype html><html><body>404 Not Found</body></html>", "could not decode image"),
    "empty.png": (b"", "could not decode image"),
    "notes.txt": (b"just some text\n" * 20, "could not decode image"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_a_clear_image_error(tmp_path, image_server, name):
    data, words = BAD_IMAGES[name]
    assert len(data) < 200_000  # the bomb too is tiny on disk
    url = image_server.add("/" + name, data)
    started = time.perf_counter()
    with pytest.raises(ImageError) as err:
        ImageFetcher(make_settings(tmp_path)).fetch(url)
    assert words in err.value.message and url in err.value.message, err.value.message
    assert time.perf_counter() - started < 10  # refused, not decoded


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_images_leave_the_rest_of_the_predict_batch_alone(tmp_path, image_server):
    app = create_app(make_settings(tmp_path))
    serve(app, BoxAt([0.0, 0.0, 32.0, 24.0], label=1, score=0.9))
    good = image_server.add("/good.png", png_bytes(64, 48))
    bad = [image_server.add("/" + name, data) for name, (data, _) in sorted(BAD_IMAGES.items())]
    payload = predict_payload(good, *bad, good)
    payload["tasks"].append({"id": 99, "data": {"picture": good}})  # the config's image key is missing
    payload["tasks"].append({"id": 100, "data": "not an object"})
    reply = app.test_client().post("/predict", json=payload)
    assert reply.status_code == 200, reply.get_json()
    results = reply.get_json()["results"]
    assert len(results) == len(payload["tasks"])  # one per task, in order: Label Studio drops a short reply
    assert results[0]["score"] is not None and len(results[0]["result"]) == 1
    assert results[len(bad) + 1]["score"] is not None and len(results[len(bad) + 1]["result"]) == 1
    for failed in results[1 : len(bad) + 1] + results[-2:]:
        assert failed == {"result": [], "score": None, "model_version": "test-v1"}


# -- annotations -> training examples ------------------------------------------------------------------------
def rect(x, y, w, h, label="Square", **extra):
    return {"id": "r", "from_name": "label", "to_name": "image", "type": "rectanglelabels", **extra,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def task(result, task_id=1, data=None, **annotation):
    return {"id": task_id, "data": {"image": "http://x/a.png"} if data is None else data,
            "annotations": [{"id": 10 + task_id, "result": result, **annotation}]}


def test_boxes_are_clipped_to_the_image():
    record = labeled_image(task([rect(90, -10, 30, 30), rect(-5, 50, 10, 60)]), BOX)
    assert [pytest.approx(box) for box in record.boxes] == [(90, 0, 10, 20), (0, 50, 5, 50)]


@pytest.mark.parametrize("value, reason", [
    ((10, 10, 0, 20), "zero or negative size"),
    ((10, 10, 20, -5), "zero or negative size"),
    ((120, 10, 20, 20), "lies outside the image"),
    ((10, -40, 20, 20), "lies outside the image"),
    ((float("nan"), 10, 20, 20), "not finite numbers (x=nan)"),
    ((10, 10, float("inf"), 20), "not finite numbers (width=inf)"),
    (("10", 10, 20, 20), "not finite numbers (x='10')"),
    ((10, None, 20, 20), "not finite numbers (y=None)"),
    ((10, 10, True, 20), "not finite numbers (width=True)"),
])
def test_unusable_boxes_are_dropped_with_a_reason(caplog, value, reason):
    caplog.set_level(logging.INFO, "backend.labelstudio.annotations")
    record = labeled_image(task([rect(*value), rect(10, 10, 20, 20, label="Disc")]), BOX)
    assert record.labels == ("Disc",) and record.boxes == ((10, 10, 20, 20),)
    assert reason in caplog.text and "dropped" in caplog.text, caplog.text


def poly(points, label="Square"):
    return {"id": "p", "from_name": "label", "to_name": "image", "type": "polygonlabels",
            "value": {"points": points, "closed": True, "polygonlabels": [label]}}


def brush(rle, width=8, height=6, label="Square"):
    return {"id": "b", "from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": width,
            "original_height": height, "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}


# num = 8*6*4 = 192 values, word size 32 bits: the decoder writes values over 255 into its byte buffer
WIDE_WORDS = [0, 0, 0, 192, 0xF8, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
GOOD_MASK = np.zeros((6, 8), dtype=bool)
GOOD_MASK[1:4, 2:6] = True


@pytest.mark.parametrize("control, region, reason", [
    (POLY, poly([[1, 1], [50, 50]]), "fewer than 3"),
    (POLY, poly([[1, 1], [50, 50], ["a", 3], [float("nan"), 1], [None]]), "fewer than 3"),
    (POLY, poly("1,1 5,5 9,1"), "no point list"),
    (POLY, poly([[10, 10], [20, 20], [30, 30]]), "no area"),
    (POLY, poly([[10, 10], [20, 20], [10, 30]], label="Cat"), "not in the label config"),
    (BOX, rect(10, 10, 20, 20, label="Cat"), "not in the label config"),
    (BRUSH, brush(mask_to_rle(GOOD_MASK), width=9), "belongs to an image of another size"),
    (BRUSH, brush(mask_to_rle(GOOD_MASK)[:-3]), "cannot be decoded"),
    (BRUSH, brush(WIDE_WORDS), "over 255"),  # a 32-bit word size
    (BRUSH, brush([0.5] * 10), "list of ints"),
    (BRUSH, brush([1, [2, 3]]), "list of ints"),
    (BRUSH, brush("abc"), "list of ints"),
    (BRUSH, brush(None), "has no rle"),
    (BRUSH, brush(mask_to_rle(GOOD_MASK), width=0), "without original_width"),
    (BRUSH, brush(mask_to_rle(GOOD_MASK), width=8.0), "without original_width"),
    # the header declares exactly 65535 x 16383 RGBA values: a 4.3 GB buffer, refused before it is allocated
    (BRUSH, brush([255, 255, 0, 4, 0xE0, 0, 0, 0], width=65535, height=16383), f"over {MAX_MASK_PIXELS} pixels"),
])
def test_unusable_shapes_are_dropped_with_a_reason(caplog, control, region, reason):
    caplog.set_level(logging.INFO, "backend.labelstudio.annotations")
    good = (poly([[10, 10], [30, 10], [20, 40]], label="Disc") if control is POLY else
            brush(mask_to_rle(GOOD_MASK), label="Disc") if control is BRUSH else rect(10, 10, 20, 20, label="Disc"))
    record = labeled_image(task([region, good]), control)
    assert record.labels == ("Disc",) and len(record.boxes) == 1
    assert len(record.masks) == (0 if control is BOX else 1)
    assert reason in caplog.text and "dropped" in caplog.text, caplog.text


def test_a_bow_tie_polygon_is_kept_a_straight_line_is_not():
    record = labeled_image(task([poly([[0, 0], [10, 10], [10, 0], [0, 10]]), poly([[10, 10], [20, 20], [30, 30]])]), POLY)
    assert record.boxes == ((0, 0, 10, 10),)  # its signed area is 0, but the editor fills both lobes


def test_brush_rle_with_wide_words_is_a_value_error_not_an_overflow():
    with pytest.raises(ValueError, match="over 255"):
        rle_to_mask(WIDE_WORDS, 8, 6)
    with pytest.raises(ValueError, match="image size must be positive integers"):
        rle_to_mask(mask_to_rle(GOOD_MASK), float("inf"), 6)


def test_only_unusable_regions_means_no_example_not_a_negative_one(caplog):
    caplog.set_level(logging.INFO, "backend.labelstudio.annotations")
    assert labeled_image(task([rect(10, 10, 0, 0)]), BOX) is None
    assert "none usable" in caplog.text
    assert labeled_image(task([]), BOX).is_negative  # no region at all: a real negative


def test_task_without_the_image_key_is_skipped_with_a_message(caplog):
    caplog.set_level(logging.INFO, "backend.labelstudio.annotations")
    for data in ({"picture": "http://x/a.png"}, {"image": ""}, {"image": 5}, [], "http://x/a.png"):
        caplog.clear()
        assert labeled_image(task([rect(10, 10, 20, 20)], data=data), BOX) is None
        assert "has no image URL in data['image']" in caplog.text, data


@pytest.mark.parametrize("annotations", [5, "abc", {"id": 1}, [5, "x", None], [{"id": "1", "result": []}]])
def test_malformed_annotation_lists_give_no_example(annotations):
    assert labeled_image({"id": 1, "data": {"image": "http://x/a.png"}, "annotations": annotations}, BOX) is None


@pytest.mark.parametrize("result", [5, "abc", {"a": 1}, [5, None, "x"], [{"type": ["rectanglelabels"], "value": {}}],
                                    [{"from_name": "label", "type": "rectanglelabels", "value": [1, 2]}],
                                    [{"from_name": "label", "type": "rectanglelabels", "value": {"rectanglelabels": "Square"}}],
                                    [{"from_name": "label", "type": "rectanglelabels", "value": {"rectanglelabels": [["Square"], {}]}}]])
def test_malformed_results_do_not_crash(result):
    record = labeled_image(task(result), BOX)
    assert record is None or record.boxes == ()


# Anything Label Studio (or a corrupted export) could hand the worker: labeled_image never raises, and what it
# keeps is something a training step can use.
coordinate = st.one_of(st.floats(), st.integers(-10**6, 10**6), st.text(max_size=3), st.none(), st.booleans(),
                       st.sampled_from([0, 100, 50.5, -0.0, 1e308]))
label = st.sampled_from(["Square", "Disc", "Cat", "", None, 5, ["Square"]])
rle = st.one_of(st.lists(st.integers(0, 255), max_size=30), st.just(mask_to_rle(GOOD_MASK)), st.none(),
                st.lists(st.integers(-300, 300), max_size=8), st.text(max_size=5))
region = st.one_of(
    st.builds(lambda x, y, w, h, lab, t: rect(x, y, w, h, label=lab) | ({"type": t} if t else {}),
              coordinate, coordinate, coordinate, coordinate, label, st.sampled_from([None, "polygonlabels", "labels"])),
    st.builds(lambda pts, lab: poly(pts, label=lab), st.lists(st.lists(coordinate, max_size=3), max_size=6) | coordinate, label),
    st.builds(lambda r, w, h, lab: brush(r, w, h, label=lab), rle, st.sampled_from([8, 9, 0, -1, 8.0, None, 10**9]),
              st.sampled_from([6, 0, None, 10**9]), label),
    st.dictionaries(st.sampled_from(["from_name", "type", "value", "id"]), coordinate | st.just("label")),
)
tasks = st.fixed_dictionaries({"id": st.sampled_from([1, 2, "3", None, True]),
                               "data": st.sampled_from([{"image": "http://x/a.png"}, {}, {"image": None}, "x"]),
                               "annotations": st.lists(st.fixed_dictionaries(
                                   {"id": st.sampled_from([1, 2, "x", None]), "result": st.lists(region, max_size=5) | coordinate},
                                   optional={"was_cancelled": st.booleans(), "ground_truth": st.booleans(),
                                             "updated_at": st.sampled_from(["2026-01-01T00:00:00Z", "yesterday", "", 5, None,
                                                                            "2026-13-45T99:00:00", "9999-12-31T23:59:59-23:59"])}),
                                   max_size=3) | coordinate})


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=tasks, control=st.sampled_from([BOX, POLY, BRUSH]))
def test_any_annotation_gives_a_usable_example_or_none(task, control):
    record = labeled_image(task, control)
    if record is None:
        return
    assert len(record.boxes) == len(record.labels) and set(record.labels) <= set(control.labels)
    assert len(record.masks) == (len(record.boxes) if control.task == "masks" else 0)
    for x, y, w, h in record.boxes:
        assert all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0
        assert 0 <= x and 0 <= y and x + w <= 100 + 1e-9 and y + h <= 100 + 1e-9
    assert type(record).from_json(record.to_json()) == record  # what the training set stores reads back


class FixedImages:
    """A fetcher that serves one 80x60 image for every URL but the broken ones (no network in unit tests)."""

    def __init__(self):
        self.image = Image.fromarray(np.full((60, 80, 3), 128, dtype=np.uint8))

    def fetch(self, url):
        if "broken" in url:
            raise ImageError(f"could not decode image {url}: cannot identify image file")
        return self.image.copy()


@pytest.mark.parametrize("control", [BOX, POLY, BRUSH], ids=["boxes", "polygons", "brush"])
def test_a_session_given_bad_data_trains_on_the_good_parts(control):
    """The worker's path: LS tasks -> labeled_image (sync) -> ExampleCache.load (each training step, which leaves
    out a task whose load raises LivetrainError). Only the good regions and images reach the targets."""
    mask = np.zeros((60, 80), dtype=bool)
    mask[6:30, 8:40] = True
    good = {"boxes": rect(10, 10, 40, 40), "polygon": poly([[10, 10], [50, 10], [50, 50], [10, 50]]),
            "brush": brush(mask_to_rle(mask), 80, 60)}[control.result_type[:-6] if control.task == "masks" else "boxes"]
    junk = [rect(float("nan"), 1, 2, 3), rect(10, 10, -5, 5), rect(10, 10, 20, 20, label="Cat"),
            poly([[1, 1], [2, 2]]), brush(mask_to_rle(mask), 81, 60), brush([1, 2, 3, 4, 5], 80, 60),
            {"from_name": "label", "type": control.result_type, "value": "junk"}, 17]
    ls_tasks = [
        task([good] + junk, 1),
        task(junk, 2),  # only junk: left out, not a negative
        task([good], 3, data={"image": "http://x/broken.png"}),  # its image fails at load time
        task([good], 4, data={"other": "http://x/a.png"}),  # no image key
        {"id": 5, "data": {"image": "http://x/a.png"}, "annotations": 7},
        task([], 6),  # a real negative
    ]
    records = [r for r in (labeled_image(t, control) for t in ls_tasks) if r is not None]
    assert [r.task_id for r in records] == [1, 3, 6]
    cache = ExampleCache(FixedImages(), control.task, limit=(60, 80))
    loaded = {}
    for record in records:
        try:
            loaded[record.task_id] = cache.load(record, control.labels)
        except LivetrainError as exc:  # what Session.step catches: the task is dropped, the session goes on
            assert record.task_id == 3 and "could not decode image" in exc.message
    assert sorted(loaded) == [1, 6]
    image, target = loaded[1]
    assert image.shape == (3, 60, 80) and target["labels"].tolist() == [1]
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    assert (x1, y1) == pytest.approx((8, 6), abs=1) and (x2, y2) == pytest.approx((40, 30), abs=1)
    if control.task == "masks":
        assert target["masks"].shape == (1, 60, 80) and target["masks"].dtype == torch.uint8
    assert loaded[6][1]["boxes"].shape == (0, 4)

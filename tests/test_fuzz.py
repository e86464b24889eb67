"""Property-based fuzzing of every route that takes input: whatever arrives, the answer is never a 5xx, and every
4xx is JSON with a non-empty ``error`` message a person can act on.

One app for the module (embedded Redis, a published version for project 7 so /predict runs the real predictor on
images that all fail to load: no network here). Example counts are small so the file stays cheap on CI.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote, urlencode

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.api import create_app
from backend.errors import LabelConfigError
from backend.labelstudio.label_config import parse_label_config
from backend.model_store.versions import VersionStore
from tests.conftest import BOX_CONFIG
from tests.test_api import make_settings

# FUZZ_EXAMPLES=500 for a longer hunt than CI's
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
# In CI (CI set) the examples are derived from each test's name: a red run is reproducible and never a coin
# toss; locally each run draws new ones.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
FEW = settings(FUZZ, max_examples=max(EXAMPLES // 3, 5))

POLYGON_CONFIG = BOX_CONFIG.replace("RectangleLabels", "PolygonLabels")
BRUSH_CONFIG = BOX_CONFIG.replace("RectangleLabels", "BrushLabels")
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">' for i in range(1, 10))
                  + ']><View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                  '<Label value="&lol9;"/></RectangleLabels></View>')
EXTERNAL_ENTITY = ('<!DOCTYPE View [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><View><Image name="image" value="$image"/>'
                   '<RectangleLabels name="label" toName="image"><Label value="&xxe;"/></RectangleLabels></View>')


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    app = create_app(make_settings(tmp, image_timeout=1.0, max_request_bytes=1_000_000))
    torch.manual_seed(0)
    starting = app.extensions["livetrain"].starting
    VersionStore(tmp, "7").publish(starting.build(3).state_dict(), {"arch": starting.arch, "classes": ["Square", "Disc"]},
                                   "cells")
    return app.test_client()


def check(reply, route=""):
    """The property: no 5xx; a 4xx is a JSON object with a non-empty ``error`` string."""
    assert reply.status_code < 500, (route, reply.status_code, reply.get_data()[:800])
    if reply.status_code >= 400:
        body = reply.get_json(silent=True)
        assert isinstance(body, dict), (route, reply.status_code, reply.get_data()[:300])
        assert isinstance(body.get("error"), str) and body["error"].strip(), (route, body)
    return reply


# -- strategies --------------------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**19, max_value=10**40)
           | st.floats() | st.text(max_size=30) | st.sampled_from(["", "1", "7", "7.1795333704", "all", "\x00", "\ud800"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                                 max_size=4), max_leaves=12)
weird_projects = st.sampled_from([
    "1.x", "../1", "..", "-1", "1e309", "1e3", "٣", "²", "１", "0x10", " 7 ", "7.", ".7", "", " ", "7/8", "%2e%2e",
    "1" * 30, "9" * 5000, "7\x00", "7\n", "ab", "<script>", "DROP TABLE", "\ud800",
]) | st.sampled_from([-1, 0, 7, 10**18, 10**4000, 1e309, -1e309, 7.5, True, False, None, [], {}, {"id": "7"},
                      {"id": {"id": 7}}, {"id": [7]}, {"id": 10**4000}]) | st.text(max_size=12) | st.integers()
project_values = st.sampled_from(["7.1795333704", 7, {"id": 7}, "3.1"]) | weird_projects
# Image URLs urlsplit or the cache key cannot take: they once failed a whole /predict batch with a 500.
MALFORMED_URLS = ["http://[::1", "http://[zz]/a.png", "//[::1", "http://\ud800/a.png", "http://127.0.0.1:1/\ud800"]
image_urls = st.sampled_from([
    "http://127.0.0.1:1/a.png", "/data/upload/1/a.png", "//127.0.0.1:1/a.png",
    "http://127.0.0.1:99999/a.png", "http://127.0.0.1:-1/", "file:///etc/passwd", "s3://bucket/a.png", "data:image/png;base64,AAAA",
    "javascript:alert(1)", "", " ", "\x00", "http://a b/c", "http://127.0.0.1:1/" + "a" * 3000,
    "ftp://x/a.png", "http:///a.png", "http://user:pass@127.0.0.1:1/a.png", "http://x:abc/",
]) | st.sampled_from(MALFORMED_URLS) | st.text(max_size=40)
task_data = (st.fixed_dictionaries({"image": image_urls | json_values}, optional={"other": json_values})
             | st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values)
tasks = st.fixed_dictionaries({}, optional={
    "id": st.integers() | json_values, "data": task_data,
    "annotations": json_values | st.lists(st.fixed_dictionaries({}, optional={"id": json_values, "result": json_values,
                                                                           "was_cancelled": json_values})),
    "predictions": json_values, "total_annotations": json_values,
})
tag = st.sampled_from(["View", "Image", "RectangleLabels", "PolygonLabels", "BrushLabels", "Label", "Choices", "Header",
                       "KeyPointLabels", "Rectangle", "Labels", "Text", "x:Image", "rectanglelabels", "Unknown"])
attr = st.tuples(st.sampled_from(["name", "toName", "value", "model_score_threshold", "model_skip", "predicted_values",
                                  "background", "xmlns", "xmlns:x", "choice", "Name"]),
                 st.sampled_from(["image", "label", "$image", "$", "", "Square", "Disc", "nan", "inf", "-1", "0.5", "2",
                                  "true", "a,b,,", "&amp;", "&lt;", "\u202e", "💥", "&#0;", "&#x10FFFF;"]) | st.text(max_size=6))


@st.composite
def xml_element(draw, depth=0):
    name = draw(tag)
    attrs = "".join(f' {k}="{v.replace(chr(34), "&quot;")}"' for k, v in draw(st.lists(attr, max_size=4)))
    children = "" if depth > 2 else "".join(draw(st.lists(xml_element(depth + 1), max_size=3)))
    return f"<{name}{attrs}>{children}</{name}>" if children or draw(st.booleans()) else f"<{name}{attrs}/>"


label_configs = st.one_of(
    st.sampled_from([BOX_CONFIG, POLYGON_CONFIG, BRUSH_CONFIG, BILLION_LAUGHS, EXTERNAL_ENTITY,
                     BOX_CONFIG.replace('toName="image"', ""), BOX_CONFIG.replace('name="label" ', ""),
                     BOX_CONFIG.replace("RectangleLabels", "EllipseLabels"),
                     BOX_CONFIG.replace("</View>", BOX_CONFIG[6:]),  # every name twice
                     BOX_CONFIG.replace('model_score_threshold="0.5"', 'model_score_threshold="nan"'),
                     '<?xml version="1.0" encoding="UTF-16"?>' + BOX_CONFIG, BOX_CONFIG + "<extra/>", BOX_CONFIG[:40],
                     "<View>\ud800</View>", "<" * 1000, "<a>" * 5000, "", " ", "null", "<!-- -->"]),
    xml_element().map(lambda x: f"<View>{x}</View>"),
    st.text(max_size=200),
    st.text(alphabet="<>/=\"' abcdefghiVIewLlRtTN$&;!-?[]", max_size=200),
    json_values,
)


def raw(body) -> bytes:
    """JSON as Python writes it, NaN/Infinity and lone surrogates included (json.loads takes both back)."""
    return json.dumps(body, allow_nan=True).encode()


def post(client, route, body):
    return check(client.post(route, data=raw(body), content_type="application/json"), route)


def path(value) -> str:
    try:
        text = str(value)
    except ValueError:  # a 5000-digit int
        text = "9" * 5000
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


# -- /predict, /setup, /webhook ---------------------------------------------------------------------------
@FUZZ
@given(body=json_values)
def test_any_json_anywhere(client, body):
    for route in ("/predict", "/setup", "/webhook", "/projects/7/rollback", "/projects/7/complete"):
        post(client, route, body)


@FUZZ
@given(body=st.fixed_dictionaries({}, optional={"tasks": st.lists(tasks, max_size=4) | json_values, "project": project_values,
                                                "label_config": label_configs, "params": json_values}))
def test_predict_almost_valid(client, body):
    post(client, "/predict", body)


@FEW
@given(task_list=st.lists(tasks, min_size=1, max_size=4))
def test_predict_with_a_valid_config_runs_the_predictor_and_answers_every_task(client, task_list):
    reply = post(client, "/predict", {"tasks": task_list, "project": "7.1795333704", "label_config": BOX_CONFIG})
    assert reply.status_code == 200
    results = reply.get_json()["results"]
    assert len(results) == len(task_list)  # Label Studio drops the whole reply otherwise
    assert all(r["result"] == [] and r["model_version"] == "cells-v1" for r in results)  # no image loads here


@FUZZ
@given(body=st.fixed_dictionaries({}, optional={"project": project_values, "schema": label_configs,
                                                "hostname": st.sampled_from(["", "127.0.0.1:1", "http://[::1", "javascript:x"]) | json_values.filter(lambda v: not isinstance(v, str)),
                                                "access_token": json_values, "extra_params": json_values}))
def test_setup_almost_valid(client, body):
    post(client, "/setup", body)


@FUZZ
@given(body=st.fixed_dictionaries({"action": st.sampled_from(["START_TRAINING", "ANNOTATION_CREATED", "ANNOTATIONS_DELETED",
                                                               "TASKS_DELETED", "PROJECT_UPDATED", ""]) | json_values},
                                  optional={"project": project_values, "annotation": json_values | st.fixed_dictionaries({"project": project_values}),
                                            "task": json_values | st.fixed_dictionaries({"id": json_values}),
                                            "tasks": json_values | st.lists(st.fixed_dictionaries({"id": json_values})),
                                            "annotations": json_values | st.lists(st.fixed_dictionaries({"id": json_values}))}))
def test_webhook_almost_valid(client, body):
    post(client, "/webhook", body)


# -- routes with a project in the path, /jobs, /versions, /export ---------------------------------------------
@FUZZ
@given(project=project_values, body=json_values | st.fixed_dictionaries({}, optional={
    "version": st.sampled_from(["cells-v1", "cells-v9", "../7", "../../etc/passwd", "cells-v1/../x", "", "cells-v" + "9" * 5000])
    | json_values, "tasks": json_values, "min_score": json_values, "max_detections": json_values,
    "remove_existing": json_values, "skip_annotated": json_values}))
def test_project_routes(client, project, body):
    for action in ("rollback", "complete", "train", "rescore"):
        post(client, f"/projects/{path(project)}/{action}", body)


@FUZZ
@given(job=st.text(max_size=40) | st.sampled_from(["..", "rq:job:x", "a" * 5000, "train-7-x", "%00", "*", "\ud800"]),
       project=project_values, fmt=st.sampled_from(["", "onnx", "torchscript", "zip", "../x"]) | st.text(max_size=8),
       version=st.sampled_from(["", "cells-v9", "../x", "cells-v1/../../x"]) | st.text(max_size=12))
def test_get_routes(client, job, project, fmt, version):
    check(client.get(f"/jobs/{path(job)}"), "/jobs")
    check(client.get("/versions?" + urlencode({"project": path(project)})), "/versions")
    check(client.get(f"/versions?project={path(project)[:300]}&project=7"), "/versions")
    if fmt in ("torchscript", "onnx") and version == "":  # a real export of the active version takes seconds
        fmt = "zip"
    check(client.get(f"/projects/{path(project)}/export?format={path(fmt)}&version={path(version)}"), "/export")


# -- bytes and content types ---------------------------------------------------------------------------------
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=xyz", "multipart/form-data", "application/json; charset=utf-16",
                                 "application/octet-stream", "", "image/png", "application/json; charset=latin-1"])


@FUZZ
@given(data=st.binary(max_size=300) | st.sampled_from([b"", b"null", b"[]", b"{", b"\xff\xfe{}", b"\xef\xbb\xbf{}",
                                                       b'{"a":1e999999}', b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000,
                                                       b'"\\ud800"', b"--xyz\r\n\r\n--xyz--"]),
       content_type=content_types)
def test_bytes_with_any_content_type(client, data, content_type):
    for route in ("/predict", "/setup", "/webhook", "/projects/7/rollback", "/projects/7/complete", "/projects/7/train"):
        check(client.post(route, data=data, content_type=content_type or None), route)


def test_body_over_the_limit_is_a_json_413(client):
    reply = check(client.post("/predict", data=b"x" * 1_000_001, content_type="application/json"))
    assert reply.status_code == 413 and "MAX_REQUEST_BYTES" in reply.get_json()["error"]


# -- label configs, parsed directly ----------------------------------------------------------------------------
@settings(FUZZ, max_examples=EXAMPLES * 4)
@given(xml=label_configs)
def test_label_config_parses_or_says_why(xml):
    try:
        config = parse_label_config(xml)
    except LabelConfigError as exc:
        assert exc.status == 400 and exc.message.strip()
        return
    control = config.primary
    assert control.from_name and control.labels and control.tag_type in ("RectangleLabels", "PolygonLabels", "BrushLabels")
    assert control.score_threshold is None or 0.0 <= control.score_threshold <= 1.0
    assert all(len(label) < 1000 for label in control.labels)  # no entity was expanded


@pytest.mark.parametrize("xml", [BILLION_LAUGHS, EXTERNAL_ENTITY, BILLION_LAUGHS.replace("<?xml version=\"1.0\"?>", "")])
def test_entity_declarations_are_refused_not_expanded(client, xml):
    with pytest.raises(LabelConfigError, match="DOCTYPE"):
        parse_label_config(xml)
    for route, key in (("/setup", "schema"), ("/predict", "label_config")):
        reply = post(client, route, {"project": "7.1", key: xml, "tasks": []})
        assert reply.status_code == 400 and "DOCTYPE" in reply.get_json()["error"]


@pytest.mark.parametrize("xml, words", [
    (BOX_CONFIG.replace("</View>", BOX_CONFIG[6:]), ["several tags named", "'image'", "'label'"]),
    (BOX_CONFIG.replace('toName="image"', ""), ["toName=None", "no Image tag"]),
    (BOX_CONFIG.replace('name="label" ', ""), ["<RectangleLabels> has no name"]),
    (BOX_CONFIG.replace('model_score_threshold="0.5"', 'model_score_threshold="nan"'), ["between 0 and 1"]),
    (BOX_CONFIG.replace('model_score_threshold="0.5"', 'model_score_threshold="5"'), ["between 0 and 1"]),
    ("<View>\ud800</View>", ["not valid XML"]),
])
def test_odd_configs_get_a_message_naming_the_problem(xml, words):
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(xml)
    for word in words:
        assert word in err.value.message, err.value.message


def test_specific_payloads_that_used_to_500(client):
    """Each of these was a 500 before (found by the fuzzing above)."""
    cases = [
        ("/webhook", {"action": "ANNOTATION_CREATED", "annotation": [1]}),  # annotation.get on a list
        ("/webhook", {"action": "ANNOTATION_CREATED", "project": 7, "tasks": 5}),  # list(5)
        ("/webhook", {"action": "ANNOTATIONS_DELETED", "project": 7, "annotations": 5}),  # iterating an int
        ("/webhook", {"action": "ANNOTATION_CREATED", "project": 7, "task": {"id": "abc"}}),  # int("abc") for Redis
        ("/webhook", {"action": "ANNOTATION_CREATED", "project": 7, "task": {"id": [1]}}),
        ("/setup", {"project": "7.1", "schema": BOX_CONFIG, "hostname": 5}),  # (5).strip()
        ("/predict", {"project": "7.1", "label_config": BOX_CONFIG, "tasks": [{"data": [1]}]}),  # [1].get
        ("/predict", {"project": "7.1", "label_config": "<View>\ud800</View>", "tasks": []}),  # UnicodeEncodeError
        ("/predict", {"project": 10**4000, "label_config": BOX_CONFIG, "tasks": []}),  # a 4000-digit project: a folder name too long
    ]
    for route, body in cases:
        reply = post(client, route, body)
        assert reply.status_code in (200, 400), (route, body, reply.get_json())
    reply = post(client, "/predict", {"project": "7.1", "label_config": BOX_CONFIG, "tasks": [{"id": 1, "data": [1]}]})
    assert reply.status_code == 200 and reply.get_json()["results"][0]["result"] == []
    reply = check(client.post("/webhook", data=b"[" * 100_000, content_type="application/json"))  # RecursionError
    assert reply.status_code == 400 and "not valid JSON" in reply.get_json()["error"]
    for project in ("٣", "²", "１"):  # isdigit() but not an id: a folder and Redis key named after it, or int() failing
        reply = check(client.post(f"/projects/{quote(project)}/train"))
        assert reply.status_code == 400 and "invalid project" in reply.get_json()["error"]
    long_name = "cells-v" + "9" * 5000  # a folder name too long for the file system: OSError
    reply = post(client, "/projects/7/rollback", {"version": long_name})
    assert reply.status_code == 400 and "version names look like" in reply.get_json()["error"]
    reply = check(client.get(f"/projects/7/export?format=onnx&version={long_name}"))
    assert reply.status_code == 400 and len(reply.get_json()["error"]) < 300
    assert check(client.get("/jobs/a:b")).status_code == 404  # RQ's ValueError for ids it would not make
    reply = post(client, "/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 10**4000}})
    assert reply.status_code == 400 and len(reply.get_json()["error"]) < 300  # the message does not echo 4000 digits


def test_nan_and_infinity_literals(client):
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"project": ' + literal + b', "tasks": [], "label_config": "x"}'
        check(client.post("/predict", data=body, content_type="application/json"))
        body = b'{"action": "START_TRAINING", "project": {"id": ' + literal + b"}}"
        assert check(client.post("/webhook", data=body, content_type="application/json")).status_code == 400


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_image_urls_do_not_fail_the_batch(client, url):
    tasks = [{"id": 1, "data": {"image": url}}, {"id": 2, "data": {"image": "http://127.0.0.1:1/a.png"}}]
    reply = post(client, "/predict", {"tasks": tasks, "project": "7.1", "label_config": BOX_CONFIG})
    assert reply.status_code == 200 and [r["result"] for r in reply.get_json()["results"]] == [[], []]

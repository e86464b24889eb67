"""ImageFetcher / LabelStudioAuth against real HTTP servers on 127.0.0.1 (no mocks of our code)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from backend.errors import ImageError
from backend.labelstudio.images import ImageFetcher, LabelStudioAuth
from backend.settings import Settings

LEGACY = "0123456789abcdef0123456789abcdef01234567"


# -- helpers ---------------------------------------------------------------------------------
class Server:
    """A ThreadingHTTPServer on an ephemeral port. ``routes`` maps the full request path (query
    included) to ``fn(headers, body) -> (status, headers, body)``; every request is recorded."""

    def __init__(self, routes):
        self.routes = routes
        self.requests: list[tuple[str, str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.requests.append((self.command, self.path, dict(self.headers)))
                route = server.routes.get(self.path)
                status, headers, payload = route(self.headers, body) if route else (404, {}, b"not found")
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers and not headers.get("X-No-Length"):
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (size limit)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def paths(self, method="GET"):
        return [path for m, path, _ in self.requests if m == method]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(routes):
        servers.append(Server(routes))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def settings(tmp_path, **kw):
    # The servers here stand for third-party image hosts too: let their 127.0.0.1 through the SSRF guard
    # (tests/test_ssrf.py covers the guard itself).
    return Settings(model_dir=tmp_path, **({"image_url_allowlist": "127.0.0.1"} | kw))


def image_bytes(w=32, h=24, fmt="PNG", mode="RGB", **save):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w, channels) if channels else (h, w)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode if mode != "P" else None)
    if mode == "P":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def ok(data, **headers):
    return lambda h, b: (200, headers, data)


def need_auth(expected, data):
    return lambda h, b: (200, {}, data) if h.get("Authorization") == expected else (401, {}, b'{"detail":"no"}')


def make_jwt(claims):
    enc = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(claims)}.c2lnbmF0dXJl"


class PatLabelStudio:
    """Label Studio's PAT flow: POST /api/token/refresh/ trades the PAT for an access JWT."""

    def __init__(self, serve, data, lifetime=3600):
        self.pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat"})
        self.lifetime = lifetime
        self.refreshes = 0
        self.valid: dict[str, int] = {}
        image = lambda h, b: (200, {}, data) if self._valid(h.get("Authorization", "")) else (401, {}, b"")
        routes = {"/api/token/refresh/": self._refresh}
        routes.update({f"/data/upload/1/{n}.png": image for n in "abcdef"})
        self.server = serve(routes)

    def _refresh(self, headers, body):
        if json.loads(body).get("refresh") != self.pat:
            return 401, {}, b'{"detail":"Token is invalid or expired"}'
        self.refreshes += 1
        exp = int(time.time()) + self.lifetime
        access = make_jwt({"token_type": "access", "exp": exp, "jti": uuid.uuid4().hex})
        self.valid[access] = exp
        return 200, {"Content-Type": "application/json"}, json.dumps({"access": access}).encode()

    def _valid(self, header):
        token = header.removeprefix("Bearer ")
        return header.startswith("Bearer ") and self.valid.get(token, 0) > time.time()


# -- auth ------------------------------------------------------------------------------------
def test_legacy_token_is_sent_and_required(serve, tmp_path):
    ls = serve({"/data/upload/1/a.png": need_auth(f"Token {LEGACY}", image_bytes())})
    img = ImageFetcher(settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=LEGACY)).fetch(
        "/data/upload/1/a.png")
    assert img.size == (32, 24) and img.mode == "RGB"

    with pytest.raises(ImageError) as err:
        ImageFetcher(settings(tmp_path / "b", label_studio_url=ls.url)).fetch("/data/upload/1/a.png")
    assert f"{ls.url}/data/upload/1/a.png returned HTTP 401" in err.value.message
    assert "set LABEL_STUDIO_API_KEY" in err.value.message

    wrong = "f" * 40
    with pytest.raises(ImageError) as err:
        ImageFetcher(settings(tmp_path / "c", label_studio_url=ls.url, label_studio_api_key=wrong)).fetch(
            "/data/upload/1/a.png")
    assert "HTTP 401" in err.value.message and "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true" in err.value.message
    assert wrong not in err.value.message


def test_pat_is_exchanged_and_refreshed_before_expiry(serve, tmp_path, caplog):
    caplog.set_level("DEBUG")
    # Access tokens live 32 s; the client re-exchanges when fewer than 30 s are left.
    ls = PatLabelStudio(serve, image_bytes(), lifetime=32)
    fetcher = ImageFetcher(settings(tmp_path, label_studio_url=ls.server.url, label_studio_api_key=ls.pat))
    fetcher.fetch("/data/upload/1/a.png")
    fetcher.fetch("/data/upload/1/b.png")
    assert ls.refreshes == 1
    time.sleep(2.1)
    fetcher.fetch("/data/upload/1/c.png")
    assert ls.refreshes == 2
    assert all(h["Authorization"].startswith("Bearer ") and ls.pat not in h["Authorization"]
               for m, p, h in ls.server.requests if m == "GET")
    assert ls.pat not in caplog.text and not any(token in caplog.text for token in ls.valid)


def test_pat_concurrent_fetches_share_one_exchange(serve, tmp_path):
    ls = PatLabelStudio(serve, image_bytes())
    fetcher = ImageFetcher(settings(tmp_path, label_studio_url=ls.server.url, label_studio_api_key=ls.pat))
    threads = [threading.Thread(target=fetcher.fetch, args=(f"/data/upload/1/{n}.png",)) for n in "abcdef"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ls.refreshes == 1 and len(ls.server.paths()) == 6


def test_pat_retries_once_after_401(serve, tmp_path):
    ls = PatLabelStudio(serve, image_bytes())
    fetcher = ImageFetcher(settings(tmp_path, label_studio_url=ls.server.url, label_studio_api_key=ls.pat))
    fetcher.fetch("/data/upload/1/a.png")
    ls.valid.clear()  # Label Studio revoked the access token early
    fetcher.fetch("/data/upload/1/b.png")
    assert ls.refreshes == 2
    assert ls.server.paths() == ["/data/upload/1/a.png", "/data/upload/1/b.png", "/data/upload/1/b.png"]


def test_bad_pat_gives_clear_error(serve, tmp_path):
    ls = PatLabelStudio(serve, image_bytes())
    bad = make_jwt({"token_type": "refresh", "exp": 1, "jti": "other"})
    with pytest.raises(ImageError) as err:
        ImageFetcher(settings(tmp_path, label_studio_url=ls.server.url, label_studio_api_key=bad)).fetch(
            "/data/upload/1/a.png")
    assert "/api/token/refresh/" in err.value.message and "HTTP 401" in err.value.message
    assert bad not in err.value.message


def test_auth_headers_directly():
    assert LabelStudioAuth("http://x", "").headers() == {}
    assert LabelStudioAuth("http://x", f"Token {LEGACY}").headers() == {"Authorization": f"Token {LEGACY}"}
    assert not LabelStudioAuth("http://x", LEGACY).is_pat
    assert LabelStudioAuth("http://x", make_jwt({"exp": 1})).is_pat


def test_third_party_host_gets_no_credentials_even_via_redirect(serve, tmp_path):
    other = serve({"/img.png": ok(image_bytes())})
    ls = serve({
        "/data/upload/1/a.png": need_auth(f"Token {LEGACY}", image_bytes()),
        "/data/upload/1/moved.png": lambda h, b: (302, {"Location": f"{other.url}/img.png"}, b""),
    })
    fetcher = ImageFetcher(settings(tmp_path, label_studio_url=ls.url, label_studio_api_key=LEGACY))
    assert fetcher.resolve(f"{other.url}/img.png") == (f"{other.url}/img.png", False)
    assert fetcher.resolve(f"{ls.url}/data/upload/1/a.png") == (f"{ls.url}/data/upload/1/a.png", True)
    fetcher.fetch("/data/upload/1/a.png")
    fetcher.fetch(f"{other.url}/img.png")
    fetcher.fetch("/data/upload/1/moved.png")
    assert ls.requests[0][2]["Authorization"] == f"Token {LEGACY}"
    assert ls.requests[1][2]["Authorization"] == f"Token {LEGACY}"  # the redirecting request
    assert len(other.requests) == 2
    assert all("Authorization" not in headers for _, _, headers in other.requests)


def test_local_files_path_goes_through_label_studio(serve, tmp_path):
    ls = serve({"/data/local-files/?d=dir/x.jpg": need_auth(f"Token {LEGACY}", image_bytes(fmt="JPEG"))})
    fetcher = ImageFetcher(settings(tmp_path, label_studio_url=ls.url + "/", label_studio_api_key=LEGACY))
    assert fetcher.resolve("/data/local-files/?d=dir/x.jpg") == (f"{ls.url}/data/local-files/?d=dir/x.jpg", True)
    assert fetcher.fetch("/data/local-files/?d=dir/x.jpg").size == (32, 24)


def test_fallback_credentials_from_setup(serve, tmp_path):
    ls = serve({"/data/upload/1/a.png": need_auth(f"Token {LEGACY}", image_bytes())})
    fetcher = ImageFetcher(settings(tmp_path))
    with pytest.raises(ImageError, match="set LABEL_STUDIO_URL"):
        fetcher.fetch("/data/upload/1/a.png")
    fetcher.set_fallback(ls.url, LEGACY)
    assert fetcher.fetch("/data/upload/1/a.png").size == (32, 24)

    # Settings win over /setup's values.
    configured = ImageFetcher(settings(tmp_path / "b", label_studio_url=ls.url, label_studio_api_key=LEGACY))
    configured.set_fallback("http://127.0.0.1:1", "wrong")
    assert configured.fetch("/data/upload/1/a.png").size == (32, 24)


# -- failures --------------------------------------------------------------------------------
def test_http_404(serve, tmp_path):
    ls = serve({})
    with pytest.raises(ImageError) as err:
        ImageFetcher(settings(tmp_path, label_studio_url=ls.url)).fetch("/data/upload/1/missing.png")
    assert err.value.message == f"image {ls.url}/data/upload/1/missing.png returned HTTP 404"


def test_unreachable_host(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match=f"127.0.0.1:{port} is unreachable"):
        ImageFetcher(settings(tmp_path, image_timeout=2.0)).fetch(f"http://127.0.0.1:{port}/a.png")


@pytest.mark.parametrize("data", [b"this is not an image", image_bytes()[:200]], ids=["garbage", "truncated"])
def test_corrupt_bytes_are_refused_and_not_cached(serve, tmp_path, data):
    srv = serve({"/a.png": ok(data)})
    fetcher = ImageFetcher(settings(tmp_path))
    for _ in range(2):
        with pytest.raises(ImageError, match=f"could not decode image {srv.url}/a.png"):
            fetcher.fetch(f"{srv.url}/a.png")
    assert len(srv.requests) == 2  # the bad bytes were dropped from the cache


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_too_many_bytes(serve, tmp_path, declared):
    data = image_bytes(200, 200)
    srv = serve({"/big.png": ok(data, **({} if declared else {"X-No-Length": "1"}))})
    with pytest.raises(ImageError) as err:
        ImageFetcher(settings(tmp_path, max_image_bytes=10_000)).fetch(f"{srv.url}/big.png")
    assert f"image {srv.url}/big.png is" in err.value.message and "over MAX_IMAGE_BYTES=10000" in err.value.message
    if declared:
        assert f"is {len(data)} bytes" in err.value.message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_too_many_pixels_refused_before_decoding(serve, tmp_path):
    # Only a PNG header claiming 10000x10000: refusing it by size (not "could not decode")
    # shows the limit is checked before pixel data is read.
    def fake_png(side):  # a real 1x1 PNG whose header claims side x side
        png = image_bytes(1, 1)
        ihdr = b"IHDR" + side.to_bytes(4, "big") * 2 + png[24:29]
        return png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]

    srv = serve({"/bomb.png": ok(fake_png(10000)), "/huge.png": ok(fake_png(30000)),
                 "/small.png": ok(image_bytes(20, 20))})
    fetcher = ImageFetcher(settings(tmp_path))
    with pytest.raises(ImageError, match=r"has 100000000 pixels \(10000x10000\), over MAX_IMAGE_PIXELS=40000000"):
        fetcher.fetch(f"{srv.url}/bomb.png")
    # Past twice PIL's own limit, Image.open itself raises DecompressionBombError.
    with pytest.raises(ImageError, match="huge.png is too large to decode safely"):
        fetcher.fetch(f"{srv.url}/huge.png")
    with pytest.raises(ImageError, match="has 400 pixels"):
        ImageFetcher(settings(tmp_path, max_image_pixels=399)).fetch(f"{srv.url}/small.png")


@pytest.mark.parametrize("url", ["s3://bucket/a.png", "gs://bucket/a.png", "azure-blob://c/a.png",
                                 "file:///tmp/a.png", "ftp://host/a.png", "a.png"])
def test_unsupported_urls(tmp_path, url):
    with pytest.raises(ImageError, match="unsupported image URL") as err:
        ImageFetcher(settings(tmp_path, label_studio_url="http://ls:8080")).resolve(url)
    if url.startswith(("s3", "gs", "azure")):
        assert "must be served through Label Studio" in err.value.message


# -- cache and decoding ----------------------------------------------------------------------
def test_cache_hit_makes_no_request(serve, tmp_path):
    srv = serve({"/a.png": ok(image_bytes())})
    first = ImageFetcher(settings(tmp_path)).fetch(f"{srv.url}/a.png")
    again = ImageFetcher(settings(tmp_path)).fetch(f"{srv.url}/a.png")  # e.g. another process
    assert len(srv.requests) == 1
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert len(list(settings(tmp_path).image_cache_dir.iterdir())) == 1


def test_cache_evicts_oldest(serve, tmp_path):
    data = image_bytes()
    srv = serve({f"/{i}.png": ok(data) for i in range(10)})
    cfg = settings(tmp_path, image_cache_bytes=len(data) * 4)
    fetcher = ImageFetcher(cfg)
    for i in range(10):
        fetcher.fetch_bytes(f"{srv.url}/{i}.png")
    sizes = [p.stat().st_size for p in cfg.image_cache_dir.iterdir()]
    assert sum(sizes) <= cfg.image_cache_bytes and len(sizes) >= 2
    fetcher.fetch_bytes(f"{srv.url}/9.png")  # the newest survived
    assert len(srv.requests) == 10


def test_exif_orientation_and_rgb(serve, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    srv = serve({"/rot.jpg": ok(image_bytes(40, 20, fmt="JPEG", exif=exif.tobytes())),
                 "/rgba.png": ok(image_bytes(8, 6, mode="RGBA")),
                 "/p.png": ok(image_bytes(8, 6, mode="P")),
                 "/grey16.png": ok(_png16())})
    fetcher = ImageFetcher(settings(tmp_path))
    assert fetcher.fetch(f"{srv.url}/rot.jpg").size == (20, 40)
    for name in ("rgba.png", "p.png"):
        img = fetcher.fetch(f"{srv.url}/{name}")
        assert img.mode == "RGB" and img.size == (8, 6)
    grey = fetcher.fetch(f"{srv.url}/grey16.png")
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped


def _png16():
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(buf, "PNG")
    return buf.getvalue()

"""Fetch task images from Label Studio (or elsewhere), with auth, size limits and an on-disk cache.

Task data holds either a Label Studio path (``/data/upload/...``, ``/data/local-files/?d=...``,
``/tasks/<id>/resolve/?fileuri=...``) that needs Label Studio's URL and credentials, or an absolute
http(s) URL. Credentials go only to Label Studio's own origin, never to third-party hosts.
Any other origin may only reach public addresses unless IMAGE_URL_ALLOWLIST names it (SSRF protection,
checked on the resolved IP of every connection and redirect: ``url_guard``).
Every failure is an ``ImageError`` whose message names the URL and never contains the token.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from backend.errors import ImageError
from backend.labelstudio.url_guard import AddressRefused, GuardedAdapter, UrlGuard, parse_allowlist

log = logging.getLogger(__name__)

_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_REFRESH_MARGIN_S = 30.0  # re-exchange a PAT this long before its access token expires
_CHUNK = 64 * 1024
_MAX_REDIRECTS = 5
_CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure", "wasb", "wasbs", "abfs", "abfss")
_KEY_HINT = "check LABEL_STUDIO_API_KEY (Label Studio > Account & Settings > Access Token)"
_LEGACY_HINT = "; a legacy token also needs LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on the Label Studio side"


def _normalize_base(url: str | None) -> str:
    url = (url or "").strip().rstrip("/")
    if url and "://" not in url:
        url = "http://" + url  # /setup's hostname may come without a scheme
    return url


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ImageError(f"invalid port in image URL {url}") from None
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _jwt_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying the signature (we only need the timing)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


class LabelStudioAuth:
    """Authorization headers for Label Studio's own host.

    A legacy token is sent as ``Token <t>``. A personal access token (a JWT refresh token) is
    exchanged at ``/api/token/refresh/`` for a short-lived access token sent as ``Bearer``.
    """

    def __init__(self, base_url: str, token: str, timeout: float = 10.0):
        self.base_url = _normalize_base(base_url)
        token = (token or "").strip()
        for prefix in ("Token ", "Bearer "):  # tolerate a pasted header value
            if token.startswith(prefix):
                token = token[len(prefix):].strip()
        self._token = token
        self.has_token = bool(token)
        self.timeout = timeout
        self.is_pat = bool(_JWT.match(token))
        self._access: str | None = None
        self._access_exp: float | None = None
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        if not self._token:
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self._token}"}
        # One lock around check-and-exchange, so concurrent threads wait for one exchange.
        with self._lock:
            expiring = self._access_exp is not None and self._access_exp - time.time() <= _REFRESH_MARGIN_S
            if self._access is None or expiring:
                self._access = self._exchange()
                self._access_exp = _jwt_exp(self._access)
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access = None
            self._access_exp = None

    def _exchange(self) -> str:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            resp = requests.post(url, json={"refresh": self._token}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ImageError(f"could not reach Label Studio at {url} to exchange the personal access token: "
                             f"{type(exc).__name__}") from None
        if resp.status_code in (401, 403):
            raise ImageError(f"Label Studio rejected the personal access token at {url} (HTTP {resp.status_code}): "
                             f"it may be expired or revoked; {_KEY_HINT}")
        if resp.status_code != 200:
            raise ImageError(f"exchanging the personal access token at {url} returned HTTP {resp.status_code}")
        try:
            access = resp.json()["access"]
        except (ValueError, KeyError, TypeError):
            access = None
        if not isinstance(access, str) or not access:
            raise ImageError(f"{url} returned no access token")
        log.info("exchanged the personal access token for an access token at %s", url)
        return access


class ImageFetcher:
    def __init__(self, settings):
        self.settings = settings
        self._fallback_url = ""
        self._fallback_token = ""
        self._auth: LabelStudioAuth | None = None
        self._auth_key: tuple[str, str] = ("", "")
        self._lock = threading.Lock()
        self._local = threading.local()  # a requests.Session per thread: Session is not documented thread-safe
        self._written_since_check = 0
        # Parsed once (Settings.validate() has already refused a bad entry at startup).
        self._guard = UrlGuard(parse_allowlist(settings.image_url_allowlist), self._trusted_ls_origin)
        # Called with each ImageError fetch() raises, for the metrics (GET /metrics); must not raise.
        self.on_failure = None
        # PIL refuses images over its own process-wide limit inside Image.open; raise that limit to
        # ours so MAX_IMAGE_PIXELS is the setting that decides.
        if Image.MAX_IMAGE_PIXELS is not None and settings.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    # -- configuration ----------------------------------------------------------------------
    def set_fallback(self, hostname: str | None, access_token: str | None) -> None:
        with self._lock:
            self._fallback_url = _normalize_base(hostname)
            self._fallback_token = (access_token or "").strip()

    def _base_url(self) -> str:
        return _normalize_base(self.settings.label_studio_url) or self._fallback_url

    def _ls_origin(self) -> tuple[str, str, int | None] | None:
        base = self._base_url()
        try:
            return _origin(base) if base else None
        except ImageError:
            return None

    def _trusted_ls_origin(self) -> tuple[str, str, int | None] | None:
        """The origin exempt from the address check: LABEL_STUDIO_URL's, or /setup's hostname when Basic auth
        guards /setup (so Label Studio sent it). Without both, anyone reaching the backend could call /setup and
        name an internal host as "Label Studio"."""
        if self.settings.label_studio_url or self.settings.basic_auth:
            return self._ls_origin()
        return None

    def _is_ls(self, url: str) -> bool:
        origin = self._ls_origin()
        return origin is not None and _origin(url) == origin

    def _get_auth(self) -> LabelStudioAuth:
        base = self._base_url()
        # LABEL_STUDIO_API_KEY goes only to LABEL_STUDIO_URL, never to a host /setup named
        key = (self.settings.label_studio_api_key or "").strip() if self.settings.label_studio_url else ""
        token = key or self._fallback_token
        with self._lock:  # keep one auth (and its cached access token) per base URL + token
            if self._auth is None or self._auth_key != (base, token):
                self._auth = LabelStudioAuth(base, token, timeout=self.settings.image_timeout)
                self._auth_key = (base, token)
            return self._auth

    def _session(self) -> requests.Session:
        # A new session when Label Studio's address changes (/setup), so that no pooled connection made
        # under the old origin's exemption is reused for what is now a third-party URL.
        base = self._base_url()
        session = getattr(self._local, "session", None)
        if session is None or self._local.base != base:
            if session is not None:
                session.close()
            session = self._local.session = requests.Session()
            self._local.base = base
            # No environment proxies (a proxy would resolve the host itself, past the address check) and no
            # ~/.netrc credentials for arbitrary hosts.
            session.trust_env = False
            adapter = GuardedAdapter(self._guard)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        return session

    # -- URLs -------------------------------------------------------------------------------
    def resolve(self, url: str) -> tuple[str, bool]:
        url = (url or "").strip()
        base = self._base_url()
        try:  # task data is untrusted: an unparseable URL is this task's error, not the batch's
            url.encode("utf-8")
            urlsplit(url)
        except (ValueError, UnicodeError):
            raise ImageError(f"invalid image URL {url!r}") from None
        if url.startswith("//"):  # scheme-relative: an absolute URL on some host
            url = (urlsplit(base).scheme or "http") + ":" + url
        elif url.startswith("/"):
            if not base:
                raise ImageError(f"image URL {url} is relative to Label Studio, but Label Studio's address is "
                                 "unknown: set LABEL_STUDIO_URL")
            return base + url, True
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return url, self._is_ls(url)
        if scheme in _CLOUD_SCHEMES:
            raise ImageError(f"unsupported image URL {url}: cloud storage URLs must be served through Label Studio "
                             "(enable presigned URLs or proxying in the project's cloud storage settings)")
        if scheme == "file":
            raise ImageError(f"unsupported image URL {url}: local files must be served through Label Studio's "
                             "local storage (/data/local-files/?d=...)")
        raise ImageError(f"unsupported image URL {url!r}: only http and https are fetched; expected an http(s) URL "
                         "or a Label Studio path such as /data/upload/...")

    # -- download ---------------------------------------------------------------------------
    def fetch_bytes(self, url: str) -> bytes:
        absolute, with_auth = self.resolve(url)
        cached = self._cache_get(absolute)
        if cached is not None:
            return cached
        data = self._download(absolute, with_auth)
        self._cache_put(absolute, data)
        return data

    def _download(self, url: str, with_auth: bool) -> bytes:
        auth = self._get_auth() if with_auth else None
        resp, hop, auth = self._follow(url, auth)
        with resp:
            if resp.status_code != 200:
                message = f"image {hop} returned HTTP {resp.status_code}"
                if resp.status_code in (401, 403) and auth is not None:
                    if not auth.has_token:
                        message += ": Label Studio needs credentials, set LABEL_STUDIO_API_KEY"
                    else:
                        message += ": Label Studio refused the credentials, " + _KEY_HINT
                        message += "" if auth.is_pat else _LEGACY_HINT
                raise ImageError(message)
            return self._read_body(url, resp)

    def _follow(self, url: str, auth: LabelStudioAuth | None):
        """GET ``url``, following redirects here rather than in requests, so that every hop's scheme is
        checked (the connection checks its address) and Label Studio's token is sent only while the chain
        stays on Label Studio's origin: a redirect to presigned cloud storage never receives it.
        Returns the last response, its URL and the auth it was sent with."""
        hop, via = url, ""
        for _ in range(_MAX_REDIRECTS + 1):
            if auth is not None and not self._is_ls(hop):
                auth = None  # left Label Studio's origin: no token from here on, even if a hop comes back
            resp = self._get(hop, auth, via)
            # A PAT's access token can expire or be revoked early: exchange again once and retry.
            if resp.status_code == 401 and auth is not None and auth.is_pat:
                resp.close()
                auth.invalidate()
                resp = self._get(hop, auth, via)
            target = self._session().get_redirect_target(resp)
            if not target:
                return resp, hop, auth
            resp.close()
            nxt = urljoin(hop, target)
            if urlsplit(nxt).scheme.lower() not in ("http", "https"):
                raise ImageError(f"image {hop} redirected to {nxt}: refused, only http and https are fetched")
            hop, via = nxt, f" (redirected from {url})"
        raise ImageError(f"image {url} redirected more than {_MAX_REDIRECTS} times: refused")

    def _get(self, url: str, auth: LabelStudioAuth | None, via: str = "") -> requests.Response:
        headers = auth.headers() if auth is not None else {}
        try:
            return self._session().get(url, headers=headers, stream=True, timeout=self.settings.image_timeout,
                                       allow_redirects=False)
        except AddressRefused as exc:
            hint = ("set LABEL_STUDIO_URL (the address /setup sends is trusted only when Basic auth guards /setup)"
                    if self._is_ls(url) else "list it in IMAGE_URL_ALLOWLIST to allow it")
            raise ImageError(f"image URL {url}{via} resolves to {exc.address}, {exc.reason}: refused; {hint}") from None
        except requests.Timeout:
            raise ImageError(f"image {url} timed out after {self.settings.image_timeout} s") from None
        except requests.ConnectionError as exc:
            raise ImageError(f"image host {urlsplit(url).netloc} is unreachable (fetching {url}): "
                             f"{type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise ImageError(f"could not fetch image {url}: {type(exc).__name__}") from None

    def _read_body(self, url: str, resp: requests.Response) -> bytes:
        limit = self.settings.max_image_bytes
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageError(f"image {url} is {int(declared)} bytes, over MAX_IMAGE_BYTES={limit}")
        # `timeout` in requests bounds each read, not the whole body; enforce a total deadline too.
        deadline = time.monotonic() + self.settings.image_timeout
        body = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise ImageError(f"image {url} is over MAX_IMAGE_BYTES={limit} bytes (stopped after {len(body)})")
                if time.monotonic() > deadline:
                    raise ImageError(f"image {url} timed out after {self.settings.image_timeout} s")
        except requests.RequestException as exc:
            raise ImageError(f"download of image {url} failed: {type(exc).__name__}") from None
        return bytes(body)

    # -- decoding ---------------------------------------------------------------------------
    def fetch(self, url: str) -> Image.Image:
        try:
            data = self.fetch_bytes(url)
            try:
                return self._decode(url, data)
            except ImageError:
                self._cache_remove(self.resolve(url)[0])  # do not keep serving bytes that cannot be used
                raise
        except ImageError as exc:
            if self.on_failure is not None:
                try:
                    self.on_failure(exc)
                except Exception:  # counting a failure must never change what the caller sees
                    log.exception("image failure hook failed")
            raise

    def _decode(self, url: str, data: bytes) -> Image.Image:
        limit = self.settings.max_image_pixels
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = image.size
            if width * height > limit:
                raise ImageError(f"image {url} has {width * height} pixels ({width}x{height}), "
                                 f"over MAX_IMAGE_PIXELS={limit}")
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16/32-bit grey: convert("RGB") would clip it to white
                pixels = np.asarray(image, dtype=np.float64)
                if pixels.max(initial=0) > 255:
                    pixels = pixels / 256.0
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            return image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image {url} is too large to decode safely: {exc}") from None
        except ImageError:
            raise
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad data
            raise ImageError(f"could not decode image {url}: {exc}") from None

    # -- cache ------------------------------------------------------------------------------
    def _cache_path(self, absolute_url: str) -> Path:
        return Path(self.settings.image_cache_dir) / hashlib.sha256(absolute_url.encode()).hexdigest()

    def _cache_get(self, absolute_url: str) -> bytes | None:
        if self.settings.image_cache_bytes <= 0:
            return None
        path = self._cache_path(absolute_url)
        try:
            data = path.read_bytes()
            os.utime(path)  # mark as recently used, so eviction removes the least recently used
        except OSError:  # missing, or evicted by another process just now
            return None
        return data

    def _cache_put(self, absolute_url: str, data: bytes) -> None:
        cap = self.settings.image_cache_bytes
        if cap <= 0:
            return
        path = self._cache_path(absolute_url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Temp file + os.replace: other processes never see a half-written file.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # a cache failure must not fail the fetch
            log.warning("could not write the image cache %s: %s", path.parent, exc)
            return
        # Scanning the directory is O(files); do it once per ~5% of the cap written, which
        # bounds the overshoot to about that much.
        with self._lock:
            self._written_since_check += len(data)
            due = self._written_since_check >= max(cap // 20, 1)
            if due:
                self._written_since_check = 0
        if due:
            self._evict(path.parent, cap)

    def _cache_remove(self, absolute_url: str) -> None:
        self._cache_path(absolute_url).unlink(missing_ok=True)

    @staticmethod
    def _evict(directory: Path, cap: int) -> None:
        entries = []
        for entry in os.scandir(directory):
            try:
                stat = entry.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        if total <= cap:
            return
        target = int(cap * 0.9)  # leave headroom so the next writes do not evict again at once
        for _, size, path in sorted(entries):
            if total <= target:
                break
            try:
                os.unlink(path)
            except OSError:
                pass  # another process got there first
            total -= size
        log.info("image cache evicted down to %d bytes (cap %d)", total, cap)

"""SSRF protection of image downloads (backend/labelstudio/url_guard.py), against real HTTP servers on 127.0.0.1.

Outside Label Studio's origin an image URL may only reach public addresses unless IMAGE_URL_ALLOWLIST names it,
checked on the resolved IP, at the connection, on every redirect. ``socket.getaddrinfo`` is replaced only to
simulate DNS answers, and ``socket.socket.connect`` is wrapped only to record where connections go.
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import pytest

from backend.errors import ImageError
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.url_guard import Allowlist, refusal_reason
from backend.settings import Settings
from tests.conftest import ImageServer, png_bytes

TOKEN = "0123456789abcdef0123456789abcdef01234567"
PUBLIC = "93.184.215.14"  # a global address; connections to it are intercepted, never made


class Server(ImageServer):
    """ImageServer that also answers ``redirects[path] = location`` with a 302."""

    def __init__(self):
        super().__init__()
        self.redirects: dict[str, str] = {}
        handler = self.httpd.RequestHandlerClass
        server, serve_file = self, handler.do_GET

        def do_GET(request):
            if request.path in server.redirects:
                server.requests.append((request.path, dict(request.headers)))
                request.send_response(302)
                request.send_header("Location", server.redirects[request.path])
                request.send_header("Content-Length", "0")
                request.end_headers()
                return
            serve_file(request)

        handler.do_GET = do_GET

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]


@pytest.fixture
def servers():
    started = []

    def start():
        started.append(Server())
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture
def connects(monkeypatch):
    """Every socket connect's address made by the test's own thread (the fetcher fetches in it), in order: a
    thread an earlier test left behind (a Redis client, a server) may connect meanwhile, and is not the
    fetcher. Connections to PUBLIC are refused here (this machine is offline); all others go ahead for real."""
    seen = []
    real = socket.socket.connect
    owner = threading.get_ident()

    def connect(sock, address):
        if threading.get_ident() == owner:
            seen.append(address[0])
        if address[0] == PUBLIC:
            raise ConnectionRefusedError("intercepted by the test")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def dns(monkeypatch, name, *answers):
    """Make ``name`` resolve to ``answers[0]`` on the first lookup, ``answers[1]`` on the second, ... (the last
    one from then on); every other name resolves for real. Returns the list of lookups of ``name``."""
    real, lookups = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != name:
            return real(host, port, *args, **kwargs)
        ips = answers[min(len(lookups), len(answers) - 1)]
        lookups.append(ips)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips.split(",")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def fetcher(tmp_path, **kw) -> ImageFetcher:
    return ImageFetcher(Settings(model_dir=tmp_path, image_cache_bytes=0, image_timeout=5.0, **kw))


def refused(fetch, url, address, kind):
    with pytest.raises(ImageError) as err:
        fetch.fetch(url)
    message = err.value.message
    article = "an" if kind[0] in "aeiouI" else "a"
    assert f"resolves to {address}, {article} {kind} address: refused" in message, message
    assert "IMAGE_URL_ALLOWLIST" in message
    return message


# -- third-party loopback, and the allowlist ---------------------------------------------------------
def test_loopback_is_refused_when_it_is_not_label_studio(servers, tmp_path):
    srv = servers()
    url = srv.add("/x.png", png_bytes())
    message = refused(fetcher(tmp_path), url, "127.0.0.1", "loopback")
    assert message.startswith(f"image URL {url} resolves to 127.0.0.1")
    assert srv.requests == []


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8", "{port}", "localhost:{port}", "10.0.0.0/8, 127.0.0.1"])
def test_allowlist_lets_loopback_through(servers, tmp_path, entry):
    srv = servers()
    url = srv.add("/x.png", png_bytes())
    allow = entry.replace("{port}", str(srv.port)) if entry != "{port}" else f"127.0.0.1:{srv.port}"
    if entry.startswith("localhost"):
        url = url.replace("127.0.0.1", "localhost")
    assert fetcher(tmp_path, image_url_allowlist=allow).fetch(url).size == (64, 48)
    assert len(srv.requests) == 1


def test_allowlist_port_must_match(servers, tmp_path):
    srv = servers()
    url = srv.add("/x.png", png_bytes())
    refused(fetcher(tmp_path, image_url_allowlist=f"127.0.0.1:{srv.port + 1},other.host"), url, "127.0.0.1", "loopback")
    assert srv.requests == []


# -- Label Studio's own origin ------------------------------------------------------------------------
def test_label_studio_origin_is_fetched_with_its_token(servers, tmp_path):
    ls = servers()
    ls.add("/data/upload/1/a.png", png_bytes())
    configured = fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=TOKEN)
    assert configured.fetch("/data/upload/1/a.png").size == (64, 48)
    assert configured.fetch(ls.url + "/data/upload/1/a.png").size == (64, 48)  # absolute, same origin
    # no LABEL_STUDIO_URL: the hostname /setup sent, exempt when Basic auth guards /setup (tests/test_security.py
    # shows it refused without)
    from_setup = fetcher(tmp_path / "b", basic_auth_user="ls", basic_auth_pass="pw")
    from_setup.set_fallback(ls.url, TOKEN)
    assert from_setup.fetch("/data/upload/1/a.png").size == (64, 48)
    assert [h.get("Authorization") for _, h in ls.requests] == [f"Token {TOKEN}"] * 3


# -- resolved addresses, DNS rebinding, IP spellings --------------------------------------------------
def test_a_public_name_resolving_to_loopback_is_refused(servers, monkeypatch, tmp_path, connects):
    srv = servers()
    srv.add("/x.png", png_bytes())
    dns(monkeypatch, "images.example.com", "127.0.0.1")
    refused(fetcher(tmp_path), f"http://images.example.com:{srv.port}/x.png", "127.0.0.1", "loopback")
    assert srv.requests == [] and connects == []


def test_dns_rebinding_connects_only_to_the_checked_address(servers, monkeypatch, tmp_path, connects):
    srv = servers()
    srv.add("/x.png", png_bytes())
    url = f"http://rebind.example.com:{srv.port}/x.png"
    # Public at the first lookup, loopback after: one lookup per connection, and that answer is what is
    # connected to; a second lookup never happens between the check and the connect.
    lookups = dns(monkeypatch, "rebind.example.com", PUBLIC, "127.0.0.1")
    fetch = fetcher(tmp_path)
    with pytest.raises(ImageError, match="is unreachable"):
        fetch.fetch(url)
    assert lookups == [PUBLIC] and connects == [PUBLIC]
    refused(fetch, url, "127.0.0.1", "loopback")  # the next connection sees the new answer and refuses it
    assert connects == [PUBLIC] and srv.requests == []


def test_mixed_answers_connect_only_to_approved_addresses(servers, monkeypatch, tmp_path, connects):
    srv = servers()
    srv.add("/x.png", png_bytes())
    dns(monkeypatch, "mixed.example.com", f"127.0.0.1,169.254.169.254,{PUBLIC}")
    with pytest.raises(ImageError, match="is unreachable"):
        fetcher(tmp_path).fetch(f"http://mixed.example.com:{srv.port}/x.png")
    assert connects == [PUBLIC] and srv.requests == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "0177.0.0.1", "127.1"])
def test_other_spellings_of_loopback_are_refused(servers, tmp_path, host, connects):
    srv = servers()
    srv.add("/x.png", png_bytes())
    refused(fetcher(tmp_path), f"http://{host}:{srv.port}/x.png", "127.0.0.1", "loopback")
    assert srv.requests == [] and connects == []


@pytest.mark.parametrize("host, address, kind", [
    ("[::1]", "::1", "loopback"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1", "IPv4-mapped loopback"),
    ("0.0.0.0", "0.0.0.0", "unspecified"), ("10.1.2.3", "10.1.2.3", "private"),
    ("192.168.1.1", "192.168.1.1", "private"), ("172.16.0.1", "172.16.0.1", "private"),
    ("100.64.0.1", "100.64.0.1", "shared (carrier-grade NAT)"), ("[fd00::1]", "fd00::1", "private"),
    ("[fe80::1]", "fe80::1", "link-local"), ("224.0.0.1", "224.0.0.1", "multicast"),
    ("[64:ff9b::a9fe:a9fe]", "64:ff9b::a9fe:a9fe", "NAT64 link-local"),
])
def test_internal_addresses_are_refused_without_connecting(tmp_path, host, address, kind, connects):
    refused(fetcher(tmp_path), f"http://{host}:8080/x.png", address, kind)
    assert connects == []


def test_cloud_metadata_is_refused_without_any_network_call(tmp_path, connects):
    url = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    with pytest.raises(ImageError) as err:
        fetcher(tmp_path, label_studio_url="http://ls:8080", label_studio_api_key=TOKEN).fetch(url)
    assert err.value.message == (f"image URL {url} resolves to 169.254.169.254, a link-local address: refused; "
                                 "list it in IMAGE_URL_ALLOWLIST to allow it")
    assert connects == []


# -- redirects ------------------------------------------------------------------------------------------
def test_redirect_to_another_loopback_port_or_metadata_is_refused(servers, tmp_path, connects):
    allowed, other = servers(), servers()
    other.add("/secret.png", png_bytes())
    allowed.redirects["/a.png"] = other.url + "/secret.png"
    allowed.redirects["/b.png"] = "http://169.254.169.254/latest/meta-data/"
    fetch = fetcher(tmp_path, image_url_allowlist=f"127.0.0.1:{allowed.port}")
    message = refused(fetch, allowed.url + "/a.png", "127.0.0.1", "loopback")
    assert f"image URL {other.url}/secret.png (redirected from {allowed.url}/a.png)" in message
    refused(fetch, allowed.url + "/b.png", "169.254.169.254", "link-local")
    assert other.requests == [] and "169.254.169.254" not in connects


def test_redirects_are_followed_up_to_five(servers, tmp_path):
    srv = servers()
    srv.add("/end.png", png_bytes())
    for i in range(6):
        srv.redirects[f"/r{i}"] = f"/r{i + 1}" if i < 5 else "/end.png"
    fetch = fetcher(tmp_path, image_url_allowlist="127.0.0.1")
    assert fetch.fetch(srv.url + "/r1").size == (64, 48)  # five redirects: fine
    with pytest.raises(ImageError, match=rf"image {srv.url}/r0 redirected more than 5 times: refused"):
        fetch.fetch(srv.url + "/r0")


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "ftp://host/a.png"])
def test_redirect_to_another_scheme_is_refused(servers, tmp_path, location):
    srv = servers()
    srv.redirects["/a.png"] = location
    with pytest.raises(ImageError, match=f"redirected to {location}: refused, only http and https"):
        fetcher(tmp_path, image_url_allowlist="127.0.0.1").fetch(srv.url + "/a.png")


def test_label_studio_redirects_keep_the_token_at_home(servers, tmp_path):
    ls, storage = servers(), servers()
    storage.add("/bucket/a.png", png_bytes())
    ls.redirects["/data/upload/1/a.png"] = storage.url + "/bucket/a.png"  # e.g. presigned cloud storage
    ls.redirects["/data/upload/1/b.png"] = storage.url + "/bucket/a.png"
    fetch = fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=TOKEN,
                    image_url_allowlist=f"127.0.0.1:{storage.port}")  # storage stands for a public host
    assert fetch.fetch("/data/upload/1/a.png").size == (64, 48)
    assert ls.requests[0][1]["Authorization"] == f"Token {TOKEN}"
    assert "Authorization" not in storage.requests[0][1]
    # Without the allowlist entry, LS redirecting to an internal address that is not LS itself is refused,
    # and the message does not carry the token.
    strict = fetcher(tmp_path / "strict", label_studio_url=ls.url, label_studio_api_key=TOKEN)
    message = refused(strict, "/data/upload/1/b.png", "127.0.0.1", "loopback")
    assert TOKEN not in message and len(storage.requests) == 1


def test_token_is_not_sent_back_after_leaving_label_studio(servers, tmp_path):
    ls, other = servers(), servers()
    ls.add("/data/upload/1/a.png", png_bytes())
    ls.redirects["/data/upload/1/start.png"] = other.url + "/bounce"
    other.redirects["/bounce"] = ls.url + "/data/upload/1/a.png"
    fetch = fetcher(tmp_path, label_studio_url=ls.url, label_studio_api_key=TOKEN, image_url_allowlist="127.0.0.1")
    assert fetch.fetch("/data/upload/1/start.png").size == (64, 48)
    assert [h.get("Authorization") for _, h in ls.requests] == [f"Token {TOKEN}", None]
    assert "Authorization" not in other.requests[0][1]


# -- schemes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "ftp://host/a.png",
                                 "data:image/png;base64,iVBORw0KGgo=", "dict://127.0.0.1:11211/stat"])
def test_other_schemes_are_refused(tmp_path, url, connects):
    with pytest.raises(ImageError, match="unsupported image URL"):
        fetcher(tmp_path, image_url_allowlist="127.0.0.1").fetch(url)
    assert connects == []


# -- the pieces ------------------------------------------------------------------------------------------
def test_refusal_reasons():
    public = ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
    assert all(refusal_reason(ipaddress.ip_address(a)) is None for a in public)
    internal = ["127.0.0.1", "10.0.0.1", "172.31.255.255", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
                "255.255.255.255", "240.0.0.1", "239.1.2.3", "::", "::1", "fe80::1", "fd12::1", "fc00::1", "ff02::1",
                "fec0::1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "64:ff9b:1::1", "2002:7f00:1::1", "198.18.0.1"]
    assert all(refusal_reason(ipaddress.ip_address(a)) for a in internal)


def test_allowlist_parsing():
    allow = Allowlist("10.0.0.0/8:8080, images.internal, [fd00::/8]:443, ::1, 192.168.1.5, Cache.Local.:81")
    ip = ipaddress.ip_address
    assert allow.allows("x", 8080, ip("10.2.3.4")) and not allow.allows("x", 80, ip("10.2.3.4"))
    assert allow.allows("images.internal", 1234, ip("10.9.9.9")) and allow.allows("IMAGES.internal.", 80, ip("1.1.1.1"))
    assert allow.allows("x", 443, ip("fd00::5")) and not allow.allows("x", 80, ip("fd00::5"))
    assert allow.allows("x", 1, ip("::1")) and allow.allows("x", 1, ip("::ffff:192.168.1.5"))
    assert allow.allows("cache.local", 81, ip("10.0.0.1")) and not allow.allows("cache.local", 80, ip("10.0.0.1"))
    assert not Allowlist("") and not Allowlist(" , ")
    for bad in ["http://images.internal", "10.0.0.0/33", "host:99999", "host:x", "[::1", "[::1]x", "bad host", "a/b"]:
        with pytest.raises(ValueError, match="IMAGE_URL_ALLOWLIST entry"):
            Allowlist(bad)
    with pytest.raises(ValueError, match="IMAGE_URL_ALLOWLIST entry '10.0.0.0/33'"):
        Settings.from_env({"IMAGE_URL_ALLOWLIST": "127.0.0.1,10.0.0.0/33"})


# -- through the real route --------------------------------------------------------------------------------
def test_predict_with_a_third_party_loopback_image_gets_an_empty_result(servers, tmp_path):
    from tests.test_api import BoxAt, make_settings, predict_payload, serve
    from backend.api import create_app

    srv = servers()
    url = srv.add("/x.png", png_bytes())
    app = create_app(make_settings(tmp_path, image_url_allowlist=""))
    serve(app, BoxAt([0.0, 0.0, 5.0, 5.0], label=1, score=0.9))
    reply = app.test_client().post("/predict", json=predict_payload(url))
    assert reply.status_code == 200
    assert reply.get_json()["results"] == [{"result": [], "score": None, "model_version": "test-v1"}]
    assert srv.requests == []


# -- https: the checked IP is connected to, the certificate is still checked against the host name ----------
def _self_signed(tmp_path):
    """A certificate for DNS name ``localhost`` only (no IP address in it), and its key."""
    x509 = pytest.importorskip("cryptography.x509")
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_verifies_the_certificate_on_the_host_name(servers, monkeypatch, tmp_path, connects):
    import ssl

    cert, key = _self_signed(tmp_path)
    srv = servers()
    srv.add("/x.png", png_bytes())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv.httpd.socket = context.wrap_socket(srv.httpd.socket, server_side=True)
    dns(monkeypatch, "localhost", "127.0.0.1")  # one IPv4 answer, so `connects` is exact
    fetch = fetcher(tmp_path / "f", image_url_allowlist="127.0.0.1")
    fetch._session().verify = str(cert)  # trust the test's certificate (this thread's session)
    assert fetch.fetch(f"https://localhost:{srv.port}/x.png").size == (64, 48)
    assert connects and set(connects) == {"127.0.0.1"}  # only the checked address (a retry may connect again)
    # Same server, same address, but the URL's host is the IP: the certificate does not name it.
    with pytest.raises(ImageError, match="SSLError"):
        fetch.fetch(f"https://127.0.0.1:{srv.port}/y.png")
    assert [path for path, _ in srv.requests] == ["/x.png"]

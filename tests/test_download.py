"""`cvtlab data download` against an HTTP server started here on 127.0.0.1."""

import hashlib
import http.server
import os
import threading

import pytest

from cvtlab import CvtLabError
from cvtlab.data.download import download

from .conftest import run_cli_here

PAYLOAD = os.urandom(300_000)
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    requests: list = []
    break_after: int | None = None  # bytes to send before dropping the connection

    def do_GET(self):
        RangeHandler.requests.append(self.headers.get("Range"))
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if RangeHandler.break_after is not None:
            self.wfile.write(body[: RangeHandler.break_after])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.requests = []
    RangeHandler.break_after = None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/tiny-imagenet-200.zip"
    httpd.shutdown()


def test_download_verifies_checksum(server, tmp_path):
    dest = download(server, tmp_path / "t.zip", MD5)
    assert dest.read_bytes() == PAYLOAD
    assert RangeHandler.requests == [None]
    # A second call finds the verified file and fetches nothing.
    download(server, dest, MD5)
    assert RangeHandler.requests == [None]


def test_broken_transfer_resumes_where_it_stopped(server, tmp_path):
    dest = tmp_path / "t.zip"
    RangeHandler.break_after = 100_000
    with pytest.raises(CvtLabError, match="run the same command again to resume"):
        download(server, dest, MD5)
    part = tmp_path / "t.zip.part"
    assert part.stat().st_size == 100_000 and not dest.exists()
    RangeHandler.break_after = None
    download(server, dest, MD5)
    assert RangeHandler.requests[-1] == "bytes=100000-"
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_checksum_mismatch_removes_the_file(server, tmp_path):
    with pytest.raises(CvtLabError, match="checksum mismatch"):
        download(server, tmp_path / "t.zip", "0" * 32)
    assert not list(tmp_path.iterdir())


def test_offline_error_says_how_to_use_a_local_zip(tmp_path):
    r = run_cli_here(
        "data",
        "download",
        "--url",
        "http://127.0.0.1:9/tiny-imagenet-200.zip",
        "--out",
        str(tmp_path / "t.zip"),
    )
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "cannot be reached" in line and "--data PATH" in line


def test_missing_default_dataset_offers_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("CVTLAB_CACHE", str(tmp_path))
    r = run_cli_here("data", "info", "tiny-imagenet")
    assert r.returncode == 2 and "cvtlab data download" in r.stderr

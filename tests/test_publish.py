"""Hub publishing against a stand-in for the hub on a loopback port (the real hub is not reachable
here), with the output on the moto S3 server: the output is staged, the token reaches the hub, and
a failing answer that echoes the token never brings it into the error."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import pytest

from mils_pipeline.errors import PublishError
from mils_pipeline.io.publish import push_to_hub
from tests.conftest import BUCKET

TOKEN = "hf_mils_test_token_7Kq2Vd"
CARD = b"---\nconfigs: []\n---\n# captions\n"
PART = b"PAR1 stands in for a data part"

# huggingface_hub reads HF_ENDPOINT and the offline switches when it is imported (the suite runs offline),
# so the push runs in a process of its own with the environment a user would set.
PUSH = """
import json, sys
from mils_pipeline.errors import PublishError
from mils_pipeline.io.publish import push_to_hub
try:
    push_to_hub(sys.argv[1], "me/captions")
except PublishError as exc:
    print(json.dumps({"error": str(exc)}))
"""
# the calls the stand-in hub lets through; it refuses every other one
PASSING = frozenset({"/api/repos/create", "/api/validate-yaml"})


class HubRequest(NamedTuple):
    method: str
    path: str
    authorization: str | None
    body: bytes


class EchoingHub:
    """Answers as the hub does up to the upload (repo created, card valid), then refuses with 401
    and the request's Authorization header in its error text, as a broken proxy might."""

    def __init__(self) -> None:
        hub = self
        self.requests: list[HubRequest] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                authorization = self.headers.get("Authorization")
                hub.requests.append(HubRequest(self.command, self.path, authorization, body))
                if self.command == "POST" and self.path in PASSING:
                    status, answer = 200, {"url": f"{hub.url}/datasets/me/captions", "name": "me/captions"}
                else:
                    status, answer = 401, {"error": f"token rejected, request had Authorization: {authorization}"}
                content = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub() -> Iterator[EchoingHub]:
    server = EchoingHub()
    yield server
    server.close()


def test_push_without_a_token_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PublishError, match="export HF_TOKEN"):
        push_to_hub("memory://captions", "me/captions")


def test_push_stages_a_remote_output_and_a_failing_hub_never_gets_the_token_into_the_error(
    s3, s3_endpoint, hub, tmp_path
):
    s3.pipe(f"{BUCKET}/captions/README.md", CARD)
    s3.pipe(f"{BUCKET}/captions/data/part-a.parquet", PART)
    s3.pipe(f"{BUCKET}/captions/quarantine/part-a.parquet", b"PAR1 not published")
    s3.pipe(f"{BUCKET}/captions/_manifests/a.json", b"{}")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"), AWS_ENDPOINT_URL=s3_endpoint)
    push = subprocess.run(
        [sys.executable, "-c", PUSH, f"s3://{BUCKET}/captions"], capture_output=True, text=True, env=env, timeout=300
    )

    assert push.returncode == 0, push.stderr[-3000:]
    assert TOKEN not in push.stdout + push.stderr
    message = json.loads(push.stdout.strip().splitlines()[-1])["error"]
    assert "me/captions" in message and "401" in message
    assert "Authorization: Bearer ***" in message  # the hub echoed the token; the error shows it scrubbed

    upload = hub.requests[-1]
    assert upload.path == "/api/datasets/me/captions/preupload/main"
    assert upload.authorization == f"Bearer {TOKEN}"  # the token reached the call that failed
    staged = {f["path"]: base64.b64decode(f["sample"]) for f in json.loads(upload.body)["files"]}
    assert staged == {"README.md": CARD, "data/part-a.parquet": PART}  # card and data parts, from S3

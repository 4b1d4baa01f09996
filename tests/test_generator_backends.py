"""Generator backend settings that need no server: the API key stays secret, structured-output
shapes accept what they should, and missing pieces are clear errors. Servers and the real vLLM
engine are tested in tests/vllm/."""

from __future__ import annotations

import json
import re

import pytest

from mils_pipeline.config import RunConfig, load_config
from mils_pipeline.errors import ConfigError, ModelUnavailableError
from mils_pipeline.generate import CandidateList, build_generator
from mils_pipeline.generate.openai import public_url
from mils_pipeline.generate.parsing import parse_candidates
from mils_pipeline.generate.structured import caption_list_regex, caption_list_schema
from mils_pipeline.generate.vllm import resolve_model

SECRET = "sk-test-never-written-3f9a"


def test_api_key_from_the_config_is_never_dumped_nor_hashed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"generator:\n  backend: openai\n  base_url: http://127.0.0.1:9/v1\n  api_key: {SECRET}\n")
    config = load_config(path)
    assert config.generator.api_key.get_secret_value() == SECRET
    assert SECRET not in config.to_yaml()
    assert SECRET not in json.dumps(config.model_dump(mode="json"))  # what flows send as parameters
    assert SECRET not in repr(config) and SECRET not in config.model_dump_json()
    assert (
        config.config_sha256()
        == load_config(None, ["generator.backend=openai", "generator.base_url=http://127.0.0.1:9/v1"]).config_sha256()
    )


def test_server_location_and_tuning_do_not_change_the_dataset_version():
    base = load_config(None, ["generator.backend=openai"])
    moved = load_config(
        None,
        [
            "generator.backend=openai",
            "generator.base_url=http://fleet:8000/v1",
            "generator.max_concurrency=64",
            "generator.max_retries=1",
            "generator.request_timeout=30",
            "generator.retry_backoff=0.5",
        ],
    )
    assert moved.config_sha256() == base.config_sha256()
    vllm = load_config(None, ["generator.backend=vllm"])
    tuned = load_config(
        None, ["generator.backend=vllm", "generator.gpu_memory_utilization=0.5", "generator.tensor_parallel_size=2"]
    )
    assert tuned.config_sha256() == vllm.config_sha256()
    assert load_config(None, ["generator.structured_output=json"]).config_sha256() != RunConfig().config_sha256()


def test_openai_backend_without_a_url_says_where_to_set_it(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match=r"generator\.base_url.*OPENAI_BASE_URL"):
        build_generator(RunConfig.model_validate({"generator": {"backend": "openai"}}).generator)


def test_provenance_url_drops_credentials_and_query():
    assert public_url("https://user:pw@llm.example:8443/v1?key=abc") == "https://llm.example:8443/v1"


def test_vllm_model_that_is_a_gguf_or_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailableError, match="llamacpp"):
        resolve_model(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match=r"config\.json"):
        resolve_model(str(tmp_path / "empty"))


def test_vllm_hub_model_offline_and_not_cached_names_the_fix():
    with pytest.raises(ModelUnavailableError, match=r"not in the local hub cache.*generator\.model=DIR"):
        resolve_model("mils-test/not-in-the-cache")


def test_caption_list_regex_takes_n_short_caption_lines_only():
    pattern = caption_list_regex(CandidateList(3, 5))
    good = " a dog on a sofa\nthe red car, parked\nMary's 2 cats\n"
    assert re.fullmatch(pattern, good)
    assert parse_candidates(good, 5).candidates == ["a dog on a sofa", "the red car, parked", "Mary's 2 cats"]
    for bad in (
        "a dog\na cat\n",
        "1. a dog\na cat\na cow\n",
        "one two three four five six\na\nb\n",
        "117, 118\na\nb\n",
    ):
        assert not re.fullmatch(pattern, bad), bad


def test_caption_list_schema_pins_count_and_caption_shape():
    schema = caption_list_schema(CandidateList(4, 10))
    captions = schema["properties"]["captions"]
    assert captions["minItems"] == captions["maxItems"] == 4
    item = re.compile(captions["items"]["pattern"])
    assert item.fullmatch("a brown dog lying on a red couch")
    assert not item.fullmatch("101001") and not item.fullmatch('a "quoted" dog')
    reply = json.dumps({"captions": ["a dog", "a cat on a mat", "two birds", "a red car"]})
    assert parse_candidates(reply, 10).candidates == ["a dog", "a cat on a mat", "two birds", "a red car"]

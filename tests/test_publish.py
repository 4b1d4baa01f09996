"""Hub publishing, exercised up to the network boundary (the hub is unreachable here)."""

import pytest

from mils_pipeline.errors import PublishError
from mils_pipeline.io.publish import push_to_hub
from mils_pipeline.io.sink import write_bytes_whole


def test_push_without_a_token_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PublishError, match="export HF_TOKEN"):
        push_to_hub("memory://captions", "me/captions")


def test_push_stages_a_remote_output_and_fails_clearly_offline_without_leaking_the_token(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_bytes_whole("memory://captions/README.md", b"---\nconfigs: []\n---\n")
    write_bytes_whole("memory://captions/data/part-a.parquet", b"PAR1")
    token = "hf_secret_token_value_123"
    with pytest.raises(PublishError) as err:
        push_to_hub("memory://captions", "me/captions", token=token)
    message = str(err.value)
    assert "me/captions" in message and "OfflineModeIsEnabled" in message
    assert token not in message

import pytest

from mils_pipeline.config import RunConfig, describe_fields, load_config
from mils_pipeline.errors import ConfigError


def test_defaults_follow_the_paper_for_images():
    config = RunConfig()
    assert (config.optimize.top_k, config.optimize.new_per_round, config.optimize.max_rounds) == (50, 50, 10)
    assert config.generator.temperature == 0.5 and config.generator.top_p == 0.9
    assert config.optimize.max_caption_words == 10


def test_yaml_file_and_overrides_combine(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimize:\n  top_k: 7\n  max_rounds: 4\ngenerator:\n  temperature: 0.8\n")
    config = load_config(path, ["optimize.max_rounds=2", "output.include_media=true"])
    assert config.optimize.top_k == 7
    assert config.optimize.max_rounds == 2
    assert config.generator.temperature == 0.8
    assert config.output.include_media is True


def test_invalid_value_names_the_field_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optimize.top_k=0", "generator.prompt_style=poem"])
    message = str(err.value)
    assert "optimize.top_k" in message and "greater than or equal to 1" in message
    assert "generator.prompt_style" in message and "'completion' or 'chat'" in message


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match=r"optimize\.topk: unknown setting"):
        load_config(None, ["optimize.topk=3"])


def test_malformed_override_and_missing_file_are_clear():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optimize.top_k"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no-such-file.yaml")


def test_prompt_top_k_cannot_exceed_k():
    with pytest.raises(ConfigError, match="prompt_top_k"):
        load_config(None, ["optimize.top_k=5", "optimize.prompt_top_k=6"])


def test_hash_is_stable_and_ignores_execution_only_settings():
    base = load_config(None, [])
    assert base.config_sha256() == RunConfig().config_sha256()
    tuned = load_config(None, ["scorer.text_batch_size=7", "optimize.max_active_items=3", "scorer.device=cpu"])
    assert tuned.config_sha256() == base.config_sha256()
    changed = load_config(None, ["optimize.top_k=7"])
    assert changed.config_sha256() != base.config_sha256()


def test_yaml_round_trip_keeps_the_hash(tmp_path):
    config = load_config(None, ["optimize.top_k=9", "scorer.pretrained=null"])
    path = tmp_path / "dump.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path).config_sha256() == config.config_sha256()


def test_reference_lists_every_leaf_setting():
    keys = {key for key, _, _ in describe_fields()}
    assert {"optimize.top_k", "generator.model", "scorer.checkpoint", "output.include_media"} <= keys

import re
from pathlib import Path

import pytest
import yaml

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


def test_each_modality_takes_the_papers_defaults_for_what_is_left_out():
    audio = load_config(None, ["modality=audio"])
    assert (audio.optimize.top_k, audio.optimize.new_per_round, audio.optimize.max_rounds) == (10, 50, 19)
    assert audio.optimize.max_caption_words == 19 and audio.seed_pool.pool == "sounds"
    assert (audio.scorer.backend, audio.scorer.model) == ("clap", "laion/clap-htsat-unfused")
    video = load_config(None, ["modality=video"])
    assert (video.optimize.top_k, video.optimize.new_per_round, video.optimize.max_rounds) == (50, 50, 10)
    assert video.optimize.max_caption_words == 25 and video.seed_pool.pool == "video-scenes"
    assert video.scorer.backend == "open_clip" and video.scorer.frames == 8


def test_settings_given_win_over_modality_defaults_and_survive_a_yaml_round_trip(tmp_path):
    config = load_config(None, ["modality=audio", "optimize.top_k=4", "scorer.windows=2"])
    assert config.optimize.top_k == 4 and config.optimize.max_rounds == 19 and config.scorer.windows == 2
    path = tmp_path / "audio.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path).config_sha256() == config.config_sha256()


def test_extra_scorers_are_for_video_sound_tracks_only():
    video = load_config(None, ["modality=video", "extra_scorers=[{weight: 0.5}]"])
    extra = video.extra_scorers[0]
    assert (extra.media, extra.backend, extra.model, extra.weight) == ("audio", "clap", "laion/clap-htsat-unfused", 0.5)
    assert video.config_sha256() != load_config(None, ["modality=video"]).config_sha256()
    tuned = load_config(None, ["modality=video", "extra_scorers=[{weight: 0.5, text_batch_size: 8}]"])
    assert tuned.config_sha256() == video.config_sha256()  # execution-only settings stay out of the hash
    with pytest.raises(ConfigError, match="modality video only"):
        load_config(None, ["extra_scorers=[{weight: 0.5}]"])
    with pytest.raises(ConfigError, match="one scorer per media part"):
        load_config(None, ["modality=video", "extra_scorers=[{}, {}]"])
    with pytest.raises(ConfigError, match=r"scorer\.weight"):
        load_config(None, ["scorer.weight=0"])


def test_every_yaml_configuration_in_the_readme_is_valid():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.DOTALL)
    modalities = set()
    for block in blocks:
        config = RunConfig.model_validate(yaml.safe_load(block))
        modalities.add(config.modality)
    assert modalities == {"image", "video", "audio"}

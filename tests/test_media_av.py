"""Video and audio decoding on clips and sounds written by the tests."""

from __future__ import annotations

import numpy as np
import pytest

from mils_pipeline.errors import MediaDecodeError
from mils_pipeline.media import decode, pick_media
from mils_pipeline.media.audio import AudioSpec, cut_windows
from mils_pipeline.media.video import pick_times
from tests.av_media import CONTAINERS, audio_file, noise, tone, video_file

SPEC = AudioSpec(sample_rate=16000, window_seconds=1.0, windows=3)


def error_type(modality: str, data: bytes, **options) -> str:
    with pytest.raises(MediaDecodeError) as err:
        decode(modality, data, **options)
    assert str(err.value)
    return err.value.error_type


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_frames_are_sampled_uniformly_in_time_from_every_container(container):
    clip = decode("video", video_file(container, frames=40, fps=10), frames=8)
    assert len(clip.frames) == 8 and all(f.size == (64, 48) and f.mode == "RGB" for f in clip.frames)
    gaps = np.diff(clip.times)
    assert clip.times[0] < 0.5 and clip.times[-1] > 3.4
    assert gaps.max() - gaps.min() <= 0.11  # evenly spread, to a frame


def test_variable_frame_rate_is_sampled_by_time_not_by_frame_count():
    # a burst of frames at the start and at the end, one frame in the middle
    times = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 2.0, 3.8, 3.85, 3.9, 3.95, 4.0]
    clip = decode("video", video_file("mkv", frame_times=times), frames=3)
    assert [round(t, 2) for t in clip.times] == [0.25, 2.0, 3.8]


def test_a_short_clip_gives_every_frame_it_has():
    clip = decode("video", video_file("mp4", frames=3), frames=8)
    assert len(clip.frames) == 3


def test_rotation_metadata_turns_frames_upright():
    # The first frame's square touches the left edge of the stored 64x48 frame; a display rotation
    # of 90° counter-clockwise shows it 48x64 with the square at the bottom.
    clip = decode("video", video_file("mp4", frames=2, rotation=90), frames=1)
    frame = np.asarray(clip.frames[0]).astype(int)
    assert clip.frames[0].size == (48, 64)
    redness = frame[:, :, 0] - frame[:, :, 1]
    assert redness[48:, :].max() > 100 and redness[:44, :].max() < 60


def test_sound_track_is_decoded_only_when_asked_and_absent_when_silent():
    with_sound = video_file("webm", sound=tone(2.5))
    assert decode("video", with_sound, frames=2).audio is None
    clip = decode("video", with_sound, frames=2, audio=SPEC)
    assert len(clip.audio.windows) == 2 and clip.audio.seconds == pytest.approx(2.5, abs=0.1)
    assert decode("video", video_file("mp4"), frames=2, audio=SPEC).audio is None


def test_undecodable_videos_each_get_a_reason():
    mkv = video_file("mkv", frames=40)
    avi = video_file("avi", frames=40, sound=noise(4.0))
    assert error_type("video", b"") == "empty"
    assert error_type("video", b"plain words, not a video" * 20) == "not_a_video"
    assert error_type("video", video_file("mp4")[:-2000]) == "not_a_video"  # its index, at the end, is cut
    assert error_type("video", mkv[: len(mkv) // 2]) == "truncated"
    assert error_type("video", avi[: len(avi) // 2]) == "truncated"
    assert error_type("video", audio_file(tone(1.0), 16000)) == "no_video_stream"


def test_pick_times_spreads_over_the_span_and_never_repeats():
    assert pick_times([0, 10, 20, 30, 40, 50, 60, 70, 80, 90], 4) == [10, 30, 60, 80]
    assert pick_times([5, 5, 6], 4) == [5, 6]


def test_audio_is_mono_at_the_scorer_rate_in_windows_of_its_length():
    clip = decode("audio", audio_file(tone(4.0, rate=44100, channels=2), 44100), audio=SPEC)
    assert clip.sample_rate == 16000 and clip.seconds == pytest.approx(4.0, abs=0.01)
    assert len(clip.windows) == 3 and all(w.shape == (16000,) and w.dtype == np.float32 for w in clip.windows)
    # the 440 Hz tone survives resampling: its spectrum peaks at 440 Hz
    spectrum = np.abs(np.fft.rfft(clip.windows[1]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2


def test_flac_ogg_and_aac_in_mp4_decode_like_wav():
    for data in (
        audio_file(noise(2.0, rate=22050), 22050, "FLAC"),
        audio_file(tone(2.0, rate=32000), 32000, "OGG"),
        video_file("mp4", sound=tone(2.0)),  # an m4a is an mp4 with an AAC stream
    ):
        clip = decode("audio", data, audio=SPEC)
        assert clip.seconds == pytest.approx(2.0, abs=0.15) and len(clip.windows) == 2  # AAC adds priming


def test_a_clip_shorter_than_a_window_is_one_padded_window():
    clip = decode("audio", audio_file(tone(0.25), 16000), audio=SPEC)
    assert len(clip.windows) == 1 and clip.windows[0].shape == (16000,)
    assert np.abs(clip.windows[0][4000:]).max() == 0


def test_cut_windows_start_evenly_from_first_to_last_full_window():
    samples = np.arange(100, dtype=np.float32)
    windows = cut_windows(samples, 10, 3)
    assert [int(w[0]) for w in windows] == [0, 45, 90]


def test_undecodable_audio_each_get_a_reason():
    wav = audio_file(tone(2.0), 16000)
    assert error_type("audio", b"", audio=SPEC) == "empty"
    assert error_type("audio", b"plain words, no sound" * 5, audio=SPEC) == "not_audio"
    assert error_type("audio", wav[: len(wav) // 2], audio=SPEC) == "truncated"
    assert error_type("audio", b"fLaC" + bytes(range(256)) * 4, audio=SPEC) == "corrupt"
    assert error_type("audio", video_file("mp4"), audio=SPEC) == "no_audio_stream"


def test_video_and_audio_members_are_picked_by_extension():
    assert pick_media({"json": b"{}", "webm": b"W"}, "video") == ("webm", b"W")
    assert pick_media({"txt": b"", "flac": b"F"}, "audio") == ("flac", b"F")
    with pytest.raises(MediaDecodeError, match="expected one of wav, flac, mp3, ogg, m4a"):
        pick_media({"mp4": b"V"}, "audio")

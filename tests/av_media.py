"""Video and audio made in the tests: PyAV-written clips (with and without a sound track), tones
and noise through soundfile. Small sizes, fixed seeds."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

CONTAINERS = {
    "mp4": ("mp4", "libx264", "aac"),
    "webm": ("webm", "libvpx-vp9", "libopus"),
    "mkv": ("matroska", "libx264", "aac"),
    "avi": ("avi", "mpeg4", "mp3"),
}


def moving_square(index: int, width: int = 64, height: int = 48, color=(255, 40, 40)) -> np.ndarray:
    """An RGB frame: a coloured square that moves right as ``index`` grows, on grey."""
    frame = np.full((height, width, 3), 90, dtype=np.uint8)
    x = (index * 4) % (width - 16)
    frame[16:32, x : x + 16] = color
    return frame


def tone(seconds: float, rate: int = 16000, frequency: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave


def noise(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def audio_file(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    """WAV / FLAC / OGG bytes through soundfile."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def video_file(
    container: str = "mp4",
    frames: int = 20,
    fps: int = 10,
    sound: np.ndarray | None = None,
    sound_rate: int = 16000,
    rotation: int | None = None,
    frame_times: list[float] | None = None,
    color=(255, 40, 40),
) -> bytes:
    """A clip of a moving square, optionally with a sound track and a display rotation.
    ``frame_times`` (seconds) gives a variable frame rate."""
    import av

    fmt, video_codec, audio_codec = CONTAINERS[container]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(video_codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        audio = (
            out.add_stream(audio_codec, rate=48000 if audio_codec == "libopus" else sound_rate)
            if sound is not None
            else None
        )
        for i in range(frames if frame_times is None else len(frame_times)):
            frame = av.VideoFrame.from_ndarray(moving_square(i, color=color), format="rgb24")
            if frame_times is not None:
                frame.pts = round(frame_times[i] * 1000)
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if audio is not None:
            _encode_sound(out, audio, sound, sound_rate)
    return buffer.getvalue()


def _encode_sound(out, audio, sound: np.ndarray, rate: int) -> None:
    import av

    chunk = 1024  # PyAV's encoder regroups and resamples frames to what the codec needs
    for start in range(0, sound.size, chunk):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(sound[None, start : start + chunk], dtype=np.float32), format="flt", layout="mono"
        )
        frame.sample_rate = rate
        for packet in audio.encode(frame):
            out.mux(packet)
    for packet in audio.encode():
        out.mux(packet)

"""Audio bytes -> mono float32 waveform at the scorer's sample rate, cut into the scorer's windows.

libsndfile (through soundfile) reads WAV, FLAC, OGG and MP3; anything else (M4A/AAC, the sound
track of a video) goes through FFmpeg (PyAV). Resampling is FFmpeg's (swresample) either way.
Decoding and windowing run in the prefetch thread, ahead of the scorer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from mils_pipeline.errors import ConfigError, MediaDecodeError

# A longer clip is refused before it is decoded: an hour at 48 kHz is already 690 MB of samples.
MAX_SECONDS = 3600


@dataclass(frozen=True)
class AudioSpec:
    """What a scorer wants: the sample rate, its window length, and how many windows per clip."""

    sample_rate: int
    window_seconds: float
    windows: int


@dataclass
class AudioClip:
    """A decoded clip: ``windows`` are float32 arrays of exactly the scorer's window length."""

    windows: list[np.ndarray]
    sample_rate: int
    seconds: float


def require_decoders() -> None:
    """Fail the run, not each sample, when the decoding packages are not installed."""
    try:
        import av  # noqa: F401
        import soundfile  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"decoding audio needs soundfile and av: pip install 'mils-pipeline[audio]' ({exc})") from exc


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono float32 ``samples`` at ``rate`` -> at ``target`` (FFmpeg's swresample)."""
    if rate == target or samples.size == 0:
        return samples.astype(np.float32, copy=False)
    import av

    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(samples[None, :], dtype=np.float32), format="flt", layout="mono"
    )
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    parts = [f.to_ndarray()[0] for f in [*resampler.resample(frame), *resampler.resample(None)]]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def _wav_shortfall(data: bytes) -> int:
    """Bytes missing from a RIFF/WAVE file's data chunk (0 when whole, or not a WAV): libsndfile
    silently reads what is there, so a cut-off WAV is caught here."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF):  # written by a stream that did not know its length
                return 0
            return max(0, size - (len(data) - offset - 8))
        offset += 8 + size + (size & 1)
    return 0


def _read_soundfile(data: bytes) -> tuple[np.ndarray, int] | None:
    """(mono samples, rate) through libsndfile, or None when libsndfile does not know the format."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as fh:
            if fh.frames > MAX_SECONDS * fh.samplerate:
                raise MediaDecodeError(
                    "too_long", f"the clip lasts {fh.frames / fh.samplerate:.0f} s, above the {MAX_SECONDS} s limit"
                )
            samples = fh.read(dtype="float32", always_2d=True)
            rate = fh.samplerate
    except soundfile.LibsndfileError as exc:
        if "Format not recognised" in str(exc) or "unknown format" in str(exc).lower():
            return None
        raise MediaDecodeError("corrupt", f"audio data is corrupt or truncated: {exc}") from exc
    except RuntimeError as exc:  # older libsndfile bindings raise RuntimeError
        raise MediaDecodeError("corrupt", f"audio data is corrupt or truncated: {exc}") from exc
    if samples.shape[0] == 0:
        raise MediaDecodeError("corrupt", "no audio samples could be read (the data is corrupt or cut off)")
    missing = _wav_shortfall(data)
    if missing:
        raise MediaDecodeError(
            "truncated", f"the WAV data breaks off after {samples.shape[0] / rate:.2f} s ({missing} bytes missing)"
        )
    return samples.mean(axis=1), rate


def read_audio_stream(container, target_rate: int) -> np.ndarray | None:
    """The first audio stream of an open PyAV container as mono float32 at ``target_rate``;
    None when there is no audio stream."""
    import av

    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    parts: list[np.ndarray] = []
    limit = MAX_SECONDS * target_rate
    total = 0
    try:
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray()[0])
                total += parts[-1].size
            if total > limit:
                raise MediaDecodeError("too_long", f"the sound track lasts over the {MAX_SECONDS} s limit")
    except av.error.FFmpegError as exc:
        raise MediaDecodeError(
            "truncated", f"the sound track breaks off after {total / target_rate:.2f} s: {exc}"
        ) from exc
    parts.extend(out.to_ndarray()[0] for out in resampler.resample(None))
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def _read_pyav(data: bytes, target_rate: int) -> np.ndarray:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as exc:
        raise MediaDecodeError("not_audio", f"not a readable audio file: {exc}") from exc
    with container:
        samples = read_audio_stream(container, target_rate)
    if samples is None:
        raise MediaDecodeError("no_audio_stream", "the file holds no audio stream")
    return samples


def cut_windows(samples: np.ndarray, window: int, count: int) -> list[np.ndarray]:
    """``count`` windows of ``window`` samples spread evenly over the clip (their starts evenly
    spaced from the first sample to the last full window). A clip shorter than one window is one
    window, zero-padded; a clip with room for fewer windows than asked gives fewer, overlapping none."""
    if samples.size <= window:
        return [np.pad(samples, (0, window - samples.size))]
    count = max(1, min(count, samples.size // window))
    starts = np.linspace(0, samples.size - window, count).round().astype(int)
    return [samples[s : s + window].copy() for s in starts]


def decode_audio(data: bytes, audio: AudioSpec) -> AudioClip:
    """Audio bytes -> the windows ``audio`` asks for. Every failure is a MediaDecodeError."""
    require_decoders()
    if not data:
        raise MediaDecodeError("empty", "the audio member has zero bytes")
    read = _read_soundfile(data)
    if read is None:
        samples = _read_pyav(data, audio.sample_rate)
    else:
        samples = resample(read[0], read[1], audio.sample_rate)
    return clip_from_samples(samples, audio)


def clip_from_samples(samples: np.ndarray, spec: AudioSpec) -> AudioClip:
    if samples.size == 0:
        raise MediaDecodeError("empty", "the audio holds no samples")
    if not np.isfinite(samples).all():
        raise MediaDecodeError("corrupt", "the audio holds samples that are not finite numbers")
    window = max(1, round(spec.window_seconds * spec.sample_rate))
    return AudioClip(
        windows=cut_windows(samples, window, spec.windows),
        sample_rate=spec.sample_rate,
        seconds=samples.size / spec.sample_rate,
    )

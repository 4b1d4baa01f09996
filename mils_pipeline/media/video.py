"""Video bytes -> F frames sampled uniformly in time over the clip (RGB, display orientation), and,
when a scorer of the sound track asks for it, the clip's audio.

Two passes over the bytes in memory: the first only demuxes (no decoding) to learn every frame's
timestamp, so variable frame rates and containers without a frame count or duration sample
correctly; the second decodes and keeps only the chosen frames. Rotation metadata (a display
matrix, as phones write) is applied. A clip whose data breaks off partway is quarantined as
``truncated`` rather than captioned from the part before the break.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from mils_pipeline.errors import ConfigError, MediaDecodeError
from mils_pipeline.media.audio import AudioClip, AudioSpec, clip_from_samples, read_audio_stream

# Refused before decoding: a frame this large, or a clip this long, is not a corpus clip.
MAX_PIXELS = 8192 * 8192
MAX_FRAMES = 500_000


@dataclass
class VideoClip:
    frames: list[Any]  # PIL images, in time order
    times: list[float]  # seconds from the start of the stream, one per frame
    audio: AudioClip | None = None  # the sound track, when asked for and present


def require_decoders() -> None:
    try:
        import av  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"decoding video needs av (PyAV): pip install 'mils-pipeline[video]' ({exc})") from exc


def pick_times(timestamps: list[int], count: int) -> list[int]:
    """``count`` frame timestamps spread uniformly in time: the frame nearest to the middle of
    each of ``count`` equal spans of the clip. Fewer when the clip has fewer distinct frames."""
    stamps = np.unique(np.asarray(timestamps, dtype=np.int64))
    if stamps.size <= count:
        return stamps.tolist()
    first, last = stamps[0], stamps[-1]
    targets = first + (np.arange(count) + 0.5) * (last - first) / count
    nearest = np.abs(stamps[None, :] - targets[:, None]).argmin(axis=1)
    return np.unique(stamps[nearest]).tolist()


def _open(data: bytes):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        raise MediaDecodeError(
            "not_a_video", f"not a readable video file (or cut off before its index): {exc}"
        ) from exc


def _packet_times(data: bytes) -> list[int]:
    import av

    with _open(data) as container:
        if not container.streams.video:
            raise MediaDecodeError("no_video_stream", "the file holds no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height > MAX_PIXELS:
            raise MediaDecodeError(
                "too_large",
                f"frames of {stream.codec_context.width}x{stream.codec_context.height} pixels exceed the limit",
            )
        stamps: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream marker
                stamp = packet.pts if packet.pts is not None else packet.dts
                stamps.append(stamp if stamp is not None else len(stamps))
                if len(stamps) > MAX_FRAMES:
                    raise MediaDecodeError("too_long", f"the clip has more than {MAX_FRAMES} frames")
        except av.error.FFmpegError as exc:
            raise MediaDecodeError("truncated", f"the video data breaks off after {len(stamps)} frames: {exc}") from exc
        declared_seconds = _declared_seconds(container, stream)
        declared_frames = stream.frames
        time_base = stream.time_base
    if not stamps:
        if declared_frames or declared_seconds:
            raise MediaDecodeError("truncated", "the video data breaks off before its first frame")
        raise MediaDecodeError("empty", "the video stream holds no frames")
    if declared_frames and len(stamps) < 0.8 * declared_frames - 1:
        raise MediaDecodeError(
            "truncated", f"the video data breaks off after {len(stamps)} of the {declared_frames} frames it declares"
        )
    if declared_seconds is not None and time_base is not None:
        declared = declared_seconds
        seen = float((max(stamps) - min(stamps)) * time_base)
        # Streaming containers (WebM, Matroska, AVI) cut short just end early; their header still
        # says how long the clip was.
        if seen < declared - max(1.0, 0.2 * declared):
            raise MediaDecodeError(
                "truncated", f"the video data breaks off at {seen:.2f} s of a clip declared {declared:.2f} s long"
            )
    return stamps


def _declared_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _to_image(frame):
    image = frame.to_image()
    rotation = frame.rotation  # degrees counter-clockwise, from the display matrix
    if rotation % 360:
        image = image.rotate(rotation, expand=True)
    return image


def _decode_frames(data: bytes, wanted: list[int]) -> tuple[list[Any], list[float]]:
    import av

    remaining = set(wanted)
    frames: list[Any] = []
    times: list[float] = []
    fallback = None  # frames whose decoded pts differ from the packets' (rare codecs): keep them in order
    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                stamp = frame.pts if frame.pts is not None else index
                if stamp in remaining:
                    remaining.discard(stamp)
                    frames.append(_to_image(frame))
                    times.append(float(frame.time or 0.0))
                    if not remaining:
                        break
                elif fallback is None:
                    fallback = frame
        except av.error.FFmpegError as exc:
            raise MediaDecodeError("corrupt", f"a video frame could not be decoded: {exc}") from exc
    if not frames:
        if fallback is None:
            raise MediaDecodeError("corrupt", "no video frame could be decoded")
        frames, times = [_to_image(fallback)], [float(fallback.time or 0.0)]
    return frames, times


def _sound_track(data: bytes, spec: AudioSpec) -> AudioClip | None:
    with _open(data) as container:
        samples = read_audio_stream(container, spec.sample_rate)
    if samples is None or samples.size == 0:
        return None
    return clip_from_samples(samples, spec)


def decode_video(data: bytes, frames: int = 8, audio: AudioSpec | None = None) -> VideoClip:
    """Video bytes -> ``frames`` frames uniformly over the clip, plus the sound track (as the audio
    scorer's windows) when ``audio`` is given. Every failure is a MediaDecodeError."""
    require_decoders()
    if not data:
        raise MediaDecodeError("empty", "the video member has zero bytes")
    wanted = pick_times(_packet_times(data), frames)
    images, times = _decode_frames(data, wanted)
    return VideoClip(frames=images, times=times, audio=_sound_track(data, audio) if audio is not None else None)

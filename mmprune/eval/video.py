"""Uniform frame sampling from video files: decord where it imports, PyAV otherwise.

Frames are taken at ``np.linspace(0, total - 1, num_frames).astype(int)`` — the indices lmms-eval's
video loaders use — so a clip shorter than ``num_frames`` repeats frames and the output always has
exactly ``num_frames`` of them. Any problem with the file (missing, empty, not a video, no frames,
decoder error) raises :class:`VideoReadError` with a one-line reason, which the runner records as a
failed sample before going on.

Example:
    >>> frames = read_frames("clip.mp4", 8)  # doctest: +SKIP
    >>> frames.shape, frames.dtype  # doctest: +SKIP
    ((8, 360, 640, 3), dtype('uint8'))
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

__all__ = ["VideoReadError", "VideoClip", "read_frames", "read_video", "available_backends", "sample_indices"]

BACKENDS = ("auto", "decord", "pyav")


class VideoReadError(ValueError):
    """A video could not be read; ``str(err)`` is one line naming the file and the reason.

    Example:
        >>> try:
        ...     read_frames("/nonexistent.mp4", 4)
        ... except VideoReadError as e:
        ...     print(e)
        video not found: /nonexistent.mp4
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message  # the decoder's own words, without the file name


@dataclass
class VideoClip:
    """Frames sampled from one video, with where they came from.

    ``frames`` is ``[T, H, W, 3]`` uint8 RGB, ``indices`` the frame numbers taken, ``fps`` the stream's
    average frame rate (0.0 if unknown), ``total_frames`` the frame count, ``backend`` "decord" or "pyav".

    Example:
        >>> clip = read_video("clip.mp4", 4)  # doctest: +SKIP
        >>> clip.indices.tolist(), clip.backend  # doctest: +SKIP
        ([0, 3, 6, 9], 'decord')
    """

    frames: np.ndarray
    indices: np.ndarray
    fps: float
    total_frames: int
    backend: str

    @property
    def timestamps(self) -> np.ndarray:
        """Seconds of each sampled frame (``indices / fps``; zeros when the rate is unknown)."""
        return self.indices / self.fps if self.fps > 0 else np.zeros(len(self.indices))


def _have_decord() -> bool:
    # Checked on every call (the import is cached by Python) so that a test can hide decord.
    try:
        import decord  # noqa: F401
    except Exception:
        return False
    return True


def _have_pyav() -> bool:
    try:
        import av  # noqa: F401
    except Exception:
        return False
    return True


def available_backends() -> list[str]:
    """The decoders importable here, in the order "auto" tries them.

    Example:
        >>> set(available_backends()) <= {"decord", "pyav"}
        True
    """
    return [name for name, ok in (("decord", _have_decord()), ("pyav", _have_pyav())) if ok]


def sample_indices(total: int, num_frames: int | None) -> np.ndarray:
    """Uniform frame indices: ``linspace(0, total - 1, num_frames)`` truncated to int (lmms-eval's rule).

    ``num_frames`` of None or <= 0 means every frame.

    Example:
        >>> sample_indices(10, 4).tolist()
        [0, 3, 6, 9]
        >>> sample_indices(3, 5).tolist()
        [0, 0, 1, 1, 2]
    """
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    if num_frames is None or num_frames <= 0:
        return np.arange(total, dtype=np.int64)
    return np.linspace(0, total - 1, int(num_frames)).astype(np.int64)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoReadError(f"video not found: {path}")
    if os.path.isdir(path):
        raise VideoReadError(f"video path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"video file is empty (0 bytes): {path}")


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split()) or type(err).__name__
    # decord prefixes its messages with "[hh:mm:ss] /src/file.cc:151: "; the reason is what follows.
    msg = re.sub(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", msg)
    return msg[:300]


def _read_decord(path: str, num_frames: int | None) -> VideoClip:
    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total = len(vr)
        if total <= 0:
            raise VideoReadError(f"video has no frames: {path}", "no frames")
        idx = sample_indices(total, num_frames)
        frames = vr.get_batch(idx.tolist()).asnumpy()
        fps = float(vr.get_avg_fps() or 0.0)
    except VideoReadError:
        raise
    except Exception as e:  # decord raises its own DECORDError (a RuntimeError) and others
        reason = _one_line(e)
        raise VideoReadError(f"cannot decode video {path} (decord): {reason}", reason) from None
    return VideoClip(np.ascontiguousarray(frames, dtype=np.uint8), idx, fps, total, "decord")


def _read_pyav(path: str, num_frames: int | None) -> VideoClip:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoReadError(f"no video stream in {path}", "no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0.0)
            total = int(stream.frames or 0)
            if total <= 0:
                # Some containers do not store a frame count: count the packets (one per frame).
                total = sum(1 for p in container.demux(stream) if p.size > 0)
                container.seek(0)
            if total <= 0:
                raise VideoReadError(f"video has no frames: {path}", "no frames")
            idx = sample_indices(total, num_frames)
            wanted: dict[int, np.ndarray] = {}
            need = set(idx.tolist())
            last = None
            for n, frame in enumerate(container.decode(stream)):
                if n in need:
                    wanted[n] = frame.to_ndarray(format="rgb24")
                    last = wanted[n]
                    if len(wanted) == len(need):
                        break
                elif n > max(need):
                    break
    except VideoReadError:
        raise
    except Exception as e:
        reason = _one_line(e)
        raise VideoReadError(f"cannot decode video {path} (pyav): {reason}", reason) from None
    if not wanted:
        raise VideoReadError(f"video has no decodable frames: {path}", "no decodable frames")
    # A stored frame count can exceed what decodes; indices past the end take the last decoded frame.
    frames = np.stack([wanted.get(i, last) for i in idx.tolist()])
    return VideoClip(frames.astype(np.uint8, copy=False), idx, fps, total, "pyav")


def read_video(path: str | os.PathLike, num_frames: int | None, backend: str = "auto") -> VideoClip:
    """Read ``num_frames`` uniformly spaced RGB frames plus their indices and the frame rate.

    ``backend``: "decord", "pyav", or "auto": decord if importable, else PyAV; and when decord cannot
    decode a file (it has bugs, e.g. with some frame widths that are not a multiple of 32), PyAV gets
    a second try before the sample is given up.

    Example:
        >>> read_video("clip.mp4", 8, backend="pyav").frames.shape  # doctest: +SKIP
        (8, 360, 640, 3)
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    path = os.fspath(path)
    _check_file(path)
    if backend == "decord":
        if not _have_decord():
            raise VideoReadError("decord is not installed: pip install decord, or use backend='pyav'")
        return _read_decord(path, num_frames)
    if backend == "pyav":
        if not _have_pyav():
            raise VideoReadError("PyAV is not installed: pip install av, or use backend='decord'")
        return _read_pyav(path, num_frames)
    readers = [(n, r) for n, ok, r in (("decord", _have_decord(), _read_decord), ("pyav", _have_pyav(), _read_pyav)) if ok]
    if not readers:
        raise VideoReadError("no video decoder installed: pip install decord (or av)")
    errors: list[tuple[str, VideoReadError]] = []
    for name, reader in readers:
        try:
            return reader(path, num_frames)
        except VideoReadError as e:
            errors.append((name, e))
    if len(errors) == 1:
        raise errors[0][1]
    why = "; ".join(f"{n}: {e.reason}" for n, e in errors)
    raise VideoReadError(f"cannot decode video {path} ({why})", why)


def read_frames(path: str | os.PathLike, num_frames: int | None, backend: str = "auto") -> np.ndarray:
    """``[num_frames, H, W, 3]`` uint8 RGB frames sampled uniformly from a video file.

    Raises :class:`VideoReadError` (a ``ValueError``) with a one-line reason when the file is missing,
    empty, corrupt or has no frames.

    Example:
        >>> read_frames("clip.mp4", 8).shape  # doctest: +SKIP
        (8, 360, 640, 3)
    """
    return read_video(path, num_frames, backend).frames

"""Frame reading with decord and PyAV on small mp4 files written here with PyAV."""

from __future__ import annotations

import sys

import numpy as np
import pytest

av = pytest.importorskip("av")

from mmprune.eval import video as V  # noqa: E402

LEVELS = [20 * i for i in range(12)]  # frame i is a flat grey of level 20*i


def write_mp4(path, levels=LEVELS, size=32, fps=10):
    """An H.264 mp4 whose frame i is a flat grey of ``levels[i]`` (easy to tell frames apart)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for lv in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), lv, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("vid") / "abc123.mp4")


def _levels(frames):
    return frames.reshape(len(frames), -1).mean(axis=1)


def test_sample_indices_are_lmms_eval_linspace():
    # linspace(0, 11, 4) = 0, 3.67, 7.33, 11 -> truncated
    assert V.sample_indices(12, 4).tolist() == [0, 3, 7, 11]
    assert V.sample_indices(3, 5).tolist() == [0, 0, 1, 1, 2]
    assert V.sample_indices(4, None).tolist() == [0, 1, 2, 3]
    assert V.sample_indices(0, 4).tolist() == []


BACKENDS = ["pyav"] + (["decord"] if "decord" in V.available_backends() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_frames_uniform(clip, backend):
    frames = V.read_frames(clip, 4, backend=backend)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    # frames 0, 3, 7, 11 -> levels 0, 60, 140, 220 (codec rounding: a few levels)
    np.testing.assert_allclose(_levels(frames), [0, 60, 140, 220], atol=4)
    v = V.read_video(clip, 4, backend=backend)
    assert v.indices.tolist() == [0, 3, 7, 11] and v.total_frames == 12 and v.backend == backend
    assert v.fps == pytest.approx(10.0)
    np.testing.assert_allclose(v.timestamps, [0.0, 0.3, 0.7, 1.1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_frames_than_the_clip_repeats(tmp_path, backend):
    path = write_mp4(tmp_path / "short.mp4", levels=[0, 100, 200])
    frames = V.read_frames(path, 5, backend=backend)
    np.testing.assert_allclose(_levels(frames), [0, 0, 100, 100, 200], atol=4)
    assert len(V.read_frames(path, None, backend=backend)) == 3


def test_backends_agree(clip):
    if "decord" not in V.available_backends():
        pytest.skip("decord not installed")
    a = V.read_frames(clip, 6, backend="decord").astype(int)
    b = V.read_frames(clip, 6, backend="pyav").astype(int)
    assert np.abs(a - b).max() <= 3


def test_auto_prefers_decord_and_falls_back_to_pyav(clip, monkeypatch):
    if "decord" in V.available_backends():
        assert V.read_video(clip, 2).backend == "decord"
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    assert V.available_backends() == ["pyav"]
    v = V.read_video(clip, 4)
    assert v.backend == "pyav"
    np.testing.assert_allclose(_levels(v.frames), [0, 60, 140, 220], atol=4)
    with pytest.raises(V.VideoReadError, match="decord is not installed"):
        V.read_frames(clip, 4, backend="decord")


def test_auto_retries_with_pyav_when_decord_cannot_decode(tmp_path):
    # decord 0.6 fails on some frame widths that are not a multiple of 32 (16 px here); PyAV reads them.
    path = write_mp4(tmp_path / "w16.mp4", levels=[0, 100, 200], size=16)
    if "decord" in V.available_backends():
        with pytest.raises(V.VideoReadError, match=r"\(decord\)"):
            V.read_frames(path, 3, backend="decord")
    v = V.read_video(path, 3)
    assert v.backend == "pyav"
    np.testing.assert_allclose(_levels(v.frames), [0, 100, 200], atol=4)


def test_auto_reports_both_decoders_when_both_fail(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 2048)
    with pytest.raises(V.VideoReadError) as e:
        V.read_frames(bad, 4)
    msg = str(e.value)
    assert msg.startswith(f"cannot decode video {bad}") and "\n" not in msg
    if "decord" in V.available_backends():
        assert "decord: " in msg and "; pyav: " in msg


def test_no_backend_at_all(clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(V.VideoReadError, match="no video decoder installed"):
        V.read_frames(clip, 4)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_bad_files_raise_one_line_reasons(tmp_path, backend):
    with pytest.raises(V.VideoReadError, match="video not found") as e:
        V.read_frames(tmp_path / "missing.mp4", 4, backend=backend)
    assert "\n" not in str(e.value)

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(V.VideoReadError, match="empty"):
        V.read_frames(empty, 4, backend=backend)

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(V.VideoReadError) as e:
        V.read_frames(corrupt, 4, backend=backend)
    assert "corrupt.mp4" in str(e.value) and "\n" not in str(e.value)

    with pytest.raises(V.VideoReadError, match="folder"):
        V.read_frames(tmp_path, 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_video_stream_and_truncated_file(tmp_path, clip, backend):
    audio = tmp_path / "audio_only.mp4"  # a valid mp4 holding no video stream
    with av.open(str(audio), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for _ in range(3):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate = 16000
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(V.VideoReadError, match="audio_only.mp4"):
        V.read_frames(audio, 4, backend=backend)

    data = open(clip, "rb").read()
    cut = tmp_path / "truncated.mp4"  # the index (moov) is at the end: cut off, nothing is playable
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(V.VideoReadError, match="truncated.mp4") as e:
        V.read_frames(cut, 4, backend=backend)
    assert "\n" not in str(e.value) and not str(e.value).startswith("[")


def test_error_is_a_value_error_and_unknown_backend():
    assert issubclass(V.VideoReadError, ValueError)
    with pytest.raises(ValueError, match="unknown video backend 'ffmpeg'; choose one of: auto, decord, pyav"):
        V.read_frames("x.mp4", 4, backend="ffmpeg")

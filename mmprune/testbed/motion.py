"""``motion``: generated video QA whose answers need more than one frame.

Each clip is a static, cluttered background (the same generator as :mod:`mmprune.testbed.shapes`) with
small shapes that move, appear, disappear or change colour, and one question of four kinds:

=================  ==============================================  =========================
kind               question                                        answers
=================  ==============================================  =========================
``direction``      which way does the red star move?               left right up down
``order``          which shape appears first? / ... last?          circle square ... cross
``colour_change``  which shape changes colour?                     circle square ... cross
``count``          how many shapes appear in the video?            1 2 3 4 5
=================  ==============================================  =========================

Clips are written to mp4 (H.264, yuv420p) with PyAV, so the eval reads them back through the same
video path as any real benchmark (``mmprune.eval.video.read_frames``: decord, PyAV fallback); read all
16 frames (or 8: ``linspace`` sampling still lands in every event window, fewer may miss one). Every event starts on an even frame and lasts
an even number of frames, so Qwen2-VL's temporal patches of 2 and the usual "every other frame"
sampling never split or miss one; in ``count`` no single frame shows every shape, and in ``order`` each
appearance is at least two temporal patches after the previous one.

Determinism and splits work as in ``shapes`` (disjoint seed ranges per split, one stream per item).
File names carry a hash of the generation settings, so an existing file is reused only when it holds
the same clip.

Example:
    >>> import tempfile
    >>> from mmprune.testbed.motion import make_motion
    >>> items = make_motion("test", 4, tempfile.mkdtemp())
    >>> [it.kind for it in items]
    ['direction', 'order', 'colour_change', 'count']
    >>> items[0].video.endswith(".mp4")
    True
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from .shapes import COLOURS, SHAPES, Item, item_rng, make_background, paste, shape_sprite

__all__ = [
    "ANSWERS",
    "DIRECTIONS",
    "MOTION_KINDS",
    "make_motion",
    "question_words",
    "render_motion_clip",
    "scene_questions",
    "write_mp4",
]

MOTION_KINDS = ("direction", "order", "colour_change", "count")
DIRECTIONS = ("left", "right", "up", "down")
ANSWERS: dict[str, tuple[str, ...]] = {
    "direction": DIRECTIONS,
    "order": SHAPES,
    "colour_change": SHAPES,
    "count": ("1", "2", "3", "4", "5"),
}
TEMPLATES = {
    "direction": "which way does the {colour} {shape} move?",
    "order_first": "which shape appears first?",
    "order_last": "which shape appears last?",
    "colour_change": "which shape changes colour?",
    "count": "how many shapes appear in the video?",
}
_TAG = 0x4D4F  # distinct from shapes' tag: a motion clip never reuses a shapes scene's stream
_VERSION = 1  # bump when the generator changes, so cached files are not reused


def question_words() -> set[str]:
    """Every word a ``motion`` question or answer can contain.

    Example:
        >>> {"appears", "video", "down"} <= question_words()
        True
    """
    words: set[str] = set()
    for t in TEMPLATES.values():
        words |= {w for w in t.replace("?", " ").split() if not w.startswith("{")}
    for answers in ANSWERS.values():
        words |= set(answers)
    return words | set(SHAPES) | set(COLOURS)


class _Track:
    """One object: a sprite, a visibility window, a linear path and an optional colour change."""

    def __init__(self, shape: str, colour: str, diameter: int, role: str = "distractor"):
        self.shape, self.colour, self.diameter, self.role = shape, colour, diameter, role
        self.start, self.stop = 0, None  # visible frames [start, stop)
        self.x0 = self.y0 = 0.0
        self.vx = self.vy = 0.0
        self.change_frame: int | None = None
        self.colour_after: str | None = None

    def visible(self, t: int, frames: int) -> bool:
        return self.start <= t < (self.stop if self.stop is not None else frames)

    def box(self, t: int) -> tuple[int, int, int, int]:
        x = int(round(self.x0 + self.vx * t))
        y = int(round(self.y0 + self.vy * t))
        return (x, y, x + self.diameter, y + self.diameter)

    def colour_at(self, t: int) -> str:
        if self.change_frame is not None and t >= self.change_frame:
            return self.colour_after
        return self.colour


def _pick(rng: np.random.Generator, seq, exclude=()) -> Any:
    choices = [s for s in seq if s not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _set_path(
    rng: np.random.Generator, tr: _Track, size: int, frames: int, speed: tuple[float, float], direction=None
):
    """A straight path that stays inside the frame for the whole clip."""
    d, m = tr.diameter, 2
    if direction is None:
        ang = rng.uniform(0, 2 * np.pi)
        ux, uy = np.cos(ang), np.sin(ang)
    else:
        ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    v = rng.uniform(*speed)
    tr.vx, tr.vy = float(ux * v), float(uy * v)
    span_x, span_y = tr.vx * (frames - 1), tr.vy * (frames - 1)
    lo_x, hi_x = m - min(0, span_x), size - m - d - max(0, span_x)
    lo_y, hi_y = m - min(0, span_y), size - m - d - max(0, span_y)
    if hi_x < lo_x or hi_y < lo_y:
        return False
    tr.x0, tr.y0 = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
    return True


def _overlap(a, b, gap: int = 2) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _collides(tracks: list[_Track], new: _Track, frames: int) -> bool:
    for t in range(frames):
        if not new.visible(t, frames):
            continue
        nb = new.box(t)
        if any(o.visible(t, frames) and _overlap(nb, o.box(t)) for o in tracks):
            return True
    return False


def _add(rng, tracks, tr, size, frames, speed, direction=None, tries: int = 100) -> bool:
    for _ in range(tries):
        if _set_path(rng, tr, size, frames, speed, direction) and not _collides(tracks, tr, frames):
            tracks.append(tr)
            return True
    return False


def _even(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An even integer in [lo, hi] (events align with temporal patches of 2 frames)."""
    lo, hi = lo + (lo % 2), hi - (hi % 2)
    return int(rng.integers(lo // 2, hi // 2 + 1)) * 2


def _combos(rng: np.random.Generator, k: int, distinct_shapes: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    while len(out) < k:
        s, c = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
        if distinct_shapes and any(s == o[0] for o in out):
            continue
        if (s, c) not in out:
            out.append((s, c))
    return out


def _scene(rng: np.random.Generator, kind: str, sub: int, size: int, frames: int):
    """Tracks, question and answer for one clip (None if this layout failed; the caller retries)."""
    dia = lambda: int(round(rng.uniform(12, 16) * size / 112))  # noqa: E731 - ~1 merged Qwen token at 112 px
    slow = (0.0, 0.5 * size / 112)
    tracks: list[_Track] = []
    if kind == "direction":
        (s, c), *others = _combos(rng, int(rng.integers(2, 5)), distinct_shapes=False)
        direction = _pick(rng, DIRECTIONS)
        target = _Track(s, c, dia(), "target")
        travel = (0.35 * size / (frames - 1), 0.6 * size / (frames - 1))  # a third to over half the frame
        if not _add(rng, tracks, target, size, frames, travel, direction):
            return None
        for so, co in others:  # most distractors move too: "the one that moves" is not a shortcut
            speed = travel if rng.random() < 0.7 else (0.0, 0.0)
            if not _add(rng, tracks, _Track(so, co, dia()), size, frames, speed):
                return None
        return tracks, TEMPLATES["direction"].format(colour=c, shape=s), direction
    if kind == "order":
        gap = 2 * max(1, frames // 8)
        first = _even(rng, 0, frames - 2 - 2 * gap)
        second = _even(rng, first + gap, frames - 2 - gap)
        third = _even(rng, second + gap, frames - 2)
        for (s, c), t0 in zip(_combos(rng, 3, distinct_shapes=True), (first, second, third)):
            tr = _Track(s, c, dia(), "target")
            tr.start = t0
            if not _add(rng, tracks, tr, size, frames, slow):
                return None
        which = "first" if sub % 2 == 0 else "last"
        answer = tracks[0].shape if which == "first" else tracks[-1].shape
        return tracks, TEMPLATES[f"order_{which}"], answer
    if kind == "colour_change":
        combos = _combos(rng, int(rng.integers(2, 4)), distinct_shapes=True)
        changer = int(rng.integers(len(combos)))
        for i, (s, c) in enumerate(combos):
            tr = _Track(s, c, dia(), "target" if i == changer else "distractor")
            if i == changer:
                tr.change_frame = _even(rng, frames // 4, frames - frames // 4)
                tr.colour_after = _pick(rng, list(COLOURS), {c})
            if not _add(rng, tracks, tr, size, frames, slow):
                return None
        return tracks, TEMPLATES["colour_change"], combos[changer][0]
    if kind == "count":
        k = int(rng.integers(1, 6))
        windows = _windows(rng, k, frames)
        if windows is None:
            return None
        for (s, c), (t0, t1) in zip(_combos(rng, k, distinct_shapes=False), windows):
            tr = _Track(s, c, dia(), "target")
            tr.start, tr.stop = t0, t1
            if not _add(rng, tracks, tr, size, frames, slow):
                return None
        return tracks, TEMPLATES["count"], str(k)
    raise ValueError(f"unknown kind {kind!r}")


def _windows(rng: np.random.Generator, k: int, frames: int) -> list[tuple[int, int]] | None:
    """``k`` visibility windows; never all ``k`` on screen at once (for k >= 2), at most 2 at a time."""
    shortest = 2 * max(1, frames // 8)
    cap = 1 if k == 2 else 2
    for _ in range(200):
        out = []
        for _ in range(k):
            length = _even(rng, shortest, max(shortest, frames // 2))
            t0 = _even(rng, 0, frames - length)
            out.append((t0, t0 + length))
        if k == 1:
            return out
        load = np.zeros(frames, dtype=int)
        for t0, t1 in out:
            load[t0:t1] += 1
        if load.max() <= cap:
            return sorted(out)
    return None


def render_motion_clip(
    split: str, index: int, frames: int = 16, size: int = 112, seed: int = 0
) -> tuple[np.ndarray, Item]:
    """The frames ``(T, H, W, 3)`` uint8 of clip ``index`` of ``split`` and its item (``video`` unset).

    Example:
        >>> clip, item = render_motion_clip("train", 3, frames=8, size=64)
        >>> clip.shape, item.kind
        ((8, 64, 64, 3), 'count')
    """
    if frames < 8 or frames % 2:
        raise ValueError(f"frames must be even and >= 8, got {frames}")
    rng = item_rng(_TAG, seed, split, index)
    kind, sub = MOTION_KINDS[index % len(MOTION_KINDS)], index // len(MOTION_KINDS)
    for _ in range(50):
        made = _scene(rng, kind, sub, size, frames)
        if made is not None:
            break
    else:  # pragma: no cover - would mean an unusable size/frames setting
        raise RuntimeError(f"could not lay out motion clip {split}/{index} ({frames} frames, {size}px)")
    tracks, question, answer = made
    bg, style = make_background(rng, size)
    base = np.asarray(bg, dtype=np.float32)
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        canvas = base.copy()
        for tr in tracks:
            if tr.visible(t, frames):
                x0, y0 = tr.box(t)[:2]
                paste(canvas, shape_sprite(tr.shape, COLOURS[tr.colour_at(t)], tr.diameter), x0, y0)
        clip[t] = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    objects = []
    for tr in tracks:
        objects.append(
            {
                "shape": tr.shape,
                "colour": tr.colour,
                "role": tr.role,
                "start": tr.start,
                "stop": tr.stop if tr.stop is not None else frames,
                "change_frame": tr.change_frame,
                "colour_after": tr.colour_after,
                "boxes": [list(tr.box(t)) if tr.visible(t, frames) else None for t in range(frames)],
            }
        )
    item = Item(
        id=f"motion-{split}-{seed}-{index:06d}",
        question=question,
        answer=answer,
        kind=kind,
        metadata={
            "split": split,
            "index": index,
            "seed": seed,
            "frames": frames,
            "size": size,
            "background": style,
            "objects": objects,
        },
    )
    return clip, item


def scene_questions(metadata: dict) -> dict[str, list[tuple[str, str]]]:
    """Every question a clip answers unambiguously, by kind (as :func:`mmprune.testbed.shapes.scene_questions`).

    ``direction``: a shape-colour pair seen once that travels at least 30% of the frame along a dominant
    axis (twice the other); ``order``: the first / last shape to appear when it starts at least 4 frames
    before / after every other and its shape is unique; ``colour_change``: when exactly one shape
    changes and shapes are distinct; ``count``: the number of shapes that appear (at most 5).

    Example:
        >>> _, it = render_motion_clip("test", 0)
        >>> (it.question, it.answer) in scene_questions(it.metadata)[it.kind]
        True
    """
    objs, size = metadata["objects"], metadata["size"]
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in MOTION_KINDS}
    if 1 <= len(objs) <= 5:
        out["count"].append((TEMPLATES["count"], str(len(objs))))
    pairs = [(o["shape"], o["colour"]) for o in objs]
    shapes = [o["shape"] for o in objs]
    for o in objs:
        seen = [b for b in o["boxes"] if b is not None]
        dx, dy = seen[-1][0] - seen[0][0], seen[-1][1] - seen[0][1]
        if pairs.count((o["shape"], o["colour"])) == 1 and max(abs(dx), abs(dy)) >= 0.3 * size:
            if abs(dx) >= 2 * abs(dy):
                d = "right" if dx > 0 else "left"
            elif abs(dy) >= 2 * abs(dx):
                d = "down" if dy > 0 else "up"
            else:
                continue
            out["direction"].append((TEMPLATES["direction"].format(colour=o["colour"], shape=o["shape"]), d))
    starts = sorted((o["start"], o["shape"]) for o in objs)
    if len(objs) >= 2 and len(set(shapes)) == len(shapes):
        if starts[1][0] - starts[0][0] >= 4:
            out["order"].append((TEMPLATES["order_first"], starts[0][1]))
        if starts[-1][0] - starts[-2][0] >= 4:
            out["order"].append((TEMPLATES["order_last"], starts[-1][1]))
    changers = [o for o in objs if o["change_frame"] is not None]
    if len(changers) == 1 and len(set(shapes)) == len(shapes):
        out["colour_change"].append((TEMPLATES["colour_change"], changers[0]["shape"]))
    return out


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 8, crf: int = 12) -> None:
    """Write ``(T, H, W, 3)`` uint8 RGB frames as H.264 mp4 (yuv420p) with PyAV, atomically.

    A low ``crf`` keeps the small saturated shapes' colours intact through chroma subsampling.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.mp4")
        >>> write_mp4(np.zeros((4, 32, 32, 3), np.uint8), p); os.path.getsize(p) > 0
        True
    """
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    t, h, w, _ = frames.shape
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # One thread and fixed settings: byte-identical files for identical frames on one machine.
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "medium", "tune": "stillimage"}
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _settings_key(frames: int, size: int, fps: int, seed: int) -> str:
    raw = f"v{_VERSION}-f{frames}-s{size}-fps{fps}-seed{seed}".encode()
    return hashlib.sha1(raw).hexdigest()[:8]


def make_motion(
    split: str,
    n: int,
    folder: str | os.PathLike,
    frames: int = 16,
    size: int = 112,
    fps: int = 8,
    seed: int = 0,
    start: int = 0,
    overwrite: bool = False,
) -> list[Item]:
    """Clips ``start .. start+n-1`` of ``split`` written to ``folder`` as mp4; kinds cycle in blocks of 4.

    At the defaults (16 frames of 112 px) Qwen2-VL sees 8 temporal patches x 4 x 4 merged tokens =
    128 visual tokens per clip. Existing files with the same settings are reused unless ``overwrite``.

    Example:
        >>> import tempfile
        >>> it = make_motion("validation", 1, tempfile.mkdtemp(), frames=8, size=64)[0]
        >>> it.metadata["frames"], it.kind
        (8, 'direction')
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = _settings_key(frames, size, fps, seed)
    items = []
    for i in range(start, start + n):
        clip, item = render_motion_clip(split, i, frames=frames, size=size, seed=seed)
        path = folder / f"motion-{split}-{i:06d}-{key}.mp4"
        if overwrite or not path.exists():
            write_mp4(clip, path, fps=fps)
        item.video = str(path)
        item.metadata["fps"] = fps
        items.append(item)
    return items

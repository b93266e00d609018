"""Train the test-bed models: ``python -m mmprune.testbed.train --model llava|qwen2vl --out DIR``.

What it does, in order:

1. builds the processor (tokenizer included) with :mod:`mmprune.testbed.vocab` and saves it into ``DIR``;
2. generates the training, validation and test data deterministically (``shapes`` images for both
   models, ``motion`` clips too for qwen2vl) with a process pool, optionally cached in ``--data-cache``;
3. trains a fresh :func:`~mmprune.testbed.vocab.build_testbed_model` with AdamW (linear warm-up,
   cosine decay), cross-entropy on the answer tokens only (answer + end-of-turn), the prompt built by
   the processor's chat template exactly as the eval builds it (:func:`mmprune.testbed.tasks.chat_messages`
   around :func:`mmprune.testbed.tasks.testbed_prompt`); qwen2vl alternates image and video batches;
4. logs the loss and the validation accuracy per question kind (greedy ``generate``, exact match);
5. saves ``model.safetensors`` + config + processor files with ``save_pretrained`` and
   ``train_log.json`` (exact command, seed, steps, wall time, device, val/test accuracy per kind).

Choices worth knowing:

* **llava's [CLS].** The tower has 5 layers and the LLM reads the penultimate one
  (``vision_feature_layer=-2``), as LLaVA-1.5 does; an auxiliary loss on the tower's
  ``pooler_output`` (the last layer's [CLS]) predicts which objects the scene holds (shape-colour
  pairs, glyphs, counts per shape). Without it nothing trains [CLS]'s attention, so [CLS]-attention
  policies (VisionZip, FasterVLM, ...) would read noise; with it the penultimate [CLS] attention, the
  one those policies read, learns to gather objects as in a CLIP-trained tower. qwen2vl gets the same
  presence loss on its mean merged image token (it has no [CLS]).
* **Dense token loss.** Every visual token the LLM reads (llava: the feature layer's patches;
  qwen2vl: the merged tokens, video too) also classifies the object it shows, from the generator's
  boxes (:func:`token_labels`). Objects sit one per 28 px cell (:func:`mmprune.testbed.shapes.grid_cells`),
  which is one llava patch (patch 28) and one merged Qwen2-VL token, so every label is exact.
* **Grounding loss.** At each visual-token position holding an object, the LLM's own head must name it
  (colour and shape words, or the character; :func:`grounding_loss`). The answer to "what colour is
  the star?" is then a copy from the right visual token. On the first grid-aligned CPU run without it,
  both models stayed at the answer priors (llava 25% val accuracy after 300 steps of 32, qwen2vl 26%
  after 123) while the dense loss fell: the LLM had not found the visual tokens yet.
* **Where things are.** ``--where-weight`` adds each object token's row and column digits to the
  grounding loss, and ``--position-hints 1`` labels, in position questions, the outputs at the first
  object's name with that object's row and column (the answer label then sits at the second object):
  "where is the red star relative to the blue cross?" becomes two lookups and a comparison. Position
  was the one kind still at chance on the CPU budget (testbed-llava 22-32% val after ~4900 steps).
  ``--where-probe`` reads row and column with separate heads from the middle layer (:class:`WhereProbe`):
  the digits in the grounding loss do not say which one is the row.
* **Token counts that vary.** ``--drop-background P`` hides part of the background visual tokens
  from the LLM in a fraction P of the samples, as pruning would (:func:`drop_background`), so that
  counting does not depend on how many tokens an image has: without it every policy at 25% cut
  testbed-llava's count accuracy from 90% to 37% or less, objects kept or not.
* **Several questions per image.** Each training image comes with ``--turns`` questions as a
  multi-turn conversation (the item's own first, then others the scene answers:
  :func:`follow_turns`, :func:`mmprune.testbed.shapes.scene_questions`). The image is encoded once, so
  each step supervises ~4x the answers for ~1.5x the time; the eval asks one question, the first turn.
  ``--kind-weights count=3,...`` asks the kinds still being learned more often in the extra turns
  (testbed-llava read colour and text at 98-100% while count and position sat at 42% / 24%).
* **Fast inputs, checked.** Batches are built from uint8 pixels and pre-tokenised prompts (pixels
  normalised and patchified in torch, on the GPU when there is one) instead of calling the processor
  per step; at start-up a few items are built both ways and compared (``fast_path_check`` in the log).
* **Video frames.** The eval reads ``motion`` clips back from H.264 mp4 (yuv420p: chroma at half
  resolution). Training clips get the same chroma subsampling (:func:`chroma_subsample`), so the model
  does not meet a colour blur at test time that it never saw.
* **Qwen2-VL speed.** transformers runs the vision attention one chunk (image or frame pair) at a time
  in a Python loop unless flash-attention is installed, and recomputes the M-RoPE ids with a Python
  loop over the batch on every forward; for training, equal-length chunks are batched into one SDPA
  call and the M-RoPE ids are computed once per prompt with the model's own ``get_rope_index``
  (both checked equal to the originals at start-up and logged; neither is part of the saved model).
  Together 3.4x faster steps on an H100 (453 -> 134 ms at batch 128).
* **Budget and stages.** Defaults are one stage of the CPU recipe (see ``DEFAULTS``); ``--time-budget``
  picks the step count from the measured step time (after a fixed warm-up, so the schedule equals a
  run with ``--steps N``, which the log records as ``reproduce_command``). ``--init-from DIR`` starts a
  stage from saved weights (its log is nested under ``init_from`` in the new one) and ``--stop-at N``
  reproduces a stage that was stopped at a checkpoint, so a chain of stages replays exactly.

* **bf16 on the CPU.** ``--precision bf16`` autocasts the training forward pass (:class:`Bf16Autocast`;
  attention and qwen2vl's patch embedding stay fp32, whose CPU kernels are slower in bf16): 825 vs
  1096 ms per llava step on 2 AMX-bf16 cores. Weights, optimizer state and evaluation stay fp32.

testbed-llava was trained by one command from scratch (3586 steps, 54 min on 2 CPU
cores, ``--precision bf16``); testbed-qwen2vl in chained stages. Each model's exact command is in its
``train_log.json`` (the stages' nested under ``init_from``).

Example:
    >>> main(["--model", "llava", "--out", "/tmp/tb", "--steps", "2", "--batch-size", "2",
    ...       "--train-images", "8", "--val-items", "5", "--test-items", "5", "--tiny"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .shapes import CELL, PLURAL, SHAPES
from .tasks import chat_messages, normalize_answer, testbed_prompt

__all__ = ["DEFAULTS", "aux_targets", "chroma_subsample", "main", "parse_args"]

# One stage of the shipped recipe: ~50 min per model on one CPU core each, both models at once on 2
# cores (2.1 s/step llava, 4.3 s/step qwen2vl, measured here). The shipped weights chain such stages
# with --init-from (their train_log.json nests every stage's command).
DEFAULTS = {
    "llava": {"steps": 1400, "batch_size": 32, "lr": 1e-3, "train_images": 20000, "train_clips": 0},
    "qwen2vl": {"steps": 660, "batch_size": 32, "lr": 1e-3, "train_images": 20000, "train_clips": 8000},
}
# Model shapes (build_testbed_model overrides). llava: 5 tower layers, features from the penultimate.
MODEL_OVERRIDES = {
    "llava": {"vision_layers": 5, "vision_feature_layer": -2, "patch_size": 28},
    "qwen2vl": {},
}
TINY_OVERRIDES = {  # for tests: a model that trains in seconds
    "llava": {"vision_layers": 2, "vision_feature_layer": -2, "patch_size": 28, "text_layers": 1, "vision_width": 32,
              "vision_heads": 2, "text_width": 64, "text_heads": 2, "text_kv_heads": 1, "text_mlp": 128},
    "qwen2vl": {"vision_layers": 1, "text_layers": 1, "vision_width": 32, "vision_heads": 2, "text_width": 64,
                "text_heads": 2, "text_kv_heads": 1, "text_mlp": 128},
}  # fmt: skip
IMAGE_SIZE, CLIP_FRAMES, CLIP_SIZE = 224, 16, 112
BARE_PROMPT_FRACTION = 0.2  # some prompts are the bare question, so a terser eval prompt still works
AUX_WEIGHT = 1.0
_CACHE_FORMAT = 2  # bump when what generate_split stores changes (2: scenes of clips too)
# Questions per training image. Extra turns reuse the encoded image (the costly part of a step), so
# each step supervises several answers: about 4x the answers for 1.5x the step time at 64 tokens.
TURNS = 4
# Key words of the questions (see Encoder.early_labels): shapes named, "letter" / "number", and motion's
# "first" / "last" / "colour" / "shapes" (the last of these in a question is what it asks about).
KEY_WORDS = (*SHAPES, *PLURAL.values(), "letter", "number", "first", "last", "colour", "shapes")
GROUND_WEIGHT = 0.5


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass
class Split:
    """Generated items in arrays: ``pixels`` uint8 ``(N, H, W, 3)`` (images) or ``(N, T, H, W, 3)`` (clips)."""

    name: str
    modality: str
    pixels: np.ndarray
    questions: list[str]
    answers: list[str]
    kinds: list[str]
    aux: np.ndarray | None = None  # (N, A) float32 object-presence targets (images only)
    tokens: dict | None = None  # model kind -> (N, visual tokens) uint8 classes (dense auxiliary targets)
    scenes: list[dict] | None = None  # images: each scene's objects and plates (for scene_questions)

    def __len__(self) -> int:
        return len(self.answers)


def aux_targets(metadata: dict) -> np.ndarray:
    """Auxiliary targets of a ``shapes`` scene: shape-colour pairs present, glyphs present, count >= k per shape.

    Example:
        >>> from mmprune.testbed.shapes import render_shapes_item
        >>> t = aux_targets(render_shapes_item("train", 0).metadata); t.shape, float(t.max())
        ((71,), 1.0)
    """
    from .shapes import COLOURS, DIGITS, LETTERS, SHAPES

    colours, chars = list(COLOURS), [c.lower() for c in LETTERS + DIGITS]
    out = np.zeros(len(SHAPES) * len(colours) + len(chars) + len(SHAPES) * 5, np.float32)
    counts = dict.fromkeys(SHAPES, 0)
    for o in metadata["objects"]:
        out[SHAPES.index(o["shape"]) * len(colours) + colours.index(o["colour"])] = 1.0
        counts[o["shape"]] += 1
    base = len(SHAPES) * len(colours)
    for t in metadata["texts"]:
        out[base + chars.index(t["char"])] = 1.0
    base += len(chars)
    for s, n in counts.items():
        out[base + SHAPES.index(s) * 5 : base + SHAPES.index(s) * 5 + min(n, 5)] = 1.0
    return out


# Dense labels: each visual token's class is the object covering most of it (shape-colour pair or
# glyph), or background. N_PATCH_CLASSES = 30 pairs + 16 glyphs + background.
N_PATCH_CLASSES = 47
BACKGROUND = N_PATCH_CLASSES - 1
LLAVA_GRID, QWEN_CELL = 8, 28  # llava: 8 x 8 patches of 28 px; qwen2vl: merged tokens of 28 px
MIN_OVERLAP = 30  # pixels of an object inside a token for the token to count as showing it


def _object_class(shape: str, colour: str) -> int:
    from .shapes import COLOURS, SHAPES

    return SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)


def _char_class(char: str) -> int:
    from .shapes import DIGITS, LETTERS

    return 30 + [c.lower() for c in LETTERS + DIGITS].index(char)


def token_labels(boxes: list[tuple[list[int], int]], size: int, cell: int) -> np.ndarray:
    """``(size // cell) ** 2`` token classes in raster order from ``(box, class)`` pairs (largest overlap wins).

    Example:
        >>> token_labels([([0, 0, 16, 16], 3)], 32, 16).tolist()
        [3, 46, 46, 46]
    """
    g = size // cell
    best = np.zeros((g, g), np.int64)
    out = np.full((g, g), BACKGROUND, np.uint8)
    edges = np.arange(g + 1) * cell
    for (x0, y0, x1, y1), cls in boxes:
        ox = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None)
        oy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None)
        area = oy[:, None] * ox[None, :]
        win = (area >= MIN_OVERLAP) & (area > best)
        out[win], best[win] = cls, area[win]
    return out.reshape(-1)


def shapes_token_labels(metadata: dict, cell: int) -> np.ndarray:
    """Token classes of a ``shapes`` scene for tokens of ``cell`` pixels."""
    boxes = [(o["box"], _object_class(o["shape"], o["colour"])) for o in metadata["objects"]]
    boxes += [(t["box"], _char_class(t["char"])) for t in metadata["texts"]]
    return token_labels(boxes, metadata["image_size"], cell)


def motion_token_labels(metadata: dict, temporal_patch: int = 2) -> np.ndarray:
    """Token classes of a ``motion`` clip: per temporal patch (its first frame), 28-px cells in raster order."""
    frames, size = metadata["frames"], metadata["size"]
    out = []
    for t in range(0, frames, temporal_patch):
        boxes = []
        for o in metadata["objects"]:
            box = o["boxes"][t]
            if box is None:
                continue
            changed = o["change_frame"] is not None and t >= o["change_frame"]
            boxes.append((box, _object_class(o["shape"], o["colour_after"] if changed else o["colour"])))
        out.append(token_labels(boxes, size, QWEN_CELL))
    return np.concatenate(out)


def _render_shape(args: tuple[str, int, int]) -> tuple:
    from .shapes import render_shapes_item

    split, index, seed = args
    it = render_shapes_item(split, index, image_size=IMAGE_SIZE, seed=seed)
    labels = {
        "llava": shapes_token_labels(it.metadata, IMAGE_SIZE // LLAVA_GRID),
        "qwen2vl": shapes_token_labels(it.metadata, QWEN_CELL),
    }
    m = it.metadata
    scene = {
        "image_size": m["image_size"],
        "grid": m["grid"],
        "objects": [{k: o[k] for k in ("shape", "colour", "box")} for o in m["objects"]],
        "texts": [{k: t[k] for k in ("char", "box")} for t in m["texts"]],
    }
    return (
        np.asarray(it.image, dtype=np.uint8),
        it.question,
        it.answer,
        it.kind,
        aux_targets(it.metadata),
        labels,
        scene,
    )


def _render_clip(args: tuple[str, int, int]) -> tuple:
    from .motion import render_motion_clip

    split, index, seed = args
    frames, it = render_motion_clip(split, index, frames=CLIP_FRAMES, size=CLIP_SIZE, seed=seed)
    m = it.metadata
    objects = []
    for o in m["objects"]:  # what motion.scene_questions reads: the first and last box of a track suffice
        seen = [b for b in o["boxes"] if b is not None]
        objects.append({**{k: o[k] for k in ("shape", "colour", "start", "change_frame")}, "boxes": [seen[0], seen[-1]]})
    scene = {"size": m["size"], "objects": objects}
    return frames, it.question, it.answer, it.kind, None, {"qwen2vl": motion_token_labels(it.metadata)}, scene


def generate_split(
    modality: str, split: str, n: int, seed: int = 0, workers: int = 1, cache: str | os.PathLike | None = None
) -> Split:
    """Items ``0 .. n-1`` of ``split`` (``shapes`` for images, ``motion`` for videos) as arrays.

    Generation is per item and seeded by (seed, split, index), so the result does not depend on
    ``workers``; with ``cache`` the arrays are stored there (``.npy`` + ``.json``) and reused.

    Example:
        >>> s = generate_split("image", "validation", 3); s.pixels.shape, s.kinds
        ((3, 224, 224, 3), ['colour', 'count', 'position'])
    """
    fn = _render_shape if modality == "image" else _render_clip
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3) if modality == "image" else (CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE, 3)
    name = f"{'shapes' if modality == 'image' else 'motion'}-{split}-n{n}-seed{seed}"
    if cache is not None:
        from .motion import _VERSION
        from .shapes import _VERSION as _SHAPES_VERSION

        name += f"-v{_VERSION}.{_SHAPES_VERSION}.{_CACHE_FORMAT}"
        cache = Path(cache)
        npy, meta = cache / f"{name}.npy", cache / f"{name}.json"
        if npy.exists() and meta.exists():
            m = json.loads(meta.read_text())
            aux = np.asarray(m["aux"], np.float32) if m.get("aux") is not None else None
            tokens = {k: np.asarray(v, np.uint8) for k, v in m["tokens"].items()}
            return Split(
                name,
                modality,
                np.load(npy, mmap_mode="r"),
                m["questions"],
                m["answers"],
                m["kinds"],
                aux,
                tokens,
                m.get("scenes"),
            )
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{name}.{os.getpid()}.npy"
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
    else:
        pixels = np.empty((n, *shape), np.uint8)
    questions, answers, kinds, aux, tokens, scenes = [], [], [], [], [], []
    jobs = [(split, i, seed) for i in range(n)]
    if workers > 1 and n > 64:
        ctx = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        )
        with ctx.Pool(workers) as pool:
            results = pool.imap(
                fn, jobs, chunksize=32
            )  # imap keeps the order: results do not depend on workers
            for i, r in enumerate(results):
                pixels[i] = r[0]
                questions.append(r[1]), answers.append(r[2]), kinds.append(r[3]), aux.append(r[4])
                tokens.append(r[5]), scenes.append(r[6])
    else:
        for i, job in enumerate(jobs):
            r = fn(job)
            pixels[i] = r[0]
            questions.append(r[1]), answers.append(r[2]), kinds.append(r[3]), aux.append(r[4])
            tokens.append(r[5]), scenes.append(r[6])
    aux_arr = np.stack(aux) if modality == "image" and n else None
    token_arr = {k: np.stack([t[k] for t in tokens]) for k in (tokens[0] if tokens else {})}
    if cache is not None:
        pixels.flush()
        del pixels
        os.replace(tmp, npy)
        meta.write_text(
            json.dumps(
                {
                    "questions": questions,
                    "answers": answers,
                    "kinds": kinds,
                    "aux": aux_arr.tolist() if aux_arr is not None else None,
                    "tokens": {k: v.tolist() for k, v in token_arr.items()},
                    "scenes": scenes,
                }
            )
        )
        pixels = np.load(npy, mmap_mode="r")
    return Split(name, modality, pixels, questions, answers, kinds, aux_arr, token_arr, scenes)


def follow_turns(
    scene: dict, question: str, n: int, rng: np.random.Generator, kind_weights: dict[str, float] | None = None
) -> list[tuple[str, str, bool]]:
    """``n`` more ``(question, answer, bare)`` turns about a ``shapes`` scene or a ``motion`` clip
    (``scene["size"]`` set), for multi-turn training.

    Each turn picks a question kind among those the scene answers (uniformly, or in proportion to
    ``kind_weights``, 1 for a kind it omits; 0 never asks it), then a question of that kind (``exists``: yes or no with
    equal odds), never repeating one already asked.

    Example:
        >>> s = generate_split("image", "train", 1).scenes[0]
        >>> len(follow_turns(s, "?", 3, np.random.default_rng(0)))
        3
    """
    from . import motion, shapes

    by_kind = (motion if "size" in scene else shapes).scene_questions(scene)
    asked, out = {question}, []
    for _ in range(n):
        kinds = [k for k, v in by_kind.items() if any(q not in asked for q, _ in v)]
        if kind_weights:  # weight 0 never asks a kind
            kinds = [k for k in kinds if kind_weights.get(k, 1.0) > 0]
        if not kinds:
            break
        if kind_weights:  # the uniform branch keeps runs without weights bit-identical to earlier ones
            w = np.array([kind_weights.get(k, 1.0) for k in kinds], dtype=float)
            kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        else:
            kind = kinds[int(rng.integers(len(kinds)))]
        pool = [qa for qa in by_kind[kind] if qa[0] not in asked]
        yes = [qa for qa in pool if qa[1] == "yes"]
        if yes and len(yes) < len(pool):  # exists: balance yes and no
            pool = yes if rng.random() < 0.5 else [qa for qa in pool if qa[1] != "yes"]
        q, a = pool[int(rng.integers(len(pool)))]
        asked.add(q)
        out.append((q, a, bool(rng.random() < BARE_PROMPT_FRACTION)))
    return out


def position_hints(scene: dict) -> dict[str, tuple[int, int]]:
    """Each ``position`` question a ``shapes`` scene answers, mapped to the grid cell ``(row, column)``
    of the object it asks about (the first one named); see :meth:`Encoder.early_labels`.

    Example:
        >>> s = generate_split("image", "train", 1).scenes[0]
        >>> all(0 <= r < 8 and 0 <= c < 8 for r, c in position_hints(s).values())
        True
    """
    from .shapes import TEMPLATES, cell_of, scene_questions

    where = {TEMPLATES["position"].format(colour=o["colour"], shape=o["shape"], colour2="{c}", shape2="{s}")
             .split(" relative")[0]: cell_of(o["box"], CELL) for o in scene["objects"]}  # fmt: skip
    return {q: where[q.split(" relative")[0]] for q, _ in scene_questions(scene).get("position", ())}


def text_turn(role: str, text: str) -> dict:
    """One chat message holding only text, as ``processor.apply_chat_template`` takes it."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def chroma_subsample(frames):
    """What H.264 yuv420p does to colour: BT.601 chroma averaged over 2x2 pixels, luma kept.

    Works on uint8 ``(..., H, W, 3)`` numpy arrays or torch tensors (any device); returns the same type.

    Example:
        >>> x = np.zeros((1, 4, 4, 3), np.uint8); x[0, 0, 0] = (255, 0, 0)
        >>> y = chroma_subsample(x); y[0, 0, 0].tolist() != [255, 0, 0], y.dtype
        (True, dtype('uint8'))
    """
    import torch

    is_np = isinstance(frames, np.ndarray)
    x = torch.from_numpy(np.array(frames)) if is_np else frames  # a copy: cached clips are read-only
    if x.device.type == "cpu" and x.ndim > 4 and x[0].numel() < x.numel():
        # One clip at a time: its float temporaries stay in cache. A batch of 32 training clips took
        # 170 ms at once and 66 ms clip by clip (2 threads), with bitwise equal results (elementwise
        # ops and 2x2 means within a frame).
        out = torch.stack([_chroma_subsample(c) for c in x])
    else:
        out = _chroma_subsample(x)
    return out.numpy() if is_np else out


def _chroma_subsample(x):
    import torch

    x = x.to(torch.float32)
    r, g, b = x.unbind(-1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb, cr = (b - y) * 0.564, (r - y) * 0.713
    h, w = x.shape[-3], x.shape[-2]

    def down_up(c):
        lead = c.shape[:-2]
        c = c.reshape(*lead, h // 2, 2, w // 2, 2).mean(dim=(-3, -1))
        return c.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)

    cb, cr = down_up(cb), down_up(cr)
    r = y + 1.403 * cr
    b = y + 1.773 * cb
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return torch.stack([r, g, b], dim=-1).add_(0.5).clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# Prompts, tokens and pixels


class Encoder:
    """Turns items into model inputs the way the processor does, but from uint8 tensors and cached ids."""

    def __init__(self, model_kind: str, processor, device, early_answer: bool = False):
        import torch

        self.kind, self.processor, self.device = model_kind, processor, device
        tok = processor.tokenizer
        self.tok = tok
        self.pad_id, self.eos_id = tok.pad_token_id, tok.eos_token_id
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32, device=device)
        if model_kind == "llava":
            self.media_token = {"image": tok.convert_tokens_to_ids("<image>")}
            self.media_count = {"image": (IMAGE_SIZE // processor.patch_size) ** 2}
        else:
            self.p, self.tp, self.m = ip.patch_size, ip.temporal_patch_size, ip.merge_size
            self.media_token = {
                "image": tok.convert_tokens_to_ids("<|image_pad|>"),
                "video": tok.convert_tokens_to_ids("<|video_pad|>"),
            }
            g = IMAGE_SIZE // self.p
            self.media_count = {
                "image": g * g // self.m**2,
                "video": (CLIP_FRAMES // self.tp) * (CLIP_SIZE // self.p) ** 2 // self.m**2,
            }
        self._prompt_cache: dict[tuple[str, str, bool], list[int]] = {}
        self._answer_cache: dict[str, list[int]] = {}
        self.early_answer = early_answer  # see early_labels
        vocab = tok.get_vocab()
        self.key_ids = {vocab[w] for w in KEY_WORDS if w in vocab}
        self.digit_ids = [vocab[str(d)] for d in range(10)]
        # qwen2vl: M-RoPE ids per prompt, computed once with the model's own get_rope_index (which loops
        # in Python over the batch on every forward otherwise); set by enable_fast_positions.
        self.rope_index = None
        self._position_cache: dict[tuple[str, str, bool], Any] = {}

    def prompt_text(self, question: str, modality: str, bare: bool = False) -> str:
        prompt = question if bare else testbed_prompt(question)
        return self.processor.apply_chat_template(
            chat_messages(prompt, modality), add_generation_prompt=True, tokenize=False
        )

    def prompt_ids(self, question: str, modality: str, bare: bool = False) -> list[int]:
        key = (question, modality, bare)
        if key not in self._prompt_cache:
            ids = self.tok(self.prompt_text(question, modality, bare), add_special_tokens=False)["input_ids"]
            media, count = self.media_token[modality], self.media_count[modality]
            out: list[int] = []
            for t in ids:  # the processor repeats the media placeholder once per visual token
                out.extend([t] * count if t == media else [t])
            self._prompt_cache[key] = out
        return self._prompt_cache[key]

    def prompt_positions(self, question: str, modality: str, bare: bool):
        """``(3, len(prompt))`` M-RoPE position ids of one unpadded prompt (qwen2vl)."""
        import torch

        key = (question, modality, bool(bare))
        if key not in self._position_cache:
            ids = torch.tensor([self.prompt_ids(question, modality, bare)])
            grid = {
                "image": [[1, IMAGE_SIZE // self.p, IMAGE_SIZE // self.p]],
                "video": [[CLIP_FRAMES // self.tp, CLIP_SIZE // self.p, CLIP_SIZE // self.p]],
            }[modality]
            grids = {f"{modality}_grid_thw": torch.tensor(grid)}
            pos, _ = self.rope_index(
                ids, self.mm_token_types(ids), attention_mask=torch.ones_like(ids), **grids
            )
            self._position_cache[key] = pos[:, 0].cpu()
        return self._position_cache[key]

    def follow_ids(self, question: str, bare: bool = False) -> list[int]:
        """Ids of a follow-up user turn (no media) and the assistant prefix, as the chat template writes
        them after an answered turn: what a multi-turn conversation adds per extra question."""
        key = ("follow", question, bare)
        if key not in self._prompt_cache:
            turn = [text_turn("user", question if bare else testbed_prompt(question))]
            first = chat_messages("q", "image") + [text_turn("assistant", "yes")]
            render = self.processor.apply_chat_template
            head = render(first, tokenize=False)
            full = render(first + turn, add_generation_prompt=True, tokenize=False)
            if not full.startswith(head):  # pragma: no cover - a template that rewrites earlier turns
                raise ValueError("the chat template does not extend a conversation by appending to it")
            self._prompt_cache[key] = self.tok(full[len(head) :], add_special_tokens=False)["input_ids"]
        return self._prompt_cache[key]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answer_cache:
            self._answer_cache[answer] = self.tok(answer, add_special_tokens=False)["input_ids"] + [
                self.eos_id
            ]
        return self._answer_cache[answer]

    def early_labels(self, prompt: list[int], answer: list[int], hint: tuple[int, int] | None = None) -> list[int]:
        """Labels of a prompt: -100, except (with ``early_answer``) the answer's first token right after
        the question's key word (the last of :data:`KEY_WORDS`: the shape asked about, "letter", ...).

        The output at the key word then has to hold the answer: the lookup in the visual tokens happens
        where the question names its object (one hop), and the final position copies it from there
        (a second, separately supervised hop) instead of learning both at once from the answer alone.

        ``hint`` (a position question's first object's ``(row, column)``, see :func:`position_hints`)
        also labels the outputs at the first object's shape word and the word after it with those two
        digits: the first object is looked up where it is named, so that at the second one the answer
        is a comparison of two cells already in the residual stream.
        """
        lab = [-100] * len(prompt)
        if self.early_answer:
            keys = [j for j, t in enumerate(prompt) if t in self.key_ids]
            if keys and keys[-1] + 1 < len(prompt):
                lab[keys[-1] + 1] = answer[0]
            if hint is not None and len(keys) >= 2 and keys[-2] + 2 < keys[-1]:
                lab[keys[-2] + 1], lab[keys[-2] + 2] = (self.digit_ids[d] for d in hint)
        return lab

    def text_batch(self, questions, answers, modality, bare, follow=None, hints=None):
        """Left-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside answers + eos).

        ``follow[i]``, if given, lists extra ``(question, answer, bare)`` turns about sample ``i``'s
        media, appended as a multi-turn conversation (every answer is supervised). ``hints[i]``, if
        given, maps sample ``i``'s position questions to :meth:`early_labels` hints.
        """
        import torch

        seqs, labs = [], []
        hint = lambda i, q: hints[i].get(q) if hints is not None else None  # noqa: E731
        for i, (q, a, b) in enumerate(zip(questions, answers, bare)):
            p, ans = self.prompt_ids(q, modality, bool(b)), self.answer_ids(a)
            seq, lab = p + ans, self.early_labels(p, ans, hint(i, q)) + ans
            for fq, fa, fb in follow[i] if follow is not None else ():
                p, ans = self.follow_ids(fq, bool(fb)), self.answer_ids(fa)
                seq, lab = seq + p + ans, lab + self.early_labels(p, ans, hint(i, fq)) + ans
            seqs.append(seq)
            labs.append(lab)
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            ids[i, n - len(s) :] = torch.tensor(s)
            mask[i, n - len(s) :] = 1
            labels[i, n - len(s) :] = torch.tensor(lab)
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    def pixels(self, x, modality: str) -> dict:
        """Model pixel inputs from uint8 ``(B, H, W, 3)`` images or ``(B, T, H, W, 3)`` clips (torch, on device)."""
        import torch

        x = x.to(self.device, non_blocking=True)
        if self.kind == "llava":
            return {"pixel_values": self.normalize(x.permute(0, 3, 1, 2), 1).contiguous()}
        if modality == "image":
            x = x[:, None].expand(-1, self.tp, -1, -1, -1)  # an image is its own temporal pair
        b, t, h, w, c = x.shape
        p, tp, m = self.p, self.tp, self.m
        gt, gh, gw = t // tp, h // p, w // p
        # Qwen2VL's patch order: (t, h/m, w/m, m, m) tokens of (C, tp, p, p) values. The patches are cut
        # while still uint8, a quarter of float32's bytes: 32 training clips took 39 instead of 70 ms.
        x = x.permute(0, 1, 4, 2, 3).reshape(b, gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(b * gt * gh * gw, c, tp * p * p)
        x = self.normalize(x, 1).reshape(b * gt * gh * gw, c * tp * p * p)
        grid = torch.tensor([[gt, gh, gw]] * b, dtype=torch.long, device=self.device)
        if modality == "image":
            return {"pixel_values": x, "image_grid_thw": grid}
        return {"pixel_values_videos": x, "video_grid_thw": grid}

    def normalize(self, x, channel_dim: int):
        """uint8 -> float32 ``(x - 255 mean) / (255 std)``, as transformers fuses rescale and normalise;
        the channels lie along ``channel_dim``."""
        import torch

        shape = [1] * x.ndim
        shape[channel_dim] = -1
        # in place: one fresh float buffer, not three (the same values as out of place)
        return x.to(torch.float32).sub_((self.mean * 255.0).view(shape)).div_((self.std * 255.0).view(shape))

    def batch(self, split: Split, idx: np.ndarray, bare: np.ndarray, pixels, follow=None, hints=None) -> dict:
        """Training inputs for items ``idx`` of ``split`` whose uint8 pixels are ``pixels`` (a tensor);
        ``follow`` and ``hints`` as in :meth:`text_batch`."""
        import torch

        qs = [split.questions[i] for i in idx]
        ans = [split.answers[i] for i in idx]
        ids, mask, labels = self.text_batch(qs, ans, split.modality, bare, follow, hints)
        positions = None
        if self.rope_index is not None:
            positions = torch.ones((3, *ids.shape), dtype=torch.long)  # padding gets 1, as get_rope_index
            for i, (q, b) in enumerate(zip(qs, bare)):
                pp = self.prompt_positions(q, split.modality, b)
                # text after the media continues the positions one by one (answers and later turns)
                n_ans = int(mask[i].sum()) - pp.shape[1]
                tail = pp.max() + 1 + torch.arange(n_ans)
                full = torch.cat([pp, tail[None].expand(3, -1)], dim=1)
                positions[:, i, ids.shape[1] - full.shape[1] :] = full
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            **self.pixels(pixels, split.modality),
        }
        if self.kind == "llava":  # as generate does: positions count real tokens only (left padding)
            out["position_ids"] = (mask.cumsum(-1) - 1).clamp_(min=0)
        else:  # what Qwen2VLProcessor returns for M-RoPE: 1 on image tokens, 2 on video tokens
            out["mm_token_type_ids"] = self.mm_token_types(ids)
            if positions is not None:
                out["position_ids"] = positions.to(self.device)
        return out

    def mm_token_types(self, ids):
        types = (ids == self.media_token["image"]).long()
        return types + 2 * (ids == self.media_token["video"]).long()


def fast_path_check(encoder: Encoder, splits: dict[str, Split]) -> dict:
    """Build two items of each modality with the processor and with :class:`Encoder`; report differences."""
    import torch
    from PIL import Image

    report = {}
    proc = encoder.processor
    for modality, split in splits.items():
        idx = np.arange(min(2, len(split)))
        texts = [encoder.prompt_text(split.questions[i], modality) for i in idx]
        raw = [np.asarray(split.pixels[i]) for i in idx]
        if modality == "video":
            raw = [chroma_subsample(r) for r in raw]
        if modality == "image":
            ref = proc(
                text=texts, images=[Image.fromarray(r) for r in raw], padding=True, return_tensors="pt"
            )
        else:
            ref = proc(text=texts, videos=raw, padding=True, return_tensors="pt")
        ids, mask, _ = encoder.text_batch(
            [split.questions[i] for i in idx], [split.answers[i] for i in idx], modality, [False] * len(idx)
        )
        pix = encoder.pixels(torch.from_numpy(np.stack(raw)), modality)
        ids_ok = True
        for j in range(len(idx)):  # compare the unpadded prompt part
            a = ref["input_ids"][j][ref["attention_mask"][j].bool()].tolist()
            b = ids[j][mask[j].bool()].tolist()[: -len(encoder.answer_ids(split.answers[idx[j]]))]
            ids_ok &= a == b
        if "mm_token_type_ids" in ref:
            for j in range(len(idx)):
                a = ref["mm_token_type_ids"][j][ref["attention_mask"][j].bool()].tolist()
                b = encoder.mm_token_types(ids)[j][mask[j].bool()].tolist()[: len(a)]
                ids_ok &= a == b
        key = next(k for k in pix if k.startswith("pixel_values"))
        diff = (ref[key].to(torch.float32) - pix[key].cpu()).abs().max().item()
        grid_ok = True
        for g in ("image_grid_thw", "video_grid_thw"):
            if g in pix:
                grid_ok = ref[g].tolist() == pix[g].cpu().tolist()
        if split.scenes:
            # Multi-turn training sequences: the processor's rendering of the whole conversation.
            follow = follow_turns(split.scenes[0], split.questions[0], 2, np.random.default_rng(0))
            msgs = chat_messages(testbed_prompt(split.questions[0]), modality)  # media first, then turns
            msgs.append(text_turn("assistant", split.answers[0]))
            for q, a, b in follow:
                msgs += [text_turn("user", q if b else testbed_prompt(q)), text_turn("assistant", a)]
            text = proc.apply_chat_template(msgs, tokenize=False)
            media = {"images": [Image.fromarray(raw[0])]} if modality == "image" else {"videos": [raw[0]]}
            ref_ids = proc(text=[text], return_tensors="pt", **media)["input_ids"][0]
            got, got_mask, _ = encoder.text_batch([split.questions[0]], [split.answers[0]], modality, [False], [follow])
            got = got[0][got_mask[0].bool()].tolist()
            ids_ok &= ref_ids.tolist()[: len(got)] == got and len(ref_ids) - len(got) <= 1  # template's final newline
        report[modality] = {
            "input_ids_equal": bool(ids_ok),
            "max_abs_pixel_diff": diff,
            "grid_equal": grid_ok,
        }
    return report


def enable_fast_positions(model, encoder: Encoder, splits: dict[str, Split]) -> dict:
    """Use cached M-RoPE ids (qwen2vl) if the loss equals the model's own computation on a padded batch."""
    import torch

    report: dict[str, Any] = {"installed": False}
    encoder.rope_index = model.model.get_rope_index
    try:
        diffs = []
        with torch.no_grad():
            for split in splits.values():
                idx = np.arange(min(2, len(split)))
                bare = np.array([True, False][: len(idx)])  # two prompt lengths: left padding is exercised
                pix = torch.from_numpy(np.stack([np.asarray(split.pixels[i]) for i in idx]))
                batch = encoder.batch(split, idx, bare, pix)
                fast = model(**batch).logits
                batch.pop("position_ids")
                ref = model(**batch).logits
                keep = batch["attention_mask"].bool()
                diffs.append((fast - ref)[keep].abs().max().item())
        report["max_abs_logit_diff"] = max(diffs)
        report["installed"] = max(diffs) <= 1e-4
    except Exception as err:  # pragma: no cover - another transformers version
        report["error"] = f"{type(err).__name__}: {err}"
    if not report["installed"]:
        encoder.rope_index = None
    return report


# ----------------------------------------------------------------------------------------------------
# Model helpers


class Bf16Autocast:
    """``torch.autocast`` to bfloat16 for a training forward pass, with attention and qwen2vl's patch
    embedding kept in float32 on the CPU.

    On this CPU (AMX-bf16, 2 threads) a bf16 matmul of the LLM's shapes runs 2.9x faster than fp32
    (9600x256 @ 256x704: 5.3 vs 15.3 ms), but PyTorch's CPU kernels for two other ops are slower in
    bf16: flash-attention's backward 2.4x (32x4x170x64 with a padding mask: 80 vs 33 ms), which ate the
    whole gain on llava (1096 ms per step either way; 806 ms with fp32 attention), and the conv3d of
    qwen2vl's patch embedding (its backward 1.26 s per step: a bf16 step took 3.1 s against 2.2 s in
    fp32). So on the CPU, while the context is active, ``scaled_dot_product_attention`` and
    ``conv3d`` -- looked up through ``torch.nn.functional`` at call time by transformers' SDPA path,
    :func:`_batched_vision_attention` and ``nn.Conv3d`` -- get float32 inputs and return the caller's
    dtype, and a conv3d over exactly one kernel (that patch embedding) is the matmul it equals: 1242 ms
    per qwen2vl step (median of a 2078-step run). With ``math_attention`` (``--bf16-attention 1``),
    attention that is masked or over few keys runs instead as bf16 matmuls around an fp32 softmax,
    which beats fp32 flash attention at those shapes (:meth:`_attention`): a qwen2vl clip step of 32
    took 1131 instead of 1244 ms. It is off by default so that L1's command still reproduces L1.
    The names are restored on exit. llava's conv2d stays bf16 (its backward is 62 vs 21 ms, but the
    shipped weights were trained so). On CUDA nothing is redirected (fast kernels there). Weights,
    gradients and the optimizer stay float32 either way.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 4)
        >>> with Bf16Autocast("cpu"):
        ...     lin(torch.ones(2, 4)).dtype
        torch.bfloat16
    """

    FP32_OPS = ("scaled_dot_product_attention", "conv3d")
    # Keys up to this long go to bf16 math attention when ``math_attention`` is on (see _attention).
    MATH_MAX_KEYS = 128

    def __init__(self, device_type: str, enabled: bool = True, math_attention: bool = False):
        import torch

        self.device_type, self.enabled, self.math_attention = device_type, enabled, math_attention
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)
        self.saved: dict[str, Any] = {}

    def _in_fp32(self, fn):
        import torch

        def up(t):
            return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t

        def wrapper(*args, **kwargs):
            with torch.autocast(self.device_type, enabled=False):
                out = fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
            return out.to(args[0].dtype)

        return wrapper

    def _attention(self, sdpa_fp32):
        """With ``math_attention``: attention as two bf16 matmuls around an fp32 softmax where that beats
        fp32 flash attention here, i.e. with a mask or over at most ``MATH_MAX_KEYS`` keys; otherwise
        ``sdpa_fp32``. Forward plus backward, 2 threads, against fp32 flash: LLM, 32x4x230x64 with a
        padding mask, 37 vs 82 ms; qwen2vl's clip patches, 256x4x64x32, 17 vs 35 ms; but its image
        patches, 32x4x256x32 unmasked, 65 vs 37 ms, so those stay flash."""
        import torch

        def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            math = q.dtype == torch.bfloat16 and dropout_p == 0.0
            if not math or (attn_mask is None and k.shape[-2] > self.MATH_MAX_KEYS):
                return sdpa_fp32(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if enable_gqa and k.shape[-3] != q.shape[-3]:
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
                v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
            s = (q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5 if scale is None else scale)
            if is_causal:
                attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                # the finite minimum, as eager attention: a fully masked (padding) row stays finite
                s = s.masked_fill(~attn_mask, torch.finfo(s.dtype).min)
            elif attn_mask is not None:
                s = s + attn_mask
            return torch.softmax(s, dim=-1).to(q.dtype) @ v

        return attention

    @staticmethod
    def _one_patch_conv3d(conv3d):
        """Qwen2-VL's patch embedding is a conv3d whose input is exactly one kernel (patches are cut
        before), i.e. a matmul. oneDNN's fp32 conv3d took 77 ms forward and 170 ms backward per step
        here; as the matmul a qwen2vl bf16 step went from 1805 to 1409 ms (8 steps, profiled)."""
        import torch.nn.functional as F

        def wrapper(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            one = tuple(x.shape[2:]) == tuple(weight.shape[2:]) and groups == 1 and padding in (0, (0, 0, 0))
            if not one:
                return conv3d(x, weight, bias, stride, padding, dilation, groups)
            return F.linear(x.flatten(1), weight.flatten(1), bias)[:, :, None, None, None]

        return wrapper

    def __enter__(self):
        import torch.nn.functional as F

        self.autocast.__enter__()
        if self.enabled and self.device_type == "cpu":
            for name in self.FP32_OPS:
                self.saved[name] = getattr(F, name)
                setattr(F, name, self._in_fp32(self.saved[name]))
            if self.math_attention:
                F.scaled_dot_product_attention = self._attention(F.scaled_dot_product_attention)
            F.conv3d = self._one_patch_conv3d(F.conv3d)
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        for name, fn in self.saved.items():
            setattr(F, name, fn)
        self.saved = {}
        return self.autocast.__exit__(*exc)


def _batched_vision_attention(
    self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs
):
    """Qwen2-VL ``VisionAttention.forward`` for equal-length chunks: one SDPA call instead of a loop."""
    import torch
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qm

    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n_chunks, chunk = lengths.numel(), int(lengths[0])
    if chunk * n_chunks != hidden_states.shape[0] or not bool((lengths == chunk).all()):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = qm.apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(n_chunks, chunk, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq, -1))


def patch_qwen_vision_attention(model, encoder: Encoder, image_split: Split | None) -> dict:
    """Install :func:`_batched_vision_attention` on every vision block if it reproduces the original."""
    import types

    import torch

    attns = [blk.attn for blk in model.model.visual.blocks]
    report: dict[str, Any] = {"installed": False}
    if image_split is None or not len(image_split):
        return report
    px = encoder.pixels(torch.from_numpy(np.array(image_split.pixels[:2])), "image")  # a copy: the split is a read-only memmap
    with torch.no_grad():
        ref = model.model.visual(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output
        for a in attns:
            a.forward = types.MethodType(_batched_vision_attention, a)
        try:
            new = model.model.visual(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output
            diff = (ref - new).abs().max().item()
        except Exception as err:  # pragma: no cover - a transformers version with another signature
            diff, report["error"] = float("inf"), f"{type(err).__name__}: {err}"
    report["max_abs_diff"] = diff
    if diff <= 1e-4:
        report["installed"] = True
    else:  # pragma: no cover - keep the original when it does not match
        for a in attns:
            del a.forward
    return report


def unpatch_qwen_vision_attention(model) -> None:
    for blk in getattr(getattr(model.model, "visual", None), "blocks", []):
        if "forward" in blk.attn.__dict__:
            del blk.attn.forward


class AuxHead:
    """Auxiliary vision losses (training only; the heads are not saved with the model).

    * presence: multi-label object presence (:func:`aux_targets`) from llava's ``pooler_output`` (the
      last layer's [CLS], post-norm) or qwen2vl's mean merged token of each image;
    * dense: each visual token the LLM reads (llava: the feature layer's patch tokens; qwen2vl: the
      merged tokens, frames too) classifies the object it shows (:func:`token_labels`). This supervises
      every token with where the objects are, which a ViT trained from scratch otherwise learns very slowly.

    A forward hook on the vision tower captures the features during the model's own forward pass.
    """

    def __init__(self, model, kind: str, n_presence: int, device):
        import torch

        self.kind = kind
        self.pooled = self.tokens = None
        if kind == "llava":
            module, width = model.model.vision_tower, model.config.vision_config.hidden_size
            self.feature_layer = model.config.vision_feature_layer
        else:
            module, width = model.model.visual, model.config.text_config.hidden_size
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(12345)  # the heads' init must not depend on (or shift) the model's RNG stream
        self.presence = torch.nn.Linear(width, n_presence).to(device)
        self.dense = torch.nn.Linear(width, N_PATCH_CLASSES).to(device)
        torch.random.set_rng_state(generator_state)
        # Background is ~90% of the tokens: weigh it down so objects dominate the dense loss.
        self.class_weight = torch.ones(N_PATCH_CLASSES, device=device)
        self.class_weight[BACKGROUND] = 0.2
        module.register_forward_hook(self._hook)

    def parameters(self):
        return list(self.presence.parameters()) + list(self.dense.parameters())

    def _hook(self, module, args, output):
        if self.kind == "llava":
            self.pooled = output.pooler_output
            hs = getattr(output, "hidden_states", None)
            self.tokens = hs[self.feature_layer][:, 1:] if hs is not None else None
        else:
            out = output.pooler_output if hasattr(output, "pooler_output") else output
            self.tokens = out if hasattr(out, "shape") else None
            self.pooled = None
        return None  # a returned value would replace the output

    def loss(self, presence_targets, token_targets, n_items: int):
        """Sum of the presence loss (images) and the dense loss; None when the hook saw nothing."""
        import torch.nn.functional as F

        # fp32 heads (outside --precision bf16's autocast): qwen2vl's merger output is bf16 there
        pooled, tokens = (None if t is None else t.float() for t in (self.pooled, self.tokens))
        self.pooled = self.tokens = None
        total = None
        if tokens is not None and token_targets is not None:
            logits = self.dense(tokens.reshape(-1, tokens.shape[-1]))
            total = F.cross_entropy(logits, token_targets.reshape(-1).long(), weight=self.class_weight)
        if presence_targets is not None and tokens is not None:
            if pooled is None:  # qwen2vl: mean merged token per image
                pooled = tokens.reshape(n_items, -1, tokens.shape[-1]).mean(dim=1)
            p = F.binary_cross_entropy_with_logits(self.presence(pooled), presence_targets)
            total = p if total is None else total + p
        return total


class WhereProbe:
    """Row and column of each object's visual token, read by two linear heads from the LLM's hidden
    state halfway up (training only; not saved with the model, like :class:`AuxHead`).

    ``grounding_loss``'s ``where`` term asks one output distribution to name two digits, so it says
    *which* digits but not which is the row: probed at the shape word, shipped testbed-llava (S7, 1161
    steps with ``--position-hints``) named the first object's row 86% right and its column 14%
    (chance: 12.5%) on the 50 validation position questions. Separate heads keep the two apart in
    the residual stream where the middle layers' attention reads them.
    """

    def __init__(self, model, grids: dict[str, int], device):
        import torch

        text = model.config.text_config
        self.layer = text.num_hidden_layers // 2  # hidden_states[k]: the output of decoder layer k
        state = torch.random.get_rng_state()
        torch.manual_seed(54321)  # the heads' init must not depend on (or shift) the model's RNG stream
        self.heads = {m: torch.nn.Linear(text.hidden_size, 2 * g).to(device) for m, g in grids.items()}
        torch.random.set_rng_state(state)
        self.grids = grids

    def parameters(self):
        return [p for h in self.heads.values() for p in h.parameters()]

    def loss(self, hidden_states, input_ids, media_token: int, token_targets, table, modality: str):
        """Mean cross-entropy of row and column over the object tokens (plates and background excluded)."""
        import torch.nn.functional as F

        pos, _, _, obj = _named_tokens(input_ids, media_token, token_targets, table)
        if not bool(obj.any()):
            return hidden_states[self.layer].sum() * 0.0
        g = self.grids[modality]
        row, col = _row_col(obj, g)
        out = self.heads[modality](hidden_states[self.layer][pos][obj].float())
        return (F.cross_entropy(out[:, :g], row) + F.cross_entropy(out[:, g:], col)) / 2


def word_targets(tokenizer, device):
    """``(N_PATCH_CLASSES, 2)`` token ids naming each dense class: (colour, shape) for an object, the
    character twice for a plate, -1 for background. See :func:`grounding_loss`."""
    import torch

    from .shapes import COLOURS, DIGITS, LETTERS, SHAPES

    ids = lambda w: tokenizer.convert_tokens_to_ids(w)  # noqa: E731 - word-level vocabulary
    table = torch.full((N_PATCH_CLASSES, 2), -1, dtype=torch.long)
    for s in SHAPES:
        for c in COLOURS:
            table[_object_class(s, c)] = torch.tensor([ids(c), ids(s)])
    for ch in LETTERS + DIGITS:
        table[_char_class(ch.lower())] = ids(ch.lower())
    if (table[:BACKGROUND] < 0).any() or (table[:BACKGROUND] == tokenizer.unk_token_id).any():
        raise ValueError("the tokenizer lacks a colour, shape or character word")
    return table.to(device)


def drop_background(batch: dict, media_token: int, token_targets, p: float, rng: np.random.Generator) -> int:
    """Hide a random part of each sample's background visual tokens from the LLM, in place; returns
    how many were hidden.

    With probability ``p`` a sample loses a fraction ~ U(0, 0.9) of its background tokens (objects and
    plates always stay): ``attention_mask`` goes to 0 there while ``position_ids`` keep the original
    positions, which is exactly what pruning those tokens does (the engine's equivalence tests). A
    model that only ever saw 64 tokens per image counts by averaging over all of them: shipped
    testbed-llava (S7) answered ``count`` 90% right unpruned but 16-37% under every policy at 25%,
    while colour, existence and text kept their unpruned accuracy with the policies that keep the
    objects. On 50 validation count questions (answer token, teacher-forced), keeping *every* object
    token and background up to 16 of 64 took it from 94% to 30%, no better than 16 random tokens
    (30%); 625 steps with ``P = 0.5`` made that 78% -> 68% (random: 26%). Real VLMs see varying
    token counts too (any-resolution tiling, Qwen2-VL's dynamic resolution).
    """
    import torch

    if p <= 0:
        return 0
    if "position_ids" not in batch:  # the model would derive positions from the mask: not pruning
        raise ValueError("drop_background: the batch has no position_ids (qwen2vl needs cached M-RoPE ids)")
    pos = batch["input_ids"] == media_token
    background = (token_targets.reshape(pos.shape[0], -1) == BACKGROUND).cpu().numpy()  # clips: frames flat
    hidden = 0
    for i in range(pos.shape[0]):
        if rng.random() >= p:
            continue
        cols = pos[i].nonzero().flatten()
        bg = np.flatnonzero(background[i])
        k = int(len(bg) * rng.uniform(0.0, 0.9))
        if k:
            drop = torch.from_numpy(rng.choice(bg, size=k, replace=False)).to(cols.device)
            batch["attention_mask"][i, cols[drop]] = 0
            hidden += k
    return hidden


def _named_tokens(input_ids, media_token: int, token_targets, table):
    """Visual positions (a mask over ``input_ids``), the words naming each visual token (``(n, 2)``:
    colour and shape, a plate's character twice, -1 for background), which tokens show something and
    which show an object (not a plate)."""
    pos = input_ids == media_token
    labels = token_targets.reshape(-1).long()
    if int(pos.sum()) != labels.numel():  # pragma: no cover - the encoder expands media exactly
        raise ValueError(f"{int(pos.sum())} visual positions for {labels.numel()} token labels")
    words = table[labels]
    keep = words[:, 0] >= 0
    return pos, words, keep, keep & (words[:, 0] != words[:, 1])  # plates name their character twice


def _row_col(mask, grid: int):
    """Row and column, in a ``grid`` x ``grid`` layout (per frame for clips), of the visual tokens
    ``mask`` selects (tokens are in raster order, ``grid * grid`` per image or frame)."""
    import torch

    cell = torch.arange(mask.numel(), device=mask.device)[mask] % (grid * grid)
    return cell // grid, cell % grid


def grounding_loss(logits, input_ids, media_token: int, token_targets, table, where=None):
    """The LLM names what each visual token shows, in its own output vocabulary.

    At every visual-token position holding an object, the LM head's log-probabilities of the object's
    words (colour and shape, or the character) are raised (mean of the two); background tokens are
    left free. A question about an object then only needs attention to the right visual token: the
    value to copy is already written in the words the answer uses. Without it testbed-llava sat on the
    answer priors for 300 CPU steps of 32 (25% val accuracy; qwen2vl likewise for the 123 steps it ran)
    although the vision tower's dense loss fell.

    ``where = (grid, digit_ids, weight)`` also makes an object's token name its cell, row and column
    digits of the ``grid`` x ``grid`` layout (per frame for clips), added with ``weight``. Nothing
    else asks the LLM's visual positions to keep where they are, and "where is the red star relative
    to the blue cross?" needs both cells: testbed-llava answered it at chance (22-24%) after 3600
    steps while colour was at 98% (see ``--where-weight``).
    """
    import torch

    pos, words, keep, objects = _named_tokens(input_ids, media_token, token_targets, table)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits[pos][keep].float(), dim=-1)
    loss = -logp.gather(1, words[keep]).mean()
    if where is not None:
        grid, digits, weight = where
        obj = objects[keep]
        if bool(obj.any()):
            rc = digits[torch.stack(_row_col(keep, grid), dim=1)]  # (n, 2) digit ids
            loss = loss - weight * logp[obj].gather(1, rc[obj]).mean()
    return loss


# ----------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, processor, split: Split, device, batch_size: int = 64, limit: int | None = None) -> dict:
    """Greedy ``generate`` through the processor (as the eval runs it); exact match per kind and overall.

    Video clips get :func:`chroma_subsample` (the eval reads them from mp4).
    """
    import torch
    from PIL import Image

    was_training = model.training
    model.eval()
    n = len(split) if limit is None else min(limit, len(split))
    hits: dict[str, list[float]] = {}
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            idx = range(s, min(n, s + batch_size))
            texts = [
                processor.apply_chat_template(
                    chat_messages(testbed_prompt(split.questions[i]), split.modality),
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for i in idx
            ]
            if split.modality == "image":
                media = {"images": [Image.fromarray(np.asarray(split.pixels[i])) for i in idx]}
            else:
                media = {"videos": [chroma_subsample(np.asarray(split.pixels[i])) for i in idx]}
            inputs = processor(text=texts, padding=True, return_tensors="pt", **media).to(device)
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            preds = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, p in zip(idx, preds):
                hits.setdefault(split.kinds[i], []).append(float(normalize_answer(p) == split.answers[i]))
    model.train(was_training)
    per_kind = {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}
    total = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return {"accuracy": round(total, 4), "per_kind": per_kind, "n": n}


# ----------------------------------------------------------------------------------------------------
# Training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help`` lists them).

    Example:
        >>> a = parse_args(["--model", "llava", "--out", "x"]); a.steps, a.batch_size
        (1400, 32)
    """
    ap = argparse.ArgumentParser(prog="python -m mmprune.testbed.train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("llava", "qwen2vl"), required=True)
    ap.add_argument("--out", required=True, help="folder for the model, processor and train_log.json")
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: the CPU configuration's)"
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the training loop: sets --steps from the measured step time (ignored with --steps)",
    )
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument(
        "--data-cache", default=None, help="folder to keep generated data in (reused when present)"
    )
    ap.add_argument("--train-images", type=int, default=None, help="distinct shapes training images")
    ap.add_argument("--train-clips", type=int, default=None, help="distinct motion training clips (qwen2vl; 0: images only, motion still tested)")
    ap.add_argument("--val-items", type=int, default=250, help="validation items per task")
    ap.add_argument("--test-items", type=int, default=500, help="test items per task (the eval's 500)")
    ap.add_argument("--evals", type=int, default=6, help="validation evaluations during training")
    ap.add_argument("--log-every", type=int, default=100, help="steps between loss records")
    ap.add_argument(
        "--workers", type=int, default=None, help="data generation processes (default: CPU count)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--aux-weight", type=float, default=AUX_WEIGHT)
    ap.add_argument("--ground-weight", type=float, default=GROUND_WEIGHT, help="see grounding_loss")
    ap.add_argument(
        "--position-hints", type=int, choices=(0, 1), default=0,
        help="label the first object's row and column in position questions (see Encoder.early_labels)",
    )  # fmt: skip
    ap.add_argument(
        "--where-weight", type=float, default=0.0,
        help="weight of the row/column digits in the grounding loss (see grounding_loss; 0: off)",
    )  # fmt: skip
    ap.add_argument(
        "--where-probe", type=float, default=0.0,
        help="weight of the row/column heads on the LLM's middle hidden state (see WhereProbe; 0: off)",
    )  # fmt: skip
    ap.add_argument(
        "--drop-background", type=float, default=0.0, metavar="P",
        help="odds that a sample hides up to 90%% of its background visual tokens (see drop_background; 0: off)",
    )  # fmt: skip
    ap.add_argument("--video-turns", type=int, default=None, help="questions per training clip (default: --turns)")
    ap.add_argument(
        "--early-answer", type=int, choices=(0, 1), default=1,
        help="also supervise the answer right after the question's key word (see Encoder.early_labels)",
    )  # fmt: skip
    ap.add_argument(
        "--stop-at", type=int, default=None,
        help="stop after this many steps of the --steps schedule (reproduces a run stopped at a checkpoint)",
    )  # fmt: skip
    ap.add_argument(
        "--init-from", default=None,
        help="start from the weights in this folder (one this script wrote); its train_log.json is kept in ours",
    )  # fmt: skip
    ap.add_argument(
        "--kind-weights", default=None, metavar="KIND=W,...",
        help="odds of each question kind in the extra turns (default: all 1), e.g. count=3,position=3,colour=0.5",
    )  # fmt: skip
    ap.add_argument(
        "--turns", type=int, default=TURNS,
        help="questions per training image (a multi-turn conversation; the first is the item's own)",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="hard limit for the whole run: training stops early (logged) to leave time for the test",
    )
    ap.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32",
        help="bf16: autocast the training forward pass to bfloat16 (fp32 weights, optimizer and evaluation; see Bf16Autocast)",
    )  # fmt: skip
    ap.add_argument(
        "--bf16-attention", type=int, choices=(0, 1), default=0,
        help="with --precision bf16 on the CPU: bf16 math attention where it beats fp32 flash (see Bf16Autocast._attention)",
    )  # fmt: skip
    ap.add_argument(
        "--video-from", type=int, default=0, metavar="STEP",
        help="qwen2vl: image steps only before STEP, then images and clips alternate (0: alternate from the start)",
    )  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="a tiny model (tests only)")
    args = ap.parse_args(argv)  # fmt: skip
    d = DEFAULTS[args.model]
    if args.steps is None and args.time_budget is None:
        args.steps = d["steps"]
    for k in ("batch_size", "lr", "train_images", "train_clips"):
        if getattr(args, k) is None:
            setattr(args, k, d[k])
    if args.model == "llava":
        args.train_clips = 0
    args.kind_weights = _kind_weights(ap, args.kind_weights)
    return args


QUESTION_KINDS = ("colour", "count", "position", "exists", "text", "direction", "order", "colour_change")


def _kind_weights(ap: argparse.ArgumentParser, text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        kind, _, w = part.partition("=")
        try:
            out[kind.strip()] = float(w)
        except ValueError:
            ap.error(f"--kind-weights: {part!r} is not KIND=NUMBER")
        if kind.strip() not in QUESTION_KINDS or out[kind.strip()] < 0:
            ap.error(f"--kind-weights: {part!r}: kinds are {', '.join(QUESTION_KINDS)}, weights >= 0")
    return out


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python -m mmprune.testbed.train " + " ".join(shlex.quote(a) for a in args)


def _reproduce(argv: list[str] | None, steps: int, total: int | None = None) -> str:
    """The command that replays this run up to ``steps`` (of a ``total``-step schedule, if it differs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--time-budget", "--steps", "--stop-at", "--max-seconds"):
            skip = True
            continue
        if a.startswith(("--time-budget=", "--steps=", "--stop-at=", "--max-seconds=")):
            continue
        out.append(a)
    tail = ["--steps", str(steps)] if total is None or total == steps else ["--steps", str(total), "--stop-at", str(steps)]
    return "python -m mmprune.testbed.train " + " ".join(shlex.quote(a) for a in out + tail)


def build_processor(kind: str, out: Path):
    """The test-bed processor, saved into ``out``; its Qwen2-VL video processor is always the torchvision-free one.

    Other transformers versions may fail to *reload* a Qwen2-VL processor (the saved files are fine):
    then the processor is assembled in memory from the same parts, as ``build_qwen2vl_processor`` does.
    """
    from . import vocab

    if kind == "llava":
        return vocab.build_llava_processor(out, patch_size=MODEL_OVERRIDES["llava"]["patch_size"])
    try:
        processor = vocab.build_qwen2vl_processor(out)
    except Exception as err:  # any reload failure: the parts themselves are version-independent
        print(f"reloading the saved Qwen2-VL processor failed ({type(err).__name__}: {err}); assembling it")
        processor = vocab._make_processor(
            "Qwen2VLProcessor",
            image_processor=vocab._pil_image_processor(
                "Qwen2VLImageProcessor", min_pixels=56 * 56, max_pixels=28 * 28 * 256
            ),
            tokenizer=vocab.build_tokenizer("qwen2vl"),
            video_processor=vocab.Qwen2VLVideoProcessorNoTV(min_pixels=56 * 56, max_pixels=28 * 28 * 256),
            chat_template=vocab.CHAT_TEMPLATES["qwen2vl"],
        )
    # Same video path everywhere (transformers' own needs torchvision; this one is checked equal to it).
    if not isinstance(processor.video_processor, vocab.Qwen2VLVideoProcessorNoTV):
        size = processor.video_processor.size
        processor.video_processor = vocab.Qwen2VLVideoProcessorNoTV(
            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
        )
    return processor


def _median_ms(seconds: list[float]) -> float | None:
    return round(1000 * float(np.median(seconds)), 1) if seconds else None


def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from the heap and keep freed memory, not to map and unmap
    them each time: every fresh mapping is zero-filled page by page on first touch. A batch of 32
    clips (77 MB as float32) took 22 ms to convert to float instead of 3.5 ms, and a qwen2vl step's
    input preparation 330 instead of 164 ms (clips) and 115 instead of 34 ms (images), 2 threads.
    The same as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``, for this process only; the
    training script's memory then stays at its peak. Returns False where there is no glibc ``mallopt``.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def main(argv: list[str] | None = None) -> dict:
    """Run the training; returns the log written to ``OUT/train_log.json``."""
    args = parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts
    import torch
    import transformers

    from . import vocab

    t_start = time.time()
    kept_memory = keep_freed_memory()  # speed only: every number computed is the same
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # tiny matmuls; TF32 keeps them fast and deterministic
        torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or os.cpu_count() or 1

    def log(msg: str) -> None:
        print(f"[{args.model} {time.time() - t_start:7.1f}s] {msg}", flush=True)

    # -- processor and data ------------------------------------------------------------------------
    processor = build_processor(args.model, out)
    t0 = time.time()
    train = {
        "image": generate_split("image", "train", args.train_images, args.seed, workers, args.data_cache)
    }
    val = {
        "image": generate_split("image", "validation", args.val_items, args.seed, workers, args.data_cache)
    }
    test = {"image": generate_split("image", "test", args.test_items, 0, workers, args.data_cache)}
    if args.model == "qwen2vl":
        if args.train_clips > 0:
            train["video"] = generate_split(
                "video", "train", args.train_clips, args.seed, workers, args.data_cache
            )
        val["video"] = generate_split(
            "video", "validation", args.val_items, args.seed, workers, args.data_cache
        )
        test["video"] = generate_split("video", "test", args.test_items, 0, workers, args.data_cache)
    data_seconds = time.time() - t0
    log(f"data: {', '.join(f'{k} {len(v)}' for k, v in train.items())} train items in {data_seconds:.0f}s")

    # -- model ---------------------------------------------------------------------------------------
    overrides = dict(TINY_OVERRIDES[args.model] if args.tiny else MODEL_OVERRIDES[args.model])
    model = vocab.build_testbed_model(args.model, processor.tokenizer, seed=args.seed, **overrides).to(device)
    previous = None
    if args.init_from:  # continue training saved weights (same architecture); its log is kept in ours
        src = Path(args.init_from)
        if not (src / "model.safetensors").is_file():
            raise ValueError(f"--init-from {src}: no model.safetensors there (a folder this script wrote)")
        saved = type(model).from_pretrained(src, dtype=torch.float32)  # maps saved names to module names
        model.load_state_dict(saved.state_dict(), strict=True)
        del saved
        log_file = src / "train_log.json"
        previous = json.loads(log_file.read_text()) if log_file.is_file() else None
        if previous is not None:
            previous = {k: v for k, v in previous.items() if k != "fast_path_check"}
    encoder = Encoder(args.model, processor, device, early_answer=bool(args.early_answer))
    check = fast_path_check(encoder, {k: v for k, v in val.items()})
    log(f"fast path vs processor: {check}")
    vision_patch = (
        patch_qwen_vision_attention(model, encoder, train["image"]) if args.model == "qwen2vl" else {}
    )
    fast_positions = enable_fast_positions(model, encoder, val) if args.model == "qwen2vl" else {}
    log(f"vision attention patch: {vision_patch}; cached M-RoPE ids: {fast_positions}")
    aux = AuxHead(model, args.model, train["image"].aux.shape[1], device) if args.aux_weight > 0 else None
    words = word_targets(processor.tokenizer, device)
    digit_ids = torch.tensor(encoder.digit_ids, device=device)
    where_grid = {"image": IMAGE_SIZE // CELL, "video": CLIP_SIZE // CELL}  # cells per side (one token each)
    where_probe = WhereProbe(model, where_grid, device) if args.where_probe > 0 else None
    params = list(model.parameters()) + (aux.parameters() if aux else []) + (where_probe.parameters() if where_probe else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        **({"fused": True} if use_cuda else {}),
    )

    # Whole datasets on the GPU as uint8 (a few GB): batches are then pure indexing.
    on_device = {}
    if use_cuda:
        for k, s in train.items():
            on_device[k] = torch.from_numpy(np.ascontiguousarray(s.pixels)).to(device)
    aux_t = {k: torch.from_numpy(s.aux).to(device) for k, s in train.items() if s.aux is not None}
    tok_t = {k: torch.from_numpy(s.tokens[args.model]).to(device) for k, s in train.items()}

    rng = np.random.default_rng(args.seed)
    modalities = list(train)  # trained; val and test may hold more (qwen2vl --train-clips 0: images only)
    order = {k: np.empty(0, np.int64) for k in modalities}
    cursor = dict.fromkeys(modalities, 0)

    def next_indices(modality: str) -> np.ndarray:
        # Epoch-wise permutations from one seeded generator: the data order depends on the seed only.
        if cursor[modality] + args.batch_size > len(order[modality]):
            rest = order[modality][cursor[modality] :]
            order[modality] = np.concatenate([rest, rng.permutation(len(train[modality]))])
            cursor[modality] = 0
        idx = order[modality][cursor[modality] : cursor[modality] + args.batch_size]
        cursor[modality] += args.batch_size
        return idx

    total = args.steps
    # Step time is measured over steps [probe_from, probe): the first ones pay for CUDA start-up.
    probe = max(2, min(60, args.warmup // 2))
    probe_from = max(1, probe // 3)
    history, window = [], []
    eval_seconds, eval_points = 0.0, set()

    def schedule_evals(total_steps: int) -> set[int]:
        return {round(total_steps * (i + 1) / args.evals) for i in range(max(0, args.evals - 1))}

    if total is not None:
        eval_points = schedule_evals(total)

    def steps_in_budget(per_step: float) -> int:
        """--time-budget: the total that fills what is left of it, the remaining evaluations included."""
        budget = args.time_budget - (time.time() - t_train) - per_eval * (args.evals - 1)
        return max(step + 1, step + int(budget / per_step), args.warmup + 1)

    def run_val(step: int) -> dict:
        nonlocal eval_seconds
        t = time.time()
        res = {k: evaluate(model, processor, val[k], device) for k in val}
        eval_seconds += time.time() - t
        return res

    task_name = {"image": "shapes", "video": "motion"}

    def history_evals() -> list[dict]:
        return [h for h in history if "val" in h]

    def write_log(step: int, final: dict, test_seconds: float, complete: bool) -> dict:
        """train_log.json: written at every checkpoint (complete=False) and at the end."""
        record = {
            "model": args.model,
            "complete": complete,
            "stopped_early": stopped_early,
            "command": _command(argv),
            "reproduce_command": _reproduce(argv, step, total),
            "seed": args.seed,
            "steps": step,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": args.weight_decay,
            "aux_weight": args.aux_weight,
            "turns": args.turns,
            "video_turns": args.video_turns if args.video_turns is not None else args.turns,
            "video_from": args.video_from,
            "early_answer": bool(args.early_answer),
            "kind_weights": args.kind_weights,
            "ground_weight": args.ground_weight,
            "where_weight": args.where_weight,
            "where_probe": args.where_probe,
            "drop_background": args.drop_background,
            "position_hints": bool(args.position_hints),
            "bare_prompt_fraction": BARE_PROMPT_FRACTION,
            "precision": args.precision,
            "bf16_attention": bool(args.bf16_attention),
            "keep_freed_memory": kept_memory,
            "train_items": {task_name[k]: len(v) for k, v in train.items()},
            "device": torch.cuda.get_device_name(device)
            if use_cuda
            else f"cpu ({torch.get_num_threads()} threads)",
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },  # fmt: skip
            "wall_seconds": {
                "total": round(time.time() - t_start, 1),
                "data": round(data_seconds, 1),
                "train": round(time.time() - t_train, 1) if complete is False else round(train_seconds, 1),
                "val_evals": round(eval_seconds, 1),
                "test": round(test_seconds, 1),
            },  # fmt: skip
            "ms_per_step_median": _median_ms([t for _, t in step_times]),
            "ms_per_step_median_by_task": {
                task_name[m]: _median_ms([t for k, t in step_times if k == m])
                for m in modalities
                if m in {k for k, _ in step_times}
            },  # fmt: skip
            "model_overrides": overrides,
            "init_from": previous,
            "parameters": vocab.count_parameters(model),
            "fast_path_check": check,
            "vision_attention_patch": vision_patch,
            "cached_mrope_positions": fast_positions,
            "motion_frames": "rendered frames with yuv420 chroma subsampling (eval reads mp4)"
            if "video" in train
            else None,
            "val": {task_name[k]: v for k, v in final.get("val", {}).items()},
            "test": {task_name[k]: v for k, v in final.get("test", {}).items()},
            "history": history,
        }
        (out / "train_log.json").write_text(json.dumps(record, indent=1))
        return record

    amp = Bf16Autocast(device.type, args.precision == "bf16", bool(args.bf16_attention))  # re-entered each step
    model.train()
    torch.manual_seed(args.seed + 1)  # dropout-free model; this only pins any stray randomness
    t_train = time.time()
    step_times: list[tuple[str, float]] = []  # (modality, seconds): image and clip steps differ
    step = 0
    train_seconds = 0.0
    stopped_early = False
    while total is None or step < total:
        if args.max_seconds is not None and step > 0:
            # Leave room for saving and the test evaluation (two val evaluations' worth, plus a margin).
            reserve = 30.0 + 2.5 * eval_seconds / max(1, len(history_evals()))
            if time.time() - t_start > args.max_seconds - reserve:
                stopped_early = True
                log(f"--max-seconds {args.max_seconds:.0f}: stopping at step {step} of {total}")
                break
        if args.stop_at is not None and step >= args.stop_at:
            stopped_early = True  # a stage that ends before its schedule does (see --stop-at)
            break
        # Alternating clips from step 0 stalled shapes at 0.54 in an hour; images alone reached 0.97.
        modality = "image" if step < args.video_from else modalities[(step - args.video_from) % len(modalities)]
        idx = next_indices(modality)
        bare = rng.random(len(idx)) < BARE_PROMPT_FRACTION
        idx_t = torch.from_numpy(idx)
        if modality in on_device:
            pix = on_device[modality][idx_t.to(device)]
        else:
            pix = torch.from_numpy(np.stack([np.asarray(train[modality].pixels[i]) for i in idx]))
        if modality == "video":
            pix = chroma_subsample(pix)
        follow = None
        turns = args.turns if modality == "image" or args.video_turns is None else args.video_turns
        if turns > 1 and train[modality].scenes:
            follow = [
                follow_turns(train[modality].scenes[i], train[modality].questions[i], turns - 1, rng, args.kind_weights)
                for i in idx
            ]
        hints = None
        if args.position_hints and modality == "image":
            hints = [position_hints(train[modality].scenes[i]) for i in idx]
        batch = encoder.batch(train[modality], idx, bare, pixels=pix, follow=follow, hints=hints)
        tokens = tok_t[modality][idx_t.to(device)]  # each visual token's dense class
        if args.drop_background > 0:
            drop_background(batch, encoder.media_token[modality], tokens, args.drop_background, rng)
        lr = _lr_at(step, total if total is not None else 10**9, args.warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        t_step = time.time()
        with amp:
            outputs = model(**batch, **({"output_hidden_states": True} if where_probe else {}))
        loss = outputs.loss
        extra = []  # weighted auxiliary terms
        if aux is not None:
            targets = aux_t[modality][idx_t.to(device)] if modality in aux_t else None
            a = aux.loss(targets, tokens, len(idx))
            if a is not None:
                extra.append(args.aux_weight * a)
        if args.ground_weight > 0:
            extra.append(args.ground_weight * grounding_loss(
                outputs.logits, batch["input_ids"], encoder.media_token[modality], tokens, words,
                (where_grid[modality], digit_ids, args.where_weight) if args.where_weight > 0 else None,
            ))  # fmt: skip
        if where_probe is not None:
            extra.append(args.where_probe * where_probe.loss(
                outputs.hidden_states, batch["input_ids"], encoder.media_token[modality], tokens, words, modality,
            ))  # fmt: skip
        aux_loss = sum(extra) if extra else None
        total_loss = loss + aux_loss if aux_loss is not None else loss
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append((modality, loss.item(), aux_loss.item() if aux_loss is not None else None))
        step_times.append((modality, time.time() - t_step))
        step += 1
        if step == probe_from:
            t_probe = time.time()
        if total is None and step == probe:
            # Choose the step count from the budget: the warm-up so far is the same for any total.
            per_step = (time.time() - t_probe) / (probe - probe_from)
            t = time.time()
            history.append({"step": step, "val": run_val(step)})  # also measures what an evaluation costs
            per_eval = time.time() - t
            total = steps_in_budget(per_step)
            eval_points = schedule_evals(total)
            log(
                f"time budget {args.time_budget:.0f}s: {per_step * 1000:.0f} ms/step, eval {per_eval:.1f}s -> {total} steps"
            )
        elif args.steps is None and step == args.warmup > probe:
            # Measure again at the end of the warm-up, whose learning rates do not depend on the total:
            # early steps run slower (a qwen2vl run: 654 ms over steps 20-60, 515 ms later on), so the
            # first estimate left a quarter of the budget unused. The schedule is still one cosine.
            per_step = (time.time() - t_probe - eval_seconds) / (step - probe_from)
            total = steps_in_budget(per_step)
            eval_points = schedule_evals(total)
            log(f"time budget, measured again at step {step}: {per_step * 1000:.0f} ms/step -> {total} steps")
        if (
            step in eval_points
            or step == total
            or (step % args.log_every == 0 and total is not None and step < total)
        ):
            rec = {"step": step, "lr": round(lr, 7), "seconds": round(time.time() - t_train, 1)}
            for m in modalities:
                ls = [w[1] for w in window if w[0] == m]
                if ls:
                    rec[f"loss_{m}"] = round(float(np.mean(ls)), 4)
            al = [w[2] for w in window if w[2] is not None]
            if al:
                rec["aux_loss"] = round(float(np.mean(al)), 4)
            window = []
            if step in eval_points or step == total:
                rec["val"] = run_val(step)
            history.append(rec)
            if "val" in rec and step < total:  # a usable checkpoint even if the run is cut short
                model.save_pretrained(out)
                write_log(step, {"val": rec["val"]}, 0.0, complete=False)
            log(json.dumps(rec))
    train_seconds = time.time() - t_train

    # -- save and test -------------------------------------------------------------------------------
    unpatch_qwen_vision_attention(model)
    model.save_pretrained(out)
    t = time.time()
    if not history or history[-1].get("step") != step or "val" not in history[-1]:
        history.append({"step": step, "val": run_val(step)})
    final = {"val": history[-1]["val"], "test": {}}
    for k in test:
        final["test"][k] = evaluate(model, processor, test[k], device)
    test_seconds = time.time() - t
    record = write_log(step, final, test_seconds, complete=True)
    log(f"test: {json.dumps(record['test'])}")
    return record


if __name__ == "__main__":
    main()

"""``mmprune show``: draw which visual tokens each stage kept, on the image the model actually saw.

The picture is rebuilt from the model's own ``pixel_values`` (after resize / crop / normalisation), so
each cell of the drawn grid is exactly one visual token: LLaVA-1.5 (square patch grid) and the Qwen-VL
family (2x2-merged patch grid, reassembled from the flattened patches). Kept tokens stay bright; dropped
ones are dimmed; one panel per stage, in stage order, each panel's survivors mapped to original cells.

Example:
    $ mmprune show --model testbed-llava --image cat.png --prompt "what colour is the star?" \\
        --policy fastv --budget 0.25 --out kept.png
"""

from __future__ import annotations

import argparse

from .command import number

HELP = "draw the kept / dropped visual tokens of each stage on the image's patch grid"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local save_pretrained folder, hub id, or a built-in alias")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--policy", required=True)
    p.add_argument("--budget", type=number, required=True)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="kept.png")


def _denorm(processor, chw):
    import numpy as np

    ip = processor.image_processor
    mean = np.array(getattr(ip, "image_mean", [0.5] * 3)).reshape(3, 1, 1)
    std = np.array(getattr(ip, "image_std", [0.5] * 3)).reshape(3, 1, 1)
    img = (chw * std + mean).clip(0, 1)
    return (img.transpose(1, 2, 0) * 255).astype("uint8")


def model_view(model, processor, inputs):
    """(H x W x 3 uint8 picture the model saw, (rows, cols) of its token grid, pixels per cell)."""

    fam = model.config.model_type
    pv = inputs["pixel_values"].float().cpu().numpy()
    if fam == "llava":
        ps = model.config.vision_config.patch_size
        img = _denorm(processor, pv[0])
        return img, (img.shape[0] // ps, img.shape[1] // ps), ps
    if fam.startswith("qwen"):
        vc = model.config.vision_config
        t, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        m, ps, tp = vc.spatial_merge_size, vc.patch_size, vc.temporal_patch_size
        # Qwen2-VL flattens patches as (t, h/m, w/m, m, m) x (C, tp, ps, ps): undo it for the first frame.
        x = pv[: t * h * w].reshape(t, h // m, w // m, m, m, 3, tp, ps, ps)[0, :, :, :, :, :, 0]
        x = x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, h * ps, w * ps)
        return _denorm(processor, x), (h // m, w // m), ps * m
    raise ValueError(f"mmprune show supports llava and the qwen2_vl family (images); got model_type {fam!r}")


def run(args) -> int:
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    import mmprune

    from .runner import load_model
    from .tasks import _decode_image

    if not Path(args.image).exists():
        raise ValueError(f"--image not found: {args.image}")
    mmprune.PruneConfig(args.policy, args.budget, args.layer)
    try:
        image = _decode_image(args.image)  # a folder, FIFO or corrupt file: one line, before the model loads
    except ValueError as e:
        raise ValueError(f"--image: {e}") from None
    model, processor = load_model(args.model, args.device, args.dtype)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    dev = next(model.parameters()).device
    inputs = {k: v.to(dev) if hasattr(v, "to") else v for k, v in inputs.items()}
    if model.config.model_type not in ("llava",) and not model.config.model_type.startswith("qwen"):
        raise ValueError(f"mmprune show supports llava and the qwen2_vl family (images); got {model.config.model_type!r}")
    mmprune.wrap(model, args.policy, budget=args.budget, layer=args.layer)
    with torch.no_grad():
        model(**inputs)
    tr = mmprune.trace(model)
    mmprune.unwrap(model)
    pic, (rows, cols), cell = model_view(model, processor, inputs)
    n = rows * cols
    panels, alive = [], np.arange(n)
    for st in tr.stages:
        alive = alive[st.kept[0].numpy()]
        keep = np.zeros(n, dtype=bool)
        keep[alive[alive < n]] = True
        im = Image.fromarray(pic).convert("RGBA")
        shade = Image.new("RGBA", im.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(shade)
        for i in range(n):
            r, c = divmod(i, cols)
            box = (c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1)
            if keep[i]:
                d.rectangle(box, outline=(255, 255, 0, 200))
            else:
                d.rectangle(box, fill=(0, 0, 0, 170))
        im = Image.alpha_composite(im, shade).convert("RGB")
        where = "pre-LLM" if st.layer is None else f"layer {st.layer}"
        label = Image.new("RGB", (im.width, 16), "white")
        ImageDraw.Draw(label).text((2, 2), f"{st.policy} {where}: {keep.sum()}/{n}", fill="black")
        panel = Image.new("RGB", (im.width, im.height + 16), "white")
        panel.paste(label, (0, 0))
        panel.paste(im, (0, 16))
        panels.append(panel)
    if not panels:
        raise ValueError("the prompt produced no visual tokens; nothing to show")
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 4
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.out)
    except (OSError, ValueError) as e:  # under a file, unwritable, unknown extension
        raise ValueError(f"cannot write --out {args.out}: {getattr(e, 'strerror', None) or e}") from None
    print(f"{args.out}: {len(panels)} stage(s), kept {tr.visual_tokens_kept[0]} of {tr.n_visual[0]} visual tokens")
    return 0

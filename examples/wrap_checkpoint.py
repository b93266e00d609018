"""Prune a real checkpoint's visual tokens, generate, see what was kept, unwrap.

    python examples/wrap_checkpoint.py                                   # llava-hf/llava-1.5-7b-hf (downloads)
    python examples/wrap_checkpoint.py --model Qwen/Qwen2.5-VL-3B-Instruct --policy fastv --image cat.jpg
    python examples/wrap_checkpoint.py --model testbed-llava             # the built-in test-bed, no download

Any supported checkpoint works (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and any
registered policy (`mmprune policies`). Without --image a picture is drawn, so the script needs no file.
"""

import argparse

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmprune

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
ap.add_argument("--image", default=None)
ap.add_argument("--policy", default="visionzip")
ap.add_argument("--budget", type=float, default=0.25)
args = ap.parse_args()
if args.model.startswith("testbed-"):  # the built-in aliases resolve to folders shipped in the package
    from mmprune.testbed.tasks import testbed_model_path

    args.model = str(testbed_model_path(args.model))
if args.image:
    image = Image.open(args.image).convert("RGB")
else:
    image = Image.new("RGB", (448, 448), "white")
    ImageDraw.Draw(image).ellipse((120, 120, 330, 330), fill="red")

model_id = args.model
model = AutoModelForImageTextToText.from_pretrained(model_id, dtype="auto", device_map="auto")
processor = AutoProcessor.from_pretrained(model_id)
mmprune.wrap(model, args.policy, budget=args.budget)  # in place: the same model object, pruned
chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
stage = mmprune.trace(model).stages[0]
print(f"{args.policy} kept {len(stage.kept[0])} of {stage.n_before[0]} visual tokens")
mmprune.unwrap(model)  # back to the original model, exactly

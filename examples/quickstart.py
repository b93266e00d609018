"""Wrap a (tiny, random) LLaVA in one call, generate, look at what was kept, unwrap.

With a real checkpoint, replace ``tiny_model`` by ``AutoModelForImageTextToText.from_pretrained(...)`` and
``make_inputs`` by ``processor(images=..., text=..., return_tensors="pt")``.

    python examples/quickstart.py
"""

import torch

import mmprune
from mmprune.testing import make_inputs, tiny_model

model = tiny_model("llava")
inputs = make_inputs(model, [[1], [1, 1]], prompt_lens=[5, 2])  # batch of 2, left-padded, 1 and 2 images

with torch.no_grad():
    reference = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    mmprune.wrap(model, "fastv", budget=0.25, layer=2)
    pruned = model.generate(**inputs, max_new_tokens=5, do_sample=False)

trace = mmprune.trace(model)
print("policies:", ", ".join(mmprune.policies()))
print("trace:", trace)
for b, kept in enumerate(trace.stages[0].kept):
    print(f"sample {b}: kept visual tokens {kept.tolist()}")
print("unpruned:", reference[:, -5:].tolist())
print("pruned:  ", pruned[:, -5:].tolist())
mmprune.unwrap(model)

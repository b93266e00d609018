"""lmms-eval plugin: run lmms-eval's 100+ benchmarks on a model pruned by mmprune.

    LMMS_EVAL_PLUGINS=mmprune.integrations.lmms_eval python -m lmms_eval --model mmprune \\
        --model_args base=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf,policy=visionzip,budget=0.25 --tasks pope

``base`` is any lmms-eval Hugging Face model name (``llava_hf``, ``llava_onevision``, ``qwen2_5_vl``,
``qwen3_vl``, ...): lmms-eval builds its own model class (its chat template and prompt handling unchanged)
and mmprune wraps the Hugging Face model inside it. ``policy``, ``budget``, ``layer`` and ``opt_<name>=value``
(policy options) configure the wrap. Each sample of lmms-eval's ``--log_samples`` carries the policy, budget and
visual tokens in and kept, as ``"mmprune"`` in its ``token_counts`` (the one per-request field its log keeps);
``log_path=FILE`` also appends them as one JSON line per request (task, doc_id, ...). Tested with lmms-eval
0.7.3 (``SUPPORTED``), including ``accelerate launch``.
"""

SUPPORTED = ("0.7.3",)

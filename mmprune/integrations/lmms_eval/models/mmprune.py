"""The ``mmprune`` model of lmms-eval: lmms-eval's own model class for ``base``, its Hugging Face model wrapped.

Example (arguments as lmms-eval passes them from ``--model_args``):
    >>> # MmpruneLMM(base="qwen2_5_vl", pretrained="Qwen/Qwen2.5-VL-7B-Instruct", policy="fastv", budget="0.25")
"""

from __future__ import annotations

import importlib.metadata

from .. import SUPPORTED

try:
    from lmms_eval.api.model import lmms
except ImportError:  # one line, naming what to install
    raise ImportError(f"mmprune's lmms-eval plugin needs lmms-eval {' or '.join(SUPPORTED)}, which is not installed: "
                      "pip install 'mmprune[lmms]'") from None

from dataclasses import dataclass

from lmms_eval.api.instance import GenerationResult, TokenCounts, unwrap_generation_output


@dataclass
class KeptCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus what mmprune kept: its sample log (``--log_samples``) writes
    ``token_counts`` through ``to_dict`` and drops a request's other fields, so this is where the policy, budget
    and visual tokens kept reach it."""

    mmprune: dict | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.mmprune is not None:
            d["mmprune"] = self.mmprune
        return d


def _with_info(output, info: dict):
    """The inner model's answer (a string or a ``GenerationResult``) with ``info`` in its token counts."""
    text, counts = unwrap_generation_output(output)
    counts = counts or TokenCounts()
    return GenerationResult(text=text, token_counts=KeptCounts(counts.input_tokens, counts.output_tokens,
                                                               counts.reasoning_tokens, mmprune=info))


def _number(text):
    if isinstance(text, (int, float)):
        return text
    try:
        return int(text)
    except ValueError:
        return float(text)


def _value(text):
    if not isinstance(text, str):
        return text
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return _number(text)
    except ValueError:
        return text


class MmpruneLMM(lmms):
    """Delegates every request to lmms-eval's model for ``base``; records, per ``generate`` call, the policy,
    budget and visual tokens kept (``self.kept``: one dict per call, in call order)."""

    def __init__(self, base: str | None = None, policy: str = "none", budget="1.0", layer=None, log_path=None,
                 **kwargs) -> None:
        super().__init__()
        self.log_path = log_path  # jsonl: one line per request (task, doc_id, policy, budget, visual tokens kept)
        import mmprune

        version = importlib.metadata.version("lmms_eval")
        if version not in SUPPORTED:
            raise ValueError(f"mmprune's lmms-eval plugin supports lmms-eval {', '.join(SUPPORTED)}; found {version}")
        if not base:
            raise ValueError("the mmprune model needs base=<an lmms-eval model name>, e.g. base=llava_hf")
        from lmms_eval.models import get_model

        options = {k[4:]: _value(v) for k, v in list(kwargs.items()) if k.startswith("opt_")}
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("opt_")}
        self.inner = get_model(base)(**kwargs)
        for own in ("task_dict", "cache_hook", "_rank", "_world_size"):  # lmms.__init__'s: the inner model's count
            self.__dict__.pop(own, None)
        self.is_simple = getattr(self.inner, "is_simple", True)
        self.policy, self.budget = policy, _number(budget)
        self.layer = None if layer in (None, "", "None", "none") else int(layer)
        hf = self.inner.model
        mmprune.wrap(hf, policy, budget=self.budget, layer=self.layer, **options)
        self.kept: list[dict] = []
        generate = hf.generate

        def recorded(*args, **kw):  # on the instance, so unwrap's restore is not needed for lmms-eval's lifetime
            out = generate(*args, **kw)
            tr = mmprune.trace(hf)
            if tr is not None:
                self.kept.append({"policy": policy, "budget": self.budget, "visual_tokens_in": tr.n_visual,
                                  "visual_tokens_kept": tr.visual_tokens_kept})
            return out

        hf.generate = recorded

    _OWN = frozenset({"inner", "kept", "policy", "budget", "layer", "is_simple", "log_path"})

    def __getattr__(self, name):  # everything lmms-eval asks of a model (accelerator, device, batch_size...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name, value):  # what the evaluator sets on the model (task_dict, ...) goes to the inner one
        if name in self._OWN or "inner" not in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def set_cache_hook(self, cache_hook) -> None:
        self.inner.set_cache_hook(cache_hook)

    @property
    def rank(self):
        return self.inner.rank

    @property
    def world_size(self):
        return self.inner.world_size

    def loglikelihood(self, requests):
        return self.inner.loglikelihood(requests)

    def generate_until(self, requests):
        """The inner model's answers, each carrying ``{"mmprune": {policy, budget, visual_tokens_in,
        visual_tokens_kept}}`` in its token counts, which lmms-eval's sample log writes. At batch size 1 the
        requests go one by one (the inner model batches nothing then), so the kept count is the request's own;
        larger batches log the policy only."""
        if str(getattr(self.inner, "batch_size", 1)) != "1":
            out = []
            for req, answer in zip(requests, self.inner.generate_until(requests)):
                info = {"policy": self.policy, "budget": self.budget}
                out.append(_with_info(answer, info))
                self._log(req, info)
            return out
        out = []
        for req in requests:
            n = len(self.kept)
            answers = self.inner.generate_until([req])
            info = {"policy": self.policy, "budget": self.budget}
            if len(self.kept) > n:
                rec = self.kept[-1]
                info.update(visual_tokens_in=rec["visual_tokens_in"][0], visual_tokens_kept=rec["visual_tokens_kept"][0])
            out.extend(_with_info(a, info) for a in answers)
            self._log(req, info)
        return out

    def _log(self, req, info: dict) -> None:
        """With ``log_path``, the same per request as one JSON line (task, doc_id and ``info``), for runs without
        ``--log_samples``."""
        if not self.log_path:
            return
        import json

        line = {"task": getattr(req, "task_name", None), "doc_id": getattr(req, "doc_id", None), **info}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def generate_until_multi_round(self, requests):
        return self.inner.generate_until_multi_round(requests)

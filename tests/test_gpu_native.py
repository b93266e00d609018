"""Issue 19's instruments: the host-sync recorder (mmprune.syncs) and the oracle cut (mmprune.bench.oracle)."""

from __future__ import annotations

import pytest
import torch

from mmprune.bench.oracle import OracleCut
from mmprune.syncs import SyncRecorder, count_syncs
from mmprune.testing import make_inputs, tiny_model


# ----------------------------------------------------------------------------- the recorder
@pytest.mark.parametrize(
    "op, name",
    [
        (lambda x: x.nonzero(), "nonzero"),
        (lambda x: torch.argwhere(x), "nonzero"),
        (lambda x: x.sum().item(), "_local_scalar_dense"),
        (lambda x: int(x[0]), "_local_scalar_dense"),
        (lambda x: bool((x > 0).any()), "_local_scalar_dense"),
        (lambda x: x[x > 1], "index[bool]"),
        (lambda x: x.masked_select(x > 1), "masked_select"),
        (lambda x: torch.unique(x), "unique"),
        (lambda x: x.tolist(), "tolist"),
        (lambda x: x.cpu(), "cpu"),
        (lambda x: x.numpy(), "numpy"),
        (lambda x: x.to("cpu"), "to_cpu"),
        (lambda x: x.repeat_interleave(x.clamp(min=0)), "repeat_interleave"),
    ],
)
def test_recorder_sees_each_host_sync(op, name):
    x = torch.arange(5)
    with SyncRecorder() as rec:
        op(x)
    assert rec.counts[name] >= 1, dict(rec.counts)


def test_recorder_ignores_sync_free_ops_and_restores_tensor_methods():
    x = torch.randn(4, 6)
    before = (torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.to)
    with SyncRecorder() as rec:
        i = x.topk(3, dim=-1).indices
        y = torch.gather(x, 1, i).sort(-1).values
        z = torch.where(y > 0, y, 0.0).cumsum(-1)
        x[:, :2] = z[:, :2]
        _ = x.to(torch.float64)
    assert not rec.counts, dict(rec.counts)
    assert (torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.to) == before


# ----------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
@torch.no_grad()
def test_oracle_cut_gives_each_layer_the_counts_and_syncs_nothing(family):
    m = tiny_model(family)
    batch = make_inputs(m, [[1], [1]], prompt_lens=[5, 3])
    n = batch["input_ids"].shape[1]
    counts = [[n - 3, n - 5]] + [[n - 3, n - 5]] + [[7, 4]] * 2
    cut = OracleCut(m, counts, n)
    rec = count_syncs(lambda: m(**batch, use_cache=True), stacks=True)
    out = m(**batch, use_cache=True)
    cut.remove()
    lens = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lens == [n - 3, n - 3, 7, 7]
    assert not any("oracle.py" in line for lines in rec.where.values() for line in lines)
    assert torch.isfinite(out.logits).all()


@torch.no_grad()
def test_oracle_before_the_llm_is_the_unwrapped_lm_on_the_shorter_prompt():
    """A pre-LLM cut is exactly the unwrapped language model run on the kept rows with their mask."""
    m = tiny_model("llava")
    batch = make_inputs(m, [[1], [1]], prompt_lens=[5, 3])
    n = batch["input_ids"].shape[1]
    got = {}
    lm = m.model.language_model
    h = lm.register_forward_hook(lambda mod, a, k, o: got.update(x=k["inputs_embeds"]), with_kwargs=True)
    cut = OracleCut(m, [[9, 6]] * 4, n)
    out = m(**batch).logits
    cut.remove()
    h.remove()
    x = got["x"]
    assert x.shape[1] == 9
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    ref = m.lm_head(lm(inputs_embeds=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
                       ).last_hidden_state)
    torch.testing.assert_close(out[:, -1], ref[:, -1])


def test_oracle_rejects_a_wrong_layer_count():
    m = tiny_model("llava")
    with pytest.raises(ValueError, match="layer_tokens has 2 layers; the model has 4"):
        OracleCut(m, [[3]] * 2, 10)

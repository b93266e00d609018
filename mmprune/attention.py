"""Attention probabilities for a few query rows, without eager attention or ``output_attentions``.

FastV-style policies need ``softmax(q_query . K^T * scale + mask)`` at one layer. Asking the model for
attention weights forces eager attention for the whole forward (users of FastV/SparseVLM report broken
or slow runs from exactly that), so we recompute the one row we need from the attention module's own
projections, inside a pre-hook on ``self_attn``: cost ``O(B * P * D * D_kv)`` for the key projection
(about 1/(3 * num_layers) of a prefill) plus ``O(B * Q * H * P * head_dim)`` for the scores.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig
    >>> from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    >>> cfg = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    >>> attn, x = LlamaAttention(cfg, 0), torch.randn(1, 5, 16)
    >>> cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(5)[None])
    >>> p = attention_probs(attn, x, (cos, sin), torch.tensor([[4]]), torch.ones(1, 5, dtype=torch.bool))
    >>> p.shape, bool(torch.allclose(p.sum(-1), torch.ones(1, 2, 1)))
    (torch.Size([1, 2, 1, 5]), True)
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, L, hd]; cos/sin: [B, L, rot] with rot <= hd (partial rotary leaves the tail untouched).
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat([xr * cos + _rotate_half(xr) * sin, xp], dim=-1)


def _head_dim(attn) -> int:
    return getattr(attn, "head_dim", None) or attn.config.hidden_size // attn.config.num_attention_heads


def pagerank_importance(attn, hidden, position_embeddings, key_valid, tau: float = 0.1, iters: int = 5,
                        k_proj: torch.Tensor | None = None) -> torch.Tensor:
    """AIM's token importance ``[B, P]`` (LaVi-Lab/AIM, ``get_importance`` in its ``modeling_qwen2.py``, commit
    edc24e9): PageRank over the layer's whole attention matrix taken at temperature ``tau``, ``iters`` steps
    from the uniform distribution, then the root mean square over heads. Cost: one full attention."""
    b, p, _ = hidden.shape
    rows = torch.arange(p, device=hidden.device).expand(b, p)
    m = attention_probs(attn, hidden, position_embeddings, rows, key_valid, tau=tau, k_proj=k_proj)  # [B, H, P, P]
    dist = torch.full((b, m.shape[1], 1, p), 1.0 / p, device=hidden.device)
    for _ in range(iters):
        dist = dist @ m
    return dist.pow(2).mean(dim=1).pow(0.5).view(b, p)


def rotary_keys(attn: torch.nn.Module, hidden: torch.Tensor, position_embeddings,
                k_proj: torch.Tensor | None = None) -> torch.Tensor:
    """The keys ``attn`` stores in its KV cache for the (normed) input ``hidden``: ``[B, H_kv, P, head_dim]``,
    fp32, after k_norm (Qwen3) and RoPE. ``k_proj``: ``attn.k_proj(hidden)`` when the caller already has it
    (the engine taps it from the attention module's own forward instead of recomputing the projection)."""
    b, p, _ = hidden.shape
    k = (attn.k_proj(hidden) if k_proj is None else k_proj).view(b, p, -1, _head_dim(attn))
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2).float()
    if position_embeddings is not None:
        cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)
        k = _rope(k, cos.float(), sin.float())
    return k


def attention_probs(
    attn: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    query_rows: torch.Tensor,
    key_valid: torch.Tensor,
    causal: bool = True,
    tau: float = 1.0,
    k_proj: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities ``[B, H, Q, P]`` of the rows ``query_rows [B, Q]`` over all ``P`` keys.

    ``hidden`` is the (already normed) input of ``attn``; ``key_valid [B, P]`` masks padding keys; ``tau`` divides
    the logits before the softmax; a query row with no valid key (left padding) gets zeros; ``k_proj`` as in
    ``rotary_keys``. Works for
    Llama/Qwen2/Qwen2-VL/Qwen3 attention modules (q/k projections, optional q_norm/k_norm, GQA, RoPE);
    computed in fp32 whatever the model dtype, so scores compare equal to eager attention's within 1e-5.
    """
    b, p, _ = hidden.shape
    head_dim = _head_dim(attn)
    rows = query_rows.clamp(min=0)
    hq = torch.gather(hidden, 1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    q = attn.q_proj(hq).view(b, rows.shape[1], -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
        q = attn.q_norm(q)
    q = q.transpose(1, 2).float()
    k = rotary_keys(attn, hidden, position_embeddings, k_proj)
    if position_embeddings is not None:
        cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)  # batch 1 when positions are shared
        idx = rows.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
        q = _rope(q, torch.gather(cos, 1, idx).float(), torch.gather(sin, 1, idx).float())
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
    scale = getattr(attn, "scaling", head_dim**-0.5)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Q, P]
    allowed = key_valid.bool()[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(p, device=hidden.device)[None, None, None, :] <= rows[:, None, :, None])
    logits = logits.masked_fill(~allowed, float("-inf"))
    if tau != 1.0:  # a softmax temperature (AIM's PageRank reads softmax(logits / 0.1))
        logits = logits / tau
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a padding query row sees no key: all zeros

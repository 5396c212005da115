"""The Kimi K2 / DeepSeek-V3 transformer, in one file.

Paper names throughout: MLA (multi-head latent attention) with an optional low-rank query, a
decoupled rotary key shared by all heads, and a kv latent of `kv_lora_rank` per token; a fine-grained
MoE with sigmoid routing, an auxiliary-loss-free correction bias, routed + shared SwiGLU experts; the
first `first_k_dense_replace` layers dense. Module and parameter names are those of the real
checkpoints (`model.layers.N.self_attn.kv_a_proj_with_mqa.weight`, ...), so loading is a rename-free
copy except for the routed experts, which live here as stacked 3-D tensors `[E, out, in]` (one batched
matmul per layer; an optimizer still sees each expert's matrix) and on disk as `experts.E.*.weight`.

MLA has two computations of the same function, chosen by `Transformer.mla_impl`:
- naive: expand the latent into per-head keys and values (training, prompts without a cache);
- absorbed: cache only `[latent | rotary key]` (kv_lora_rank + qk_rope_head_dim numbers per token
  per layer) and fold kv_b_proj into the query and the output, so decoding reads the latent directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig, yarn_mscale

# F.grouped_mm (torch >= 2.10) runs the whole routed-expert layer as one kernel on CPU and CUDA;
# older torch falls back to a loop over the experts that received tokens.
_grouped_mm = getattr(F, "grouped_mm", None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]  # (as self.weight, minus nn.Module.__getattr__: a hot path)
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.rms_norm(x, w.shape, w, self.eps)  # same numbers, one op
        # Normalise in fp32 whatever the activation dtype (as the reference), scale in x's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Rotary embedding with YaRN


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies, and the factor YaRN multiplies cos/sin by.

    YaRN keeps high frequencies (many rotations within the original context) as they are, divides
    low frequencies by `factor`, and ramps linearly between, with the ramp's ends at the dimensions
    that rotate `beta_fast` and `beta_slow` times over the original context.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling
    if not rs or rs.get("type") != "yarn":
        return inv_freq, 1.0
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn_factor = (yarn_mscale(factor, m) / yarn_mscale(factor, m_all)) if (m and m_all) \
            else yarn_mscale(factor)
    return inv_freq, float(attn_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... as the real checkpoints lay them out.

    The result is written de-interleaved (all first elements, then all second elements): queries
    and keys get the same permutation, so their dot products, and the cache, are unaffected, and
    we skip the copy that re-interleaving would cost.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------------
# Caches


class KVCache:
    """Contiguous latent cache for a batch of sequences: `kv[layer, b, s] = [kv latent | rotary key]`.

    The engine grows a paged version of this; both follow the same two-call protocol, so the model
    does not care which it gets:
      `prepare(positions)` once per forward -> boolean mask [B, T, S] (True = may attend);
      `update(layer, kv_new)` per layer -> this layer's keys [B, S, kv_lora_rank + qk_rope_head_dim].
    Row b's tokens are written at their positions; a query at position p sees keys 0..p of its row.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv = torch.zeros(cfg.num_hidden_layers, batch_size, max_len, width, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._pos = None
        self._span = 0

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def next_positions(self, t: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(t, device=self.lengths.device)

    def prepare(self, positions: torch.Tensor) -> torch.Tensor:
        span = int(positions.max()) + 1
        if span > self.max_len:
            raise ValueError(f"KVCache: position {span - 1} is beyond the cache's {self.max_len} slots")
        self._pos, self._span = positions, span
        self.lengths = torch.maximum(self.lengths, positions.max(dim=1).values + 1)
        keys = torch.arange(span, device=positions.device)
        return keys[None, None, :] <= positions[:, :, None]

    def update(self, layer: int, kv_new: torch.Tensor) -> torch.Tensor:
        cache = self.kv[layer]
        rows = torch.arange(cache.shape[0], device=cache.device)[:, None]
        cache[rows, self._pos] = kv_new.to(cache.dtype)
        return cache[:, : self._span]


# ---------------------------------------------------------------------------------------------------
# Attention


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention for packed rows: a token sees only earlier tokens of its own
    conversation. bool [B, T, T], for `model(..., attn_mask=...)`."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal


class Packed:
    """Conversations packed end to end in training rows (`model(..., doc_ids=...)`): the function
    of `document_mask(doc_ids)`, computed per conversation. With the dense [T, T] mask, SDPA and
    QK-Clip's max logit work on every score of the row, most of which the mask throws away; per
    conversation they run causal on each span (the kernel skips the upper triangle), so a row of
    two conversations costs about a quarter of the scores (bench/train_speed.py, section 4, times it).
    Each conversation must be one contiguous run of its id, as packing lays them out."""

    def __init__(self, doc_ids: torch.Tensor):
        self.spans = []  # (row, start, end) of each conversation
        for b, row in enumerate(doc_ids.cpu()):
            ids, counts = torch.unique_consecutive(row, return_counts=True)
            if len(ids) != len(torch.unique(ids)):
                raise ValueError(f"doc_ids row {b}: a conversation's tokens are not one contiguous run")
            ends = counts.cumsum(0).tolist()
            self.spans += [(b, s, e) for s, e in zip([0] + ends[:-1], ends)]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_dim = self.nope + self.rope
        bias = cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=bias)
        self.softmax_scale = cfg.softmax_scale
        # QK-Clip reads this: per head, the largest pre-softmax logit (scale included) of the last
        # training forward, recorded while `record_max_logit` is on.
        self.record_max_logit = True
        self.register_buffer("max_logit", torch.zeros(self.n_heads), persistent=False)

    def _queries(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(B, T, self.n_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)

    def _latent(self, x, cos, sin):
        """[normalised kv latent | rotated shared key] per token: exactly what the cache holds."""
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return torch.cat((self.kv_a_layernorm(c), apply_rope(k_rope, cos, sin)), dim=-1)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        """The naive path: expand keys and values per head (training, and prompts without a cache).
        mask None means causal over this chunk."""
        B, T, _ = x.shape
        q_nope, q_rope = self._queries(x)
        q_rope = apply_rope(q_rope, cos[:, :, None], sin[:, :, None])
        kv = self._latent(x, cos, sin)
        if cache is not None:
            kv = cache.update(layer, kv)
        out = self._attend_naive(q_nope, q_rope, kv, mask)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim))

    def _attend_naive(self, q_nope, q_rope, kv, mask):
        B, T, H, _ = q_nope.shape
        S = kv.shape[1]
        c, k_rope = kv.split([self.kv_lora_rank, self.rope], dim=-1)
        k_nope, v = self.kv_b_proj(c).view(B, S, H, self.nope + self.v_dim).split([self.nope, self.v_dim], -1)
        q = torch.cat((q_nope, q_rope), -1).transpose(1, 2)  # [B, H, T, d]
        k = torch.cat((k_nope, k_rope[:, :, None].expand(B, S, H, self.rope)), -1).transpose(1, 2)
        v = v.transpose(1, 2)
        causal = mask is None
        if causal and S != T:
            raise ValueError("naive MLA without a mask needs keys for exactly the queries (S == T)")
        if self.training and self.record_max_logit:
            with torch.no_grad():
                self.max_logit.copy_(self._max_logit(q, k, mask))
        pad = q.shape[-1] - self.v_dim
        if pad > 0:  # fused (flash) SDPA kernels need one head size; zero columns of v cost little
            v = F.pad(v, (0, pad))
        if isinstance(mask, Packed):
            rows = [[] for _ in range(B)]
            for r, s, e in mask.spans:  # in order along each row
                rows[r].append(F.scaled_dot_product_attention(q[r:r + 1, :, s:e], k[r:r + 1, :, s:e],
                                                              v[r:r + 1, :, s:e], is_causal=True,
                                                              scale=self.softmax_scale))
            out = torch.cat([torch.cat(parts, dim=2) for parts in rows])
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask[:, None],
                                                 is_causal=causal, scale=self.softmax_scale)
        if pad > 0:
            out = out[..., : self.v_dim]
        return out.transpose(1, 2)  # [B, T, H, v]

    def _max_logit(self, q, k, mask, chunk: int = 256):
        """Per-head max of the masked, scaled scores, without grad and in query chunks (bounded
        memory). Computing it beside SDPA costs one forward-only matmul; running attention eagerly
        to get it would cost the softmax and its backward too (measured: bench/model_speed.py)."""
        if isinstance(mask, Packed):  # per conversation: only the scores that attention uses
            return torch.stack([self._max_logit(q[r:r + 1, :, s:e], k[r:r + 1, :, s:e], None, chunk)
                                for r, s, e in mask.spans]).amax(0)
        T = q.shape[2]
        best = torch.full((q.shape[1],), float("-inf"), device=q.device)
        for t0 in range(0, T, chunk):
            t1 = min(t0 + chunk, T)
            # causal (S == T): keys after the chunk's last query are all masked, so skip them
            s = q[:, :, t0:t1] @ (k if mask is not None else k[:, :, :t1]).transpose(-1, -2)
            if mask is None:
                keep = torch.arange(t1, device=q.device) <= torch.arange(t0, t1, device=q.device)[:, None]
            else:
                keep = mask[:, None, t0:t1]
            best = torch.maximum(best, s.masked_fill_(~keep, float("-inf")).amax(dim=(0, 2, 3)).float())
        return best * self.softmax_scale

    def forward_absorbed(self, x, B, T, rot, hide=None, cache=None, layer=0, residual=None):
        """The absorbed path: score against the latent directly, q_nope . (W_uk c) = (W_uk^T q_nope) . c,
        and fold W_uv into the output, so per-head keys and values are never formed.

        Written for decoding, where a step is a few tokens and the cost is the number of ops, not
        flops: x is [B*T, D] (2-D, no reshapes around each matmul); the projections that read x are
        one matmul; W_uk (and the softmax scale) are folded into the query weights and W_uv into
        o_proj when that does not make the weights much bigger (small models; the 1T model keeps them
        apart); RoPE is one batched matmul with the rotation matrices `rot` [B*T, rope, rope] built
        once per forward (de-interleaving as apply_rope does, so both paths fill the cache alike);
        the output projection adds into `residual`. hide [B, T, 1, S]: True where a query may not
        look; None = right-aligned causal (every key when T == 1). Returns [B*T, D].
        """
        H, C, R = self.n_heads, self.kv_lora_rank, self.rope
        m = self._modules  # (as self.kv_a_layernorm etc., minus nn.Module.__getattr__: a hot path)
        w = self._absorbed_weights()
        q, c, k_r = F.linear(x, w["in"], w["in_bias"]).split(w["split"], -1)
        if self.q_lora_rank is not None:
            q = F.linear(m["q_a_layernorm"].forward(q), w["q"])
        q_c, q_r = q.split(w["q_split"], -1)
        if w["uk"] is None:
            q_c = q_c.view(B * T, H, C)
        else:  # project q_nope into the latent per head: [H, BT, nope] @ [H, nope, C]
            q_c = torch.bmm(q_c.view(B * T, H, -1).transpose(0, 1), w["uk"]).transpose(0, 1)
        q = torch.cat((q_c, torch.bmm(q_r.view(B * T, H, R), rot)), -1).view(B, T * H, C + R)
        kv = torch.cat((m["kv_a_layernorm"].forward(c), torch.bmm(k_r.view(B * T, 1, R), rot).view(B * T, R)), -1)
        kv = kv.view(B, T, C + R) if cache is None else cache.update(layer, kv.view(B, T, C + R))
        S = kv.shape[1]
        scores = torch.bmm(q, kv.transpose(1, 2))  # [B, T*H, S], scale already in q
        if hide is None and T > 1:
            hide = ~torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, :, None]
        if hide is not None:
            scores.view(B, T, H, S).masked_fill_(hide, float("-inf"))
        if scores.dtype == torch.float32:
            probs = scores.softmax(-1)
        else:
            probs = scores.softmax(-1, dtype=torch.float32).to(scores.dtype)
        o = torch.bmm(probs, kv[..., :C]).view(B * T, H * C)
        if w["uv"] is not None:
            o = torch.bmm(o.view(B * T, H, C).transpose(0, 1), w["uv"]).transpose(0, 1).reshape(B * T, -1)
        out = w["out"]
        y = F.linear(o, out) if residual is None else torch.addmm(residual, o, out.t())
        bias = m["o_proj"].bias
        return y if bias is None else y + bias

    def _absorbed_weights(self) -> dict:
        """The absorbed path's weights, derived from the checkpoint's. Cached while no gradient is
        wanted; rebuilt when any source weight changes (a new tensor, or an in-place update, which
        bumps its version counter: optimizer steps, load_state_dict, update_weights)."""
        mods = self._modules
        src = (mods["kv_a_proj_with_mqa"]._parameters, mods["kv_b_proj"]._parameters,
               mods["o_proj"]._parameters, mods["q_proj" if self.q_lora_rank is None else "q_b_proj"]._parameters,
               mods["q_a_proj"]._parameters if self.q_lora_rank is not None else {})
        src = [t for p in src for t in p.values() if t is not None]
        grad = torch.is_grad_enabled()
        try:
            key = [(t, t._version) for t in src]
        except RuntimeError:  # inference-mode tensors keep no version counter: do not cache
            key, grad = None, True
        cached = self.__dict__.get("_absorbed")
        if not grad and cached is not None and len(cached[0]) == len(key) \
                and all(a is b and v == u for (a, v), (b, u) in zip(cached[0], key)):
            return cached[1]
        w = self._derive_absorbed()
        self.__dict__["_absorbed"] = None if grad else (key, w)
        return w

    def _derive_absorbed(self) -> dict:
        H, C, R, nope, v = self.n_heads, self.kv_lora_rank, self.rope, self.nope, self.v_dim
        s = self.softmax_scale
        kv_b = self.kv_b_proj.weight.view(H, nope + v, C)
        w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]
        wq = (self.q_proj.weight if self.q_lora_rank is None else self.q_b_proj.weight)
        d_in = wq.shape[1]
        wq = wq.view(H, nope + R, d_in)
        # Fold W_uk into the query weights only while the folded matrix stays near the size of the
        # two it replaces (true for small models; for K2, 64 x 512 x 1536 would be 3x the bytes).
        fold_q = H * C * d_in <= 2 * (H * nope * d_in + H * nope * C)
        fold_o = self.o_proj.weight.shape[0] * H * C <= 2 * (self.o_proj.weight.numel() + H * v * C)
        q_c = (torch.einsum("hnc,hnd->hcd", w_uk.float(), wq[:, :nope].float()) * s).to(wq.dtype) \
            if fold_q else wq[:, :nope]
        q = torch.cat((q_c.reshape(-1, d_in), (wq[:, nope:] * s).reshape(H * R, d_in)))
        kv_a = self.kv_a_proj_with_mqa
        if self.q_lora_rank is None:
            w_in, b_in = torch.cat((q, kv_a.weight)), None
            if kv_a.bias is not None:
                b_in = torch.cat((kv_a.bias.new_zeros(q.shape[0]), kv_a.bias))
        else:
            w_in = torch.cat((self.q_a_proj.weight, kv_a.weight))
            b_in = None if kv_a.bias is None else torch.cat((self.q_a_proj.bias, kv_a.bias))
        w_o = self.o_proj.weight
        out = (torch.einsum("dhv,hvc->dhc", w_o.float().view(-1, H, v), w_uv.float()).to(w_o.dtype)
               .reshape(w_o.shape[0], H * C)) if fold_o else w_o
        qc = C if fold_q else nope
        return {"in": w_in, "in_bias": b_in, "q": None if self.q_lora_rank is None else q,
                "split": [q.shape[0] if self.q_lora_rank is None else self.q_lora_rank, C, R],
                "q_split": [H * qc, H * R], "uk": None if fold_q else (w_uk * s).contiguous(),
                "uv": None if fold_o else w_uv.transpose(1, 2).contiguous(), "out": out}


# ---------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, router, routed experts, MoE


class MLP(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        # One matmul for gate and up (a wider matmul runs closer to peak on CPU than two narrow
        # ones); the parameters stay separate, as in the checkpoints and for Muon.
        gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def add_to(self, residual, x):
        """residual + self(x) for 2-D x, the down projection accumulating into residual (inference)."""
        m = self._modules  # (as self.gate_proj etc., minus nn.Module.__getattr__: a hot path)
        g, u, d = m["gate_proj"], m["up_proj"], m["down_proj"]
        if type(g) is nn.Linear and type(u) is nn.Linear and type(d) is nn.Linear and d.bias is None:
            gw, uw, dw = g._parameters["weight"], u._parameters["weight"], d._parameters["weight"]
            return torch.addmm(residual, F.silu(F.linear(x, gw, g.bias)) * F.linear(x, uw, u.bias), dw.t())
        return residual + self(x)


class Gate(nn.Module):
    """The router. Scores are sigmoid (K2, DeepSeek-V3) or softmax (DeepSeek-V2) of x . W_e.

    With `noaux_tc`, a per-expert correction bias is added to the scores for *choosing* the top-k
    only; the mixing weights come from the unbiased scores, renormalised over the chosen k and
    times `routed_scaling_factor`. The bias is a buffer moved by the trainer toward balance
    (openk2.muon), never by gradient. With n_group > 1, experts are chosen only from the
    `topk_group` groups whose best two (biased) scores sum highest.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # Tokens routed to each expert since the trainer last read it (for the bias update and logs).
        self.register_buffer("expert_load", torch.zeros(self.n_experts), persistent=False)

    def _apply(self, fn, recurse=True):
        # The bias moves by ~1e-3 per step: keep it fp32 whatever dtype the model is cast to.
        bias = self.e_score_correction_bias
        out = super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if new.dtype != torch.float32:
            self.e_score_correction_bias = (torch.empty(bias.shape, dtype=torch.float32, device=new.device)
                                            if bias.is_meta or new.is_meta else bias.to(new.device))
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._parameters["weight"]
        logits = F.linear(x, w) if x.dtype == w.dtype == torch.float32 else F.linear(x.float(), w.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self._buffers["e_score_correction_bias"] if self.method == "noaux_tc" else scores
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1) if self.method == "noaux_tc" \
                else grouped.amax(dim=-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(indices.flatten(), minlength=self.n_experts).to(self.expert_load)
        return weights * self.scale, indices


class Experts(nn.Module):
    """All routed experts of one layer as stacked SwiGLU weights [E, out, in].

    Tokens are grouped by expert (one argsort), run through one grouped matmul per projection
    (a loop over the experts that got tokens where grouped_mm is missing), weighted, and scattered
    back with index_add. No per-token Python. The INT4 module (openk2.quant) replaces this class
    with one of the same forward signature.
    """

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        p = self._parameters  # plain dict reads: nn.Module attribute lookup shows up in batch-1 decoding
        return routed_experts(x, indices, weights, p["gate_proj"], p["up_proj"], p["down_proj"], self.n_experts)


def routed_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_proj: torch.Tensor,
                   up_proj: torch.Tensor, down_proj: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Experts' computation on explicit weight stacks [E, out, in]: x [T, dim], indices/weights [T, k].

    A function, not a method, so the QAT and INT4 paths (openk2.quant) run the very same code on their
    own (fake-quantized or dequantized) stacks and agree with this module bit for bit.
    """
    if x.shape[0] == 1 and x.device.type == "cpu":
        # One token (batch-1 decoding): CPU grouped_mm walks every expert, empty or not, so run
        # just the k chosen ones (a few ops instead of three matmuls per expert of the layer).
        y = x  # ignored: beta=0 below
        for j, (e, w) in enumerate(zip(indices[0].tolist(), weights[0].tolist())):
            h = F.silu(F.linear(x, gate_proj[e])) * F.linear(x, up_proj[e])
            y = torch.addmm(y, h, down_proj[e].t(), beta=1 if j else 0, alpha=w)
        return y
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    token = order // indices.shape[1]
    xs = x[token]
    if _grouped_mm is not None and xs.is_floating_point():
        offs = counts.cumsum(0).to(torch.int32)
        if torch.is_grad_enabled():
            w13 = torch.cat((gate_proj, up_proj), dim=1)  # gate and up in one grouped matmul
            gate, up = _grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        else:  # inference: copying every expert's weights each step costs more than it saves
            gate = _grouped_mm(xs, gate_proj.transpose(1, 2), offs=offs)
            up = _grouped_mm(xs, up_proj.transpose(1, 2), offs=offs)
        ys = _grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offs)
    else:
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                xe = xs[start:start + n]
                ys[start:start + n] = F.linear(F.silu(F.linear(xe, gate_proj[e])) * F.linear(xe, up_proj[e]),
                                               down_proj[e])
                start += n
    ys = ys * weights.flatten()[order, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        y = self.experts(x, indices, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def add_to(self, residual, x):
        """residual + self(x) for 2-D x (inference)."""
        m = self._modules
        weights, indices = m["gate"].forward(x)
        y = residual + m["experts"](x, indices, weights)
        return y if m["shared_experts"] is None else m["shared_experts"].add_to(y, x)


# ---------------------------------------------------------------------------------------------------
# The transformer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_absorbed(self, x, B, T, rot, hide=None, cache=None):
        """The inference path on 2-D x [B*T, D]: residual adds fused into the output matmuls, and
        submodules' forward called directly (nn.Module.__call__ costs like a small op here)."""
        m = self._modules
        x = m["self_attn"].forward_absorbed(m["input_layernorm"].forward(x), B, T, rot, hide, cache, self.layer,
                                            residual=x)
        return m["mlp"].add_to(x, m["post_attention_layernorm"].forward(x))


class Decoder(nn.Module):
    """Holds what the checkpoints keep under `model.`: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`model(input_ids, positions=None, cache=None) -> logits [B, T, V]`.

    mla_impl: "auto" (naive without a cache, absorbed with one), "naive" or "absorb".
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        inv_freq, self.rope_attn_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mla_impl = "auto"
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self):
        """Share the output head with the embeddings when the config says so (again after `to_empty`,
        which gives every module its own new tensor)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Experts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    nn.init.normal_(p, 0.0, std)
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, 0.0, std)
                m.e_score_correction_bias.zero_()
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self):
        """Derived, non-persistent state (after init, or after `to_empty` when loading)."""
        self.inv_freq.copy_(rope_inv_freq(self.config)[0])
        for m in self.modules():
            if isinstance(m, MLA):
                m.max_logit.zero_()
            elif isinstance(m, Gate):
                m.expert_load.zero_()

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        return (freqs.cos() * self.rope_attn_factor).to(dtype), (freqs.sin() * self.rope_attn_factor).to(dtype)

    def rope_rotation(self, positions: torch.Tensor, dtype) -> torch.Tensor:
        """RoPE as one matrix per token, [B*T, rope, rope]: x @ M rotates x's adjacent pairs and
        de-interleaves them, exactly as apply_rope does, in one batched matmul instead of eight ops.
        Looked up in a table of all positions so far (grown by doubling, at most 64 MB)."""
        flat = positions.reshape(-1)
        need = int(flat.max()) + 1
        key = (flat.device, dtype, self.inv_freq._version, self.inv_freq.data_ptr())
        table = self.__dict__.get("_rot_table")
        if table is None or table[0] != key or table[1].shape[0] < need:
            n = max(need, 2 * table[1].shape[0] if table is not None and table[0] == key else 256)
            if n * self.inv_freq.shape[0] ** 2 * 16 > 64 << 20:
                return self._rotations(flat, dtype)
            table = (key, self._rotations(torch.arange(n, device=flat.device), dtype))
            self.__dict__["_rot_table"] = table
        return table[1].index_select(0, flat)

    def _rotations(self, positions: torch.Tensor, dtype) -> torch.Tensor:
        n = self.inv_freq.shape[0]
        freqs = positions.reshape(-1, 1).float() * self.inv_freq
        cos, sin = freqs.cos() * self.rope_attn_factor, freqs.sin() * self.rope_attn_factor
        # entry [j, a, b]: input element 2j+a -> output element b*n+j (a, b in {0, 1})
        pairs = torch.stack((cos, sin, -sin, cos), -1).view(-1, n, 2, 2)
        rot = torch.diag_embed(pairs.permute(0, 2, 3, 1))  # [BT, a, b, j, j']
        return rot.permute(0, 3, 1, 2, 4).reshape(-1, 2 * n, 2 * n).to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                return_hidden: bool = False, attn_mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask: bool [B, T, T] (True = may attend) for a forward without a cache.
        doc_ids: [B, T] conversations packed into training rows: attention causal within each, blind
        across them; the same function as attn_mask=document_mask(doc_ids), faster (see Packed).
        logits_at: bool [B, T]: return logits [N, V] for those positions only (SFT computes the
        output head and the loss only where the loss mask is on: most tokens are prompt)."""
        B, T = input_ids.shape
        if (attn_mask is not None or doc_ids is not None) and cache is not None:
            raise ValueError("attn_mask and doc_ids are for forwards without a cache (the cache supplies its own mask)")
        if attn_mask is not None and doc_ids is not None:
            raise ValueError("pass attn_mask or doc_ids, not both")
        if positions is None:
            positions = (cache.next_positions(T) if cache is not None
                         else torch.arange(T, device=input_ids.device)[None].expand(B, T))
        elif positions.dim() == 1:
            positions = positions[None].expand(B, T)
        mask = cache.prepare(positions) if cache is not None else attn_mask
        absorb = self.mla_impl == "absorb" or (self.mla_impl == "auto" and cache is not None)
        if doc_ids is not None:
            mask = document_mask(doc_ids) if absorb else Packed(doc_ids)
        h = self.model.embed_tokens(input_ids)
        if absorb:
            rot = self.rope_rotation(positions, h.dtype)
            hide = None if mask is None else ~mask[:, :, None]  # once, not per layer
            x = h.view(B * T, -1)
            for block in self.model.layers:
                x = block.forward_absorbed(x, B, T, rot, hide, cache)
            h = x.view(B, T, -1)
        else:
            cos, sin = self.rope(positions, h.dtype)
            for block in self.model.layers:
                h = block(h, cos, sin, mask, cache)
        h = self.model.norm(h)
        if return_hidden:
            return h
        return self.lm_head(h if logits_at is None else h[logits_at])

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

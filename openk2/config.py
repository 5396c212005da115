"""ModelConfig: the Hugging Face DeepseekV3 / Kimi-K2 config.json, as a dataclass, plus presets.

Field names are exactly those of the real config.json files, so a config moves both ways between
openk2, transformers, vLLM and SGLang. Reading accepts both spellings of RoPE scaling
(transformers 4: `rope_theta` + `rope_scaling`; transformers 5: `rope_parameters`) and both model types
("deepseek_v3", "kimi_k2"); writing always says "deepseek_v3", because transformers refuses "kimi_k2"
(and, if forced, silently leaves the experts random).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MODEL_TYPES = ("deepseek_v3", "kimi_k2")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


class ConfigError(ValueError):
    """A config.json we cannot honour; the message names the file and the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # the dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # width of one routed (and each shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64  # unused by MLA; kept so the file round-trips
    n_routed_experts: int = 384
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    rope_theta: float = 50000.0
    # YaRN, in the transformers-4 spelling: {"type": "yarn", "factor", "original_max_position_embeddings",
    # "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}; None = plain RoPE.
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers in the file (skipped on load)
    torch_dtype: str = "bfloat16"
    model_type: str = "deepseek_v3"
    # Fields we do not interpret but must carry (quantization_config, auto_map, ...).
    extra: dict = field(default_factory=dict, repr=False)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on (as DeepSeek-V3)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, source: str = "config") -> ModelConfig:
        def bad(name, why):
            raise ConfigError(f"{source}: field {name!r}: {why}")

        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"{self.model_type!r} is not one of {MODEL_TYPES}")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"{self.scoring_func!r} is not supported (only {SCORING_FUNCS})")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"{self.topk_method!r} is not supported (only {TOPK_METHODS})")
        if self.hidden_act != "silu":
            bad("hidden_act", f"{self.hidden_act!r} is not supported (only 'silu')")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be in 1..n_routed_experts, got {self.num_experts_per_tok}")
            if self.n_routed_experts % self.n_group:
                bad("n_group", f"{self.n_group} does not divide n_routed_experts={self.n_routed_experts}")
            if not 0 < self.topk_group <= self.n_group:
                bad("topk_group", f"must be in 1..n_group, got {self.topk_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                bad("n_group", "group-limited routing needs at least 2 experts per group")
            if self.num_experts_per_tok > self.topk_group * per_group:
                bad("num_experts_per_tok", "larger than the experts in the chosen groups")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", "must be null or a positive integer")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                bad("rope_scaling", f"type {kind!r} is not supported (only 'yarn')")
            if kind == "yarn" and not rs.get("factor"):
                bad("rope_scaling", "yarn needs a 'factor'")
        return self

    # ---- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, src: dict | str | Path) -> ModelConfig:
        """Read a config.json (path, directory or dict) in either transformers spelling."""
        source = "config"
        if not isinstance(src, dict):
            path = Path(src)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            try:
                src = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{source}: no such file") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}: not valid JSON ({e})") from None
        d = dict(src)
        if "text_config" in d and "hidden_size" not in d:  # multimodal wrappers (Kimi K2.5) hold the LM inside
            d = dict(d["text_config"])
        if "model_type" not in d:
            raise ConfigError(f"{source}: field 'model_type' is missing")
        d.pop("architectures", None)
        d.pop("transformers_version", None)
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        d.pop("dtype", None)
        for k in ("head_dim", "qk_head_dim"):  # derived, written by transformers 5
            d.pop(k, None)
        rp = d.pop("rope_parameters", None)
        if rp:  # transformers-5 spelling: theta lives inside, "rope_type" names the kind
            rp = dict(rp)
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            if kind != "default":
                d["rope_scaling"] = {"type": kind, **rp}
        rs = d.get("rope_scaling")
        if rs:
            rs = dict(rs)
            rs["type"] = rs.pop("rope_type", rs.get("type"))
            if rs["type"] in (None, "default"):
                rs = None
            d["rope_scaling"] = rs
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        if kwargs.get("q_lora_rank") == 0:
            kwargs["q_lora_rank"] = None
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        for k in ("n_group", "topk_group"):
            if kwargs.get(k) is None:
                kwargs[k] = 1
        try:
            cfg = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg.validate(source)

    def to_hf(self) -> dict:
        """The config.json transformers (5.x) and vLLM load: model_type "deepseek_v3"."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        d["model_type"] = "deepseek_v3"
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        d["num_key_value_heads"] = self.num_attention_heads
        return dict(sorted(d.items()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes).validate()

    # ---- parameter accounting (no tensors needed: `openk2 info` on the 1T model is instant) -------
    def param_counts(self) -> dict:
        """Exact parameter counts by kind; active = non-expert + chosen routed experts per token."""
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        attn = (q + d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
                + h * self.v_head_dim * d)
        norms = 2 * d
        expert = 3 * d * self.moe_intermediate_size
        n_moe = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        n_dense = self.num_hidden_layers - n_moe
        dense_mlp = 3 * d * self.intermediate_size
        router = self.n_routed_experts * d  # the correction bias is a buffer, not a parameter
        shared = self.n_shared_experts * expert
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        non_expert = (embed + head + d + self.num_hidden_layers * (attn + norms)
                      + n_dense * dense_mlp + n_moe * (router + shared))
        routed = n_moe * self.n_routed_experts * expert
        return {
            "total_params": non_expert + routed,
            "active_params": non_expert + n_moe * self.num_experts_per_tok * expert,
            "routed_expert_params": routed,
            "non_expert_params": non_expert,
            "moe_layers": n_moe,
            "dense_layers": n_dense,
        }


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- presets ---------------------------------------------------------------------------------------

def _kimi_k2_thinking() -> ModelConfig:
    return ModelConfig(
        bos_token_id=163584, eos_token_id=163586, model_type="kimi_k2",
        rope_scaling={"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    )


def _deepseek_v3() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        max_position_embeddings=163840, rope_theta=10000.0, bos_token_id=0, eos_token_id=1,
        num_nextn_predict_layers=1,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )


def _k2_nano() -> ModelConfig:
    # The shipped model's shape: the K2 architecture scaled down to train on 2 CPU cores. What limits
    # k2-nano is not capacity (the gym's language is a few templates) but how many tokens pass
    # before it learns to copy from its context (induction), and that count does not shrink with a
    # bigger model: so a small, fast one (128 wide, 4 layers: 2.1x the tokens/s of the 192-wide,
    # 6-layer shape of the earlier runs, bench in docs/results.md) sees twice the data in the same
    # minutes. Vocabulary 512: generated names split into ~90 frequent pieces instead of ~400 rare
    # ones, so a copy circuit learned on some of them serves the others (docs/results.md).
    # May change until the shipped model exists (then this must equal models/k2-nano/config.json).
    return ModelConfig(
        vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=2048, rope_theta=50000.0, torch_dtype="float32",
    )


def _k2_tiny() -> ModelConfig:
    # For tests: every feature on (q LoRA, grouped routing, dense + MoE layers, YaRN), tiny sizes.
    return ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=2048, rope_theta=50000.0, torch_dtype="float32",
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    )


PRESETS = {
    "kimi-k2-thinking": _kimi_k2_thinking,
    "deepseek-v3": _deepseek_v3,
    "k2-nano": _k2_nano,
    "k2-tiny": _k2_tiny,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]().validate(f"preset {name}")

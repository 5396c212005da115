"""INT4 in the model: packed modules for inference, fake quantization for training, conversions.

The format itself (quantize, pack, quantization_config) is openk2.int4. Here:

- `Int4Linear` (stands in for nn.Linear) and `Int4Experts` (stands in for model.Experts, same
  `forward(x [N, D], indices [N, k], weights [N, k]) -> [N, D]`). They hold exactly what the
  checkpoint holds, packed: `weight_packed` int32 [out, in/8] and `weight_scale` bf16 [out, in/32]
  (for experts, stacked: `gate_proj_packed` [E, inter, dim/8], `gate_proj_scale`, ... `down_proj_*`).
  Forward, chosen per call by `impl` ("auto", "kernel", "dequant"):
    kernel  - PyTorch's int4 matmul: `_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on
              CUDA (sm80+). Activations go in as bf16 (the CPU kernel is only fast with bf16), so the
              result matches the fp32 model to bf16 tolerance. The kernel's own weight layout is built
              on first use and cached next to the packed tensors (and checked once per process against
              the dequantize path: a kernel that disagrees is reported and never used).
    dequant - unpack to x's dtype and run the float computation: exactly the QAT forward.
  "auto" takes the kernel when the device, the shapes (out % 16 on CPU, group 32..256) and autograd
  allow, else dequant. For Int4Experts on CUDA with few (token, expert) slots (decode), "auto" first
  takes the fused Triton kernel of openk2.int4_triton (one launch per projection, no host sync);
  "kernel" there means the grouped tinygemm path.
- QAT: `enable_qat(model, targets)` swaps the classes of the routed experts (or every Linear except
  lm_head; the router is no Linear) for `QATExperts` / `QATLinear`, which fake-quantize their fp32
  latent weights in the forward (straight-through gradients). Parameters, names and optimizer state
  are untouched. `openk2.save_model` writes such a model as the INT4 checkpoint whose values are
  exactly what its forward used; `quantize_model` turns it into real INT4 modules in memory.
- Model code that reads a Linear's `.weight` directly bypasses these modules: MLPs with QAT/INT4
  projections become `ModularMLP` (module calls); MLA's absorbed decode reads kv_b_proj.weight, which
  for Int4Linear is the dequantized weight, but for QATLinear the latent one (only with targets
  "all": a QAT model decoding through the latent cache runs kv_b_proj unquantized; `quantize_model`
  it first to serve exactly what was trained).
- `prepare_for_load` (called by openk2.checkpoint) builds INT4 modules where a checkpoint's
  `quantization_config` says so; `model_quantization_config` writes the config back.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from openk2 import int4, int4_triton
from openk2.model import MLP, Experts, routed_experts

PROJS = ("gate_proj", "up_proj", "down_proj")
IMPLS = ("auto", "kernel", "dequant")
TARGETS = ("experts", "all")


# ---------------------------------------------------------------------------------------------------
# PyTorch's int4 kernels: y = x @ ((q - 8) * scale + zero)^T, x bf16, q in 0..15


def kernel_supported(device: torch.device, out_features: int, in_features: int, group_size: int) -> bool:
    if group_size not in (32, 64, 128, 256) or in_features % group_size:
        return False
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and out_features % 16 == 0
    if device.type == "cuda":
        return (hasattr(torch.ops.aten, "_weight_int4pack_mm") and out_features % 8 == 0
                and torch.cuda.get_device_capability(device) >= (8, 0))
    return False


def kernel_pack(q: torch.Tensor, scale: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 q [out, in] and bf16 scale [out, in/g] -> the kernel's (weight, scales_and_zeros [in/g, out, 2])."""
    u = q.to(torch.int32) + 8
    if device.type == "cpu":
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.cpu(), 1)
    else:  # tinygemm: two values per byte, the even one in the high nibble
        inner = 8 if q.shape[1] % 128 == 0 else 4 if q.shape[1] % 64 == 0 else 2
        w = torch.ops.aten._convert_weight_to_int4pack(((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8).to(device), inner)
    st = scale.t().to(device=device, dtype=torch.bfloat16)
    return w, torch.stack((st, torch.zeros_like(st)), dim=-1).contiguous()


def kernel_mm(x: torch.Tensor, w: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """x bf16 [M, in] -> bf16 [M, out]."""
    if x.is_cpu:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm(x, w, group_size, sz)


_VERIFIED: dict[str, bool] = {}


def _verified_once(key: str, what: str, relative_error, tol: float) -> bool:
    """Once per process and key: does a kernel agree with the dequantize path? relative_error() runs
    it on a small random case; a kernel that errs or disagrees is reported once and never used."""
    if key not in _VERIFIED:
        ok, why = False, ""
        try:
            err = relative_error()
            ok, why = err < tol, f"relative error {err:.3g}"
        except Exception as e:  # an op missing or refusing this build/device
            why = f"{type(e).__name__}: {e}"
        if not ok:
            warnings.warn(f"openk2.quant: {what} disagrees with the dequantize path ({why}); not using it",
                          stacklevel=4)
        _VERIFIED[key] = ok
    return _VERIFIED[key]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float().cpu() - ref.float().cpu()).abs().max() / ref.float().abs().max()).item()


def kernel_verified(device: torch.device) -> bool:
    """Once per process and device type: does the int4 matmul kernel agree with dequantize?"""
    def relative_error():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(64, 256, generator=g)
        x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
        packed, scale = int4.compress(w)
        wk, sz = kernel_pack(int4.unpack(packed, 256), scale, device)
        return _rel(kernel_mm(x.to(device), wk, int4.GROUP_SIZE, sz), x.float() @ int4.decompress(packed, scale, 256).t())
    return _verified_once(device.type, f"the int4 kernel on {device.type}", relative_error, 2e-2)


def _fused_usable(x: torch.Tensor, indices: torch.Tensor, m: Int4Experts) -> bool:
    """The Triton decode path (openk2.int4_triton): CUDA, few (token, expert) slots, no gradient,
    and checked once per process against the dequantize path."""
    if indices.numel() > int4_triton.MAX_SLOTS or not int4_triton.supported(x, m.dim, m.inter, m.group_size):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False

    def relative_error():
        g = torch.Generator().manual_seed(0)
        ref_m = Int4Experts.from_float(*(torch.randn(4, a, b, generator=g) * 0.1
                                         for a, b in ((128, 256), (128, 256), (256, 128)))).to(x.device)
        xs = torch.randn(3, 256, generator=g).to(x.device)
        idx = torch.tensor([[0, 3], [2, 2], [1, 0]], device=x.device)
        w = torch.rand(3, 2, generator=g).to(x.device)
        got = int4_triton.moe_decode(xs, idx, w, ref_m.pairs(), ref_m.group_size)
        ref_m.impl = "dequant"
        return _rel(got, ref_m(xs, idx, w))
    return _verified_once("fused:" + x.device.type, f"the fused INT4 MoE kernel on {x.device.type}",
                          relative_error, 1e-3)


def _pick(impl: str, x: torch.Tensor, supported: bool) -> bool:
    """True: run the kernel. Kernels have no backward, so a forward that needs x's gradient dequantizes."""
    if impl == "dequant":
        return False
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    usable = supported and not wants_grad and kernel_verified(x.device)
    if impl == "kernel" and not usable:
        raise RuntimeError(f"INT4 kernel unavailable here (device {x.device}, shapes or group size unsupported, "
                           "or a gradient is needed); use impl='auto' or 'dequant'")
    return usable


def _version_key(device, tensors) -> tuple:
    return (str(device),) + tuple((t.data_ptr(), t._version) for t in tensors)


def _keep_scales_bf16(module: nn.Module, old: dict) -> None:
    """After Module._apply: the stored scales stay bf16 whatever dtype the model is cast to (a cast to
    fp16 would change them); only their device follows."""
    for name, before in old.items():
        now = getattr(module, name)
        if now.dtype != int4.SCALE_DTYPE:
            setattr(module, name, torch.empty(before.shape, dtype=int4.SCALE_DTYPE, device=now.device)
                    if before.is_meta or now.is_meta else before.to(now.device))


# ---------------------------------------------------------------------------------------------------
# Int4Linear


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W held packed as INT4. State: weight_packed, weight_scale, optional bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 group_size: int = int4.GROUP_SIZE, device=None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"Int4Linear: in_features {in_features} is not a multiple of group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, int4.packed_width(in_features),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size,
                                                        dtype=int4.SCALE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # Follows the model's float dtype through .to(): the dtype `weight` is returned in.
        self.register_buffer("_probe", torch.empty(0, device=device), persistent=False)
        self.impl = "auto"
        self._kernel = self._dense = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int = int4.GROUP_SIZE) -> Int4Linear:
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, group_size, device=weight.device)
        m.set_weight(weight)
        m._probe = m._probe.to(weight.dtype)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = int4.GROUP_SIZE) -> Int4Linear:
        return cls.from_float(linear.weight, linear.bias, group_size)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight [out, in] into this module (e.g. new RL weights)."""
        packed, scale = int4.compress(weight, self.group_size)
        self.weight_packed.copy_(packed)
        self.weight_scale.copy_(scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int4.decompress(self.weight_packed, self.weight_scale, self.in_features, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the model's dtype, for code that reads `.weight` directly (MLA's
        absorbed decode reads kv_b_proj.weight); cached until the packed weight changes."""
        key = _version_key(self._probe.dtype, (self.weight_packed, self.weight_scale))
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, self.dequantize(self._probe.dtype))
        return self._dense[1]

    def _kernel_weights(self, device):
        key = _version_key(device, (self.weight_packed, self.weight_scale))
        if self._kernel is None or self._kernel[0] != key:
            q = int4.unpack(self.weight_packed, self.in_features)
            self._kernel = (key, kernel_pack(q, self.weight_scale, device))
        return self._kernel[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _pick(self.impl, x, kernel_supported(x.device, self.out_features, self.in_features, self.group_size)):
            w, sz = self._kernel_weights(x.device)
            y = kernel_mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(), w, self.group_size, sz)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def hf_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """On-disk name -> tensor (views of this module's storage, plus the constant weight_shape)."""
        out = {prefix + "weight_packed": self.weight_packed, prefix + "weight_scale": self.weight_scale,
               prefix + "weight_shape": torch.tensor([self.out_features, self.in_features])}
        if self.bias is not None:
            out[prefix + "bias"] = self.bias.data
        return out

    def _apply(self, fn, recurse=True):
        old = {"weight_scale": self.weight_scale}
        super()._apply(fn, recurse)
        _keep_scales_bf16(self, old)
        self._kernel = self._dense = None
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, impl={self.impl}")


# ---------------------------------------------------------------------------------------------------
# Experts


def run_experts(n_experts: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, fetch) -> torch.Tensor:
    """model.Experts' own computation over only the experts that received tokens.

    fetch(used) -> (gate, up, down) weight stacks of those experts. Both the QAT forward and the INT4
    dequantize path come through here, which is why they agree bit for bit: same code, same values.
    Renumbering the used experts 0..U-1 keeps the token order, so the grouped matmul sees the
    same rows per expert as it would with all E stacks, without materialising unused experts.
    """
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    counts = torch.bincount(indices.flatten(), minlength=n_experts)
    used = counts.nonzero().flatten()
    remap = torch.zeros(n_experts, dtype=indices.dtype, device=indices.device)
    remap[used] = torch.arange(used.numel(), dtype=indices.dtype, device=indices.device)
    return routed_experts(x, remap[indices], weights, *fetch(used), used.numel())


class Int4Experts(nn.Module):
    """The routed experts of one MoE layer, packed INT4; a drop-in for model.Experts."""

    def __init__(self, n_experts: int, dim: int, inter: int, group_size: int = int4.GROUP_SIZE, device=None):
        super().__init__()
        if dim % group_size or inter % group_size:
            raise ValueError(f"Int4Experts: dim {dim} and inter {inter} must be multiples of group size {group_size}")
        self.n_experts, self.dim, self.inter, self.group_size = n_experts, dim, inter, group_size
        for proj, (out_f, in_f) in self.shapes().items():
            self.register_buffer(f"{proj}_packed", torch.zeros(n_experts, out_f, int4.packed_width(in_f),
                                                               dtype=torch.int32, device=device))
            self.register_buffer(f"{proj}_scale", torch.ones(n_experts, out_f, in_f // group_size,
                                                             dtype=int4.SCALE_DTYPE, device=device))
        self.impl = "auto"
        self._kernel = None

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {"gate_proj": (self.inter, self.dim), "up_proj": (self.inter, self.dim),
                "down_proj": (self.dim, self.inter)}

    @classmethod
    def from_float(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   group_size: int = int4.GROUP_SIZE) -> Int4Experts:
        n_experts, inter, dim = gate.shape
        m = cls(n_experts, dim, inter, group_size, device=gate.device)
        m.set_weights(gate, up, down)
        return m

    @classmethod
    def from_experts(cls, experts: Experts, group_size: int = int4.GROUP_SIZE) -> Int4Experts:
        return cls.from_float(experts.gate_proj, experts.up_proj, experts.down_proj, group_size)

    @torch.no_grad()
    def set_weights(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantize float stacks [E, out, in] into this module (e.g. new RL weights)."""
        for proj, w in zip(PROJS, (gate, up, down)):
            packed, scale = int4.compress(w, self.group_size)
            getattr(self, f"{proj}_packed").copy_(packed)
            getattr(self, f"{proj}_scale").copy_(scale)

    def dequantize(self, proj: str, experts: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weights [E or len(experts), out, in] of one projection."""
        packed, scale = getattr(self, f"{proj}_packed"), getattr(self, f"{proj}_scale")
        if experts is not None:
            packed, scale = packed[experts], scale[experts]
        return int4.decompress(packed, scale, self.shapes()[proj][1], dtype)

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(packed, scale) of gate, up and down: the buffers as the checkpoint stores them."""
        return [(getattr(self, f"{p}_packed"), getattr(self, f"{p}_scale")) for p in PROJS]

    def _tensors(self):
        return [t for pair in self.pairs() for t in pair]

    def _kernel_weights(self, device):
        """Per expert: gate and up fused into one [2*inter, dim] kernel matrix, and down."""
        key = _version_key(device, self._tensors())
        if self._kernel is None or self._kernel[0] != key:
            q = {p: int4.unpack(getattr(self, f"{p}_packed"), self.shapes()[p][1]) for p in PROJS}
            s = {p: getattr(self, f"{p}_scale") for p in PROJS}
            gate_up = [kernel_pack(torch.cat((q["gate_proj"][e], q["up_proj"][e])),
                                   torch.cat((s["gate_proj"][e], s["up_proj"][e])), device)
                       for e in range(self.n_experts)]
            down = [kernel_pack(q["down_proj"][e], s["down_proj"][e], device) for e in range(self.n_experts)]
            self._kernel = (key, (gate_up, down))
        return self._kernel[1]

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.impl == "auto" and _fused_usable(x, indices, self):
            return int4_triton.moe_decode(x, indices, weights, self.pairs(), self.group_size)
        ok = all(kernel_supported(x.device, o, i, self.group_size) for o, i in ((2 * self.inter, self.dim),
                                                                              (self.dim, self.inter)))
        if _pick(self.impl, x, ok):
            return self._forward_kernel(x, indices, weights)
        return run_experts(self.n_experts, x, indices, weights,
                           lambda used: tuple(self.dequantize(p, used, x.dtype) for p in PROJS))

    def _forward_kernel(self, x, indices, weights):
        """Tokens grouped by expert as in model.Experts; one fused gate/up and one down kernel call per
        expert that received tokens, in bf16."""
        gate_up, down = self._kernel_weights(x.device)
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // indices.shape[1]
        xs = x[token].to(torch.bfloat16)
        ys = torch.empty_like(xs)
        used = counts.nonzero().flatten()
        ends = counts.cumsum(0)[used].tolist()
        for e, end, n in zip(used.tolist(), ends, counts[used].tolist()):
            (w_gu, sz_gu), (w_d, sz_d) = gate_up[e], down[e]
            h = kernel_mm(xs[end - n:end], w_gu, self.group_size, sz_gu)
            h = F.silu(h[:, : self.inter]) * h[:, self.inter:]
            ys[end - n:end] = kernel_mm(h, w_d, self.group_size, sz_d)
        ys = ys.to(x.dtype) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def hf_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Per-expert on-disk names (`...experts.E.gate_proj.weight_packed`) -> views of the stacks."""
        out = {}
        for e in range(self.n_experts):
            for proj, shape in self.shapes().items():
                p = f"{prefix}{e}.{proj}."
                out[p + "weight_packed"] = getattr(self, f"{proj}_packed")[e]
                out[p + "weight_scale"] = getattr(self, f"{proj}_scale")[e]
                out[p + "weight_shape"] = torch.tensor(shape)
        return out

    def _apply(self, fn, recurse=True):
        old = {f"{p}_scale": getattr(self, f"{p}_scale") for p in PROJS}
        super()._apply(fn, recurse)
        _keep_scales_bf16(self, old)
        self._kernel = None
        return self

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, dim={self.dim}, inter={self.inter}, "
                f"group_size={self.group_size}, impl={self.impl}")


# ---------------------------------------------------------------------------------------------------
# Quantization-aware training


class QATLinear(nn.Linear):
    """An nn.Linear whose forward uses the INT4 value of its latent weight (straight-through gradient).
    Made from an nn.Linear by a class swap, so its parameters are the same objects under the same names."""

    group_size = int4.GROUP_SIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, int4.fake_quant(self.weight, self.group_size), self.bias)

    def hf_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return Int4Linear.from_linear(self, self.group_size).hf_tensors(prefix)


class QATExperts(Experts):
    """model.Experts whose forward uses the INT4 values of its latent weights (straight-through)."""

    group_size = int4.GROUP_SIZE

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run_experts(self.n_experts, x, indices, weights,
                           lambda used: tuple(int4.fake_quant(getattr(self, p)[used], self.group_size)
                                              for p in PROJS))

    def hf_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return Int4Experts.from_experts(self, self.group_size).hf_tensors(prefix)


class ModularMLP(MLP):
    """model.MLP calling its projections as modules. model.MLP reads gate_proj.weight and
    up_proj.weight directly (to fuse them into one matmul), which would skip fake quantization and
    INT4 modules; an MLP whose projections are QAT or INT4 gets this class instead (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _sync_mlps(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MLP):
            quantized = any(isinstance(p, (QATLinear, Int4Linear)) for p in (m.gate_proj, m.up_proj, m.down_proj))
            m.__class__ = ModularMLP if quantized else MLP


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _check_targets(targets: str) -> None:
    if targets not in TARGETS:
        raise ValueError(f"INT4 targets must be one of {TARGETS}, got {targets!r}")


def _linear_targets(model: nn.Module):
    """(name, module) of the plain nn.Linear layers `--targets all` quantizes: all but lm_head."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]


def enable_qat(model: nn.Module, targets: str = "experts", group_size: int = int4.GROUP_SIZE) -> nn.Module:
    """Make the forward fake-quantize the routed experts ("experts", as K2) or every Linear except
    lm_head ("all"), keeping fp32 (or whatever dtype) latent weights trainable. In place; returns model.

    Parameters stay the same objects, so this can run before or after the optimizer is built. Modules
    that are already INT4 (a model loaded from an INT4 checkpoint) become trainable QAT modules whose
    latent weights start at their dequantized values. Note: absmax/7.5 is not idempotent, so the
    first QAT forward of such a model re-quantizes them (the scale of a group holding -8 grows by 8/7.5).
    """
    _check_targets(targets)
    for name, m in model.named_modules():  # check everything first: a refusal leaves the model as it was
        if type(m) is Experts and (m.gate_proj.shape[-1] % group_size or m.down_proj.shape[-1] % group_size):
            raise ValueError(f"enable_qat: {name}: expert widths {tuple(m.gate_proj.shape[1:])} are not "
                             f"multiples of group size {group_size}")
    for name, m in _linear_targets(model) if targets == "all" else []:
        if m.in_features % group_size:
            raise ValueError(f"enable_qat: {name}: in_features {m.in_features} is not a multiple of "
                             f"group size {group_size}")
    for name, m in list(model.named_modules()):
        if isinstance(m, Int4Experts):
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            new = Experts(m.n_experts, m.dim, m.inter).to(device=m.gate_proj_packed.device, dtype=dtype)
            with torch.no_grad():
                for p in PROJS:
                    getattr(new, p).copy_(m.dequantize(p))
            new.__class__, new.group_size = QATExperts, m.group_size
            _replace(model, name, new)
        elif isinstance(m, Int4Linear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=m.weight_packed.device, dtype=m._probe.dtype)
            with torch.no_grad():
                new.weight.copy_(m.dequantize())
                if m.bias is not None:
                    new.bias.copy_(m.bias)
            new.__class__, new.group_size = QATLinear, m.group_size
            _replace(model, name, new)
        elif type(m) is Experts:
            m.__class__, m.group_size = QATExperts, group_size
    if targets == "all":
        for name, m in _linear_targets(model):
            m.__class__, m.group_size = QATLinear, group_size
    _sync_mlps(model)
    return model


def disable_qat(model: nn.Module) -> nn.Module:
    """Back to plain float modules holding the latent weights (e.g. to save them for resuming)."""
    for m in model.modules():
        if type(m) is QATExperts:
            m.__class__ = Experts
        elif type(m) is QATLinear:
            m.__class__ = nn.Linear
    _sync_mlps(model)
    return model


def quantize_model(model: nn.Module, targets: str | None = None, group_size: int = int4.GROUP_SIZE) -> nn.Module:
    """Replace float modules by real INT4 modules in memory (round-to-nearest; in place; returns model).

    QAT modules are converted exactly (their INT4 values are what their forward used, whatever
    `targets`). Float modules are converted per `targets`; None means "experts" unless the model
    already has QAT modules, in which case only those are converted.
    """
    has_qat = any(type(m) in (QATExperts, QATLinear) for m in model.modules())
    targets = targets or (None if has_qat else "experts")
    if targets is not None:
        _check_targets(targets)
    for name, m in list(model.named_modules()):
        if type(m) is QATExperts or (type(m) is Experts and targets is not None):
            _replace(model, name, Int4Experts.from_experts(m, getattr(m, "group_size", group_size)))
        elif type(m) is QATLinear or (targets == "all" and type(m) is nn.Linear and name != "lm_head"):
            _replace(model, name, Int4Linear.from_linear(m, getattr(m, "group_size", group_size)))
    _sync_mlps(model)
    return model


def set_impl(model: nn.Module, impl: str) -> None:
    """Choose the forward of every INT4 module: "auto", "kernel" or "dequant"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int4Experts)):
            m.impl = impl


# ---------------------------------------------------------------------------------------------------
# Checkpoints: which Linear is INT4 (HF names), config in and out


def linear_names(model: nn.Module):
    """(HF module name, group size or None) of every Linear the checkpoint format sees: nn.Linear /
    Int4Linear modules by their own names, and one `...experts.E.{gate,up,down}_proj` per expert."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, Int4Linear)):
            yield name, getattr(m, "group_size", None) if isinstance(m, (QATLinear, Int4Linear)) else None
        elif isinstance(m, (Experts, Int4Experts)):
            gs = m.group_size if isinstance(m, (QATExperts, Int4Experts)) else None
            for e in range(m.n_experts):
                for p in PROJS:
                    yield f"{name}.{e}.{p}", gs


def model_quantization_config(model: nn.Module) -> dict | None:
    """The quantization_config describing this model's INT4 modules (None if it has none): K2's
    ignore list when exactly the routed experts are INT4, the `all` list when every Linear but lm_head
    is, else an explicit list of the 16-bit Linears."""
    names = dict(linear_names(model))
    sizes = {gs for gs in names.values() if gs}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise ValueError(f"INT4 modules with different group sizes {sorted(sizes)} cannot share one quantization_config")
    gs = sizes.pop()
    for ignore in (int4.IGNORE_EXPERTS, int4.IGNORE_ALL, sorted(n for n, g in names.items() if not g)):
        qc = int4.quantization_config(ignore, gs)
        scheme = int4.Scheme(qc)
        if all(scheme.group_size(n) == g for n, g in names.items()):
            return qc
    raise AssertionError("unreachable: the explicit ignore list describes any model")


def prepare_for_load(model: nn.Module, quantization_config: dict, source: str = "config.json") -> None:
    """Before loading weights (on the meta model): swap in INT4 modules wherever the checkpoint's
    quantization_config makes a Linear INT4, so the packed tensors load as they are."""
    scheme = int4.Scheme(quantization_config, source)
    for name, m in list(model.named_modules()):
        if type(m) is Experts:
            sizes = {scheme.group_size(f"{name}.{e}.{p}") for e in range(m.n_experts) for p in PROJS}
            if sizes == {None}:
                continue
            if len(sizes) > 1:
                raise ValueError(f"{source}: quantization_config makes only some of {name}'s experts INT4 "
                                 f"({sorted(map(str, sizes))}); openk2 keeps a layer's experts in one format")
            inter, dim = m.gate_proj.shape[1:]
            gs = sizes.pop()
            if dim % gs or inter % gs:
                raise ValueError(f"{source}: {name}: expert widths {dim} and {inter} are not multiples of the "
                                 f"group size {gs}")
            _replace(model, name, Int4Experts(m.n_experts, dim, inter, gs, device="meta"))
        elif type(m) is nn.Linear:
            gs = scheme.group_size(name)
            if gs is None:
                continue
            if name == "lm_head":
                raise ValueError(f"{source}: quantization_config makes lm_head INT4; openk2 keeps the output "
                                 "head in 16 bits (add 'lm_head' to its ignore list)")
            if m.in_features % gs:
                raise ValueError(f"{source}: {name}: in_features {m.in_features} is not a multiple of the "
                                 f"group size {gs}")
            _replace(model, name, Int4Linear(m.in_features, m.out_features, m.bias is not None, gs, device="meta"))
    _sync_mlps(model)


TRAINER_STATE = "trainer.json"  # with optimizer.pt and rng.pt: what `openk2 train` saves beside the weights


def quantize_checkpoint(src: str | Path, dst: str | Path, group_size: int = int4.GROUP_SIZE,
                        targets: str = "experts") -> dict:
    """`openk2 quantize`: round-to-nearest INT4 of an HF-format checkpoint into a compressed-tensors
    pack-quantized one. Other tensors keep the source's dtype; side files (tokenizer, generation
    config, chat template) are copied, a training run's state (optimizer, RNG, trainer.json) is not:
    the output is a model to ship. Returns byte counts of the routed experts."""
    from openk2.checkpoint import DTYPES, INDEX, CheckpointError, load_model, save_model
    _check_targets(targets)
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: the output directory must differ from the input")
    model = load_model(src)
    if any(isinstance(m, (Int4Linear, Int4Experts)) for m in model.modules()):
        raise CheckpointError(f"{src}: already INT4 (quantization_config in config.json); nothing to do")
    quantize_model(model, targets, group_size)
    save_model(model, dst, dtype=DTYPES.get(model.config.torch_dtype, torch.bfloat16))
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", INDEX, TRAINER_STATE) and f.suffix not in (".safetensors", ".pt"):
            shutil.copy2(f, dst / f.name)
    experts = [m for m in model.modules() if isinstance(m, Int4Experts)]
    int4_bytes = sum(t.numel() * t.element_size() for m in experts for t in m.hf_tensors("").values())
    bf16_bytes = sum(m.n_experts * 3 * m.dim * m.inter * 2 for m in experts)
    return {"experts_bytes_int4": int4_bytes, "experts_bytes_bf16": bf16_bytes,
            "int4_linears": sum(isinstance(m, Int4Linear) for m in model.modules()), "expert_layers": len(experts)}

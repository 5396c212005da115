"""Checkpoints in the Hugging Face layout of the real K2 / DeepSeek-V3 releases.

A directory holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Tensor names are the real ones; the only renaming is of the routed
experts: `model.layers.N.mlp.experts.E.gate_proj.weight` on disk <-> row E of the stacked
`model.layers.N.mlp.experts.gate_proj` here. Weight formats read:
- plain fp32 / bf16 / fp16;
- FP8 e4m3 with a `weight_scale_inv` per 128x128 block (DeepSeek-V3, Kimi-K2-Instruct): dequantized;
- INT4 compressed-tensors pack-quantized (Kimi-K2-Thinking): kept packed. openk2.quant swaps in INT4
  modules where config.json's quantization_config says so; each names its own on-disk tensors
  (`hf_tensors`: weight_packed int32, weight_scale bf16, weight_shape), and saving writes them back
  with a quantization_config describing them.
Multi-token-prediction layers (DeepSeek-V3's layer 61) are skipped with a note. Anything else that
does not fit (a missing shard, a corrupt file, a wrong shape, a missing or unexpected tensor) is an
error naming the file and the tensor: nothing is ever left randomly initialised.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2.config import ModelConfig, preset, PRESETS
from openk2.model import Experts, Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint we cannot load as asked; the message names the file and the tensor."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ---------------------------------------------------------------------------------------------------
# Loading


def weight_files(path: Path) -> dict[str, str]:
    """tensor name -> shard file name, checking every shard exists."""
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: not a valid safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise CheckpointError(f"{path}: missing shard file(s) {', '.join(missing)} listed in {INDEX}")
        return weight_map
    if (path / SINGLE).exists():
        return {name: SINGLE for name in _open(path / SINGLE).keys()}
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} found")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _read(handle, file: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{file}: tensor {name!r} could not be read ({e})") from None


def dequant_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """FP8 e4m3 weight times its per-block scale (the stored `weight_scale_inv` multiplies)."""
    out, inp = weight.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return weight.float() * s


def resolve_device(want: str | None, what: str = "--device") -> str:
    """"auto" (or None/"") -> cuda when available, else cpu; "cpu"/"cuda" checked. One rule for the
    engine, `openk2 train` and `openk2 rl`; `what` names the setting in the error."""
    want = (want or "auto").strip().lower()
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{what} {want}: expected auto, cpu or cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} cuda: no CUDA device available")
    return want if want != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path_or_preset: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None) -> Transformer:
    """A checkpoint directory or a preset name (random weights) -> Transformer in eval mode.

    dtype None: fp32 on CPU (the CPU fast paths are fp32 or INT4), the checkpoint's dtype elsewhere.
    device "meta" builds the model (even the 1T one) without allocating.
    """
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    device = torch.device(device)
    src = str(path_or_preset)
    path = Path(src)
    if not path.is_dir():
        if src in PRESETS:
            cfg = preset(src)
            with torch.device(device):
                model = Transformer(cfg)
            return model.to(dtype or torch.float32).eval()
        raise CheckpointError(f"{src}: not a checkpoint directory or a preset ({', '.join(PRESETS)})")
    cfg = ModelConfig.from_hf(path)
    if dtype is None:
        dtype = torch.float32 if device.type in ("cpu", "meta") else DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    with torch.device("meta"):
        model = Transformer(cfg)
    quant = cfg.extra.get("quantization_config") or {}
    if quant.get("quant_method") == "compressed-tensors":
        from openk2 import quant as q  # INT4: swaps in packed modules before weights arrive
        q.prepare_for_load(model, quant, str(path / "config.json"))
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    if device.type != "meta":
        model.init_buffers()  # to_empty left the derived buffers uninitialised
        load_weights(model, path, quant)
    return model.eval()


def _disk_tensors(model: Transformer, keep_vars: bool) -> dict[str, torch.Tensor]:
    """On-disk name -> tensor of the model (views into its storage). Stacked experts are split per
    expert; modules with `hf_tensors` (INT4, QAT) name their own tensors."""
    out, own = {}, set()
    for mname, mod in model.named_modules():
        if hasattr(mod, "hf_tensors"):
            out.update(mod.hf_tensors(mname + "."))
            own.add(mname)
    for name, t in model.state_dict(keep_vars=keep_vars).items():
        owner, _, leaf = name.rpartition(".")
        if owner in own:
            continue
        t = t.data if keep_vars else t
        if isinstance(model.get_submodule(owner) if owner else model, Experts):
            for e in range(t.shape[0]):
                out[f"{owner}.{e}.{leaf}.weight"] = t[e]
        else:
            out[name] = t
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _expected(model: Transformer) -> dict[str, torch.Tensor]:
    """On-disk name -> destination tensor (a view into the model's storage)."""
    return _disk_tensors(model, keep_vars=True)


def _int4_tensor(t: torch.Tensor, dst: torch.Tensor, file: Path, name: str) -> torch.Tensor | None:
    """Check an INT4 tensor (weight_packed / weight_scale / weight_shape) read from `file`; returns what
    to copy into `dst`, or None when there is nothing to copy (weight_shape only checks)."""
    leaf = name.rpartition(".")[2]
    if leaf == "weight_shape":
        if t.dtype.is_floating_point or t.tolist() != dst.tolist():
            raise CheckpointError(f"{file}: tensor {name!r} says the weight is {t.tolist()}, "
                                  f"the config says {dst.tolist()}")
        return None
    if leaf == "weight_packed" and t.dtype != torch.int32:
        raise CheckpointError(f"{file}: tensor {name!r} is {t.dtype}; INT4 packed weights are int32")
    if leaf == "weight_scale":
        if not t.dtype.is_floating_point:
            raise CheckpointError(f"{file}: tensor {name!r} is {t.dtype}; INT4 scales are floating point")
        if t.dtype != dst.dtype and not torch.equal(t.to(dst.dtype).to(t.dtype), t):
            warnings.warn(f"{file}: tensor {name!r}: {t.dtype} scales rounded to {dst.dtype} "
                          "(openk2 holds INT4 scales in bf16)", stacklevel=4)
    return t


def load_weights(model: Transformer, path: Path, quant: dict | None = None) -> None:
    cfg = model.config
    weight_map = weight_files(path)
    expected = _expected(model)
    by_file = defaultdict(list)
    for name, f in weight_map.items():
        by_file[f].append(name)
    block = tuple((quant or {}).get("weight_block_size") or (128, 128))
    filled, skipped_mtp = set(), set()
    for fname, names in sorted(by_file.items()):
        file = path / fname
        handle = _open(file)
        present = set(handle.keys())
        for name in names:
            if name not in present:
                raise CheckpointError(f"{file}: tensor {name!r} listed in {INDEX} is not in the file")
        for name in sorted(names):
            m = _LAYER.match(name)
            if m and int(m.group(1)) >= cfg.num_hidden_layers:
                skipped_mtp.add(int(m.group(1)))
                continue
            if name.endswith("weight_scale_inv"):
                continue  # consumed with its weight below
            if name not in expected:
                if name.endswith(".rotary_emb.inv_freq"):
                    continue  # old transformers wrote this non-persistent buffer
                raise CheckpointError(f"{file}: unexpected tensor {name!r} (not part of this model)")
            t = _read(handle, file, name)
            scale_name = name[: -len("weight")] + "weight_scale_inv"
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                if scale_name not in present:
                    raise CheckpointError(f"{file}: FP8 tensor {name!r} has no {scale_name!r}")
                t = dequant_fp8(t, _read(handle, file, scale_name), block)
            dst = expected[name]
            if tuple(t.shape) != tuple(dst.shape):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, "
                                      f"the config says {tuple(dst.shape)}")
            if name.endswith(("weight_packed", "weight_scale", "weight_shape")):
                t = _int4_tensor(t, dst, file, name)
            if t is not None:
                with torch.no_grad():
                    dst.copy_(t)
            filled.add(name)
    missing = [n for n in expected if n not in filled]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                              + ", ".join(missing[:5]))
    if skipped_mtp:
        warnings.warn(f"{path}: skipped multi-token-prediction layer(s) {sorted(skipped_mtp)} "
                      "(openk2 does not run MTP)", stacklevel=3)


# ---------------------------------------------------------------------------------------------------
# Saving


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under their on-disk names (experts unstacked; INT4 and QAT modules as
    weight_packed / weight_scale / weight_shape)."""
    return _disk_tensors(model, keep_vars=False)


def save_model(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = 4 << 30,
               dtype: torch.dtype | None = None) -> Path:
    """Write config.json + safetensors (sharded past `max_shard_bytes`) that transformers loads.

    Each file is written under a temporary name and renamed into place, so an interrupted save never
    leaves a half-written file under a real name.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    if dtype is not None:  # the router bias stays fp32 and INT4 scales bf16, as the model holds them
        tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(("e_score_correction_bias",
                                                                              "weight_scale")) else v
                   for k, v in tensors.items()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    shards, cur, size = [], {}, 0
    for name in sorted(tensors, key=_natural):
        n = tensors[name].numel() * tensors[name].element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += n
    shards.append(cur)
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX]:
        if stale.exists():
            stale.unlink()
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        tmp = path / (fname + ".tmp")
        save_file(_dedupe(shard), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        _write_json(path / INDEX, index)
    cfg = model.config
    main_dtype = dtype or next((t.dtype for k, t in tensors.items() if k.endswith("embed_tokens.weight")),
                               torch.float32)
    hf = cfg.to_hf()
    hf["torch_dtype"] = _dtype_name(main_dtype) if main_dtype in DTYPES.values() else cfg.torch_dtype
    # Describe what was written, not what was read: a dequantized FP8 or INT4 source loses its config.
    hf.pop("quantization_config", None)
    from openk2.quant import model_quantization_config
    qc = model_quantization_config(model)
    if qc is not None:
        hf["quantization_config"] = qc
    _write_json(path / "config.json", hf)
    return path


def _dedupe(shard: dict) -> dict:
    # safetensors refuses tensors sharing storage (views of one stacked expert tensor): copy them.
    return {k: v.clone() if v.storage_offset() or v.untyped_storage().nbytes() != v.numel() * v.element_size()
            else v for k, v in shard.items()}


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _write_json(file: Path, obj) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, file)

"""Weight-only quantization of a DiffusionGemma model: int8, fp8 and int4, covering the 3-D expert tensors.

Owns: the packed formats, the choice of which weights are quantized (`quantization_targets`), swapping those
weights for modules that hold packed data and dequantize on the fly in `forward` (`quantize_model`), and a
shard-by-shard loader that builds the model without weights and quantizes each tensor as it is read
(`load_quantized`), so host memory stays near one shard instead of the whole bf16 model.

Formats (weights `W[..., out, in]`, quantized along `in`, the reduction axis of `F.linear`):
- int8: symmetric, one fp32 scale per output channel (per expert and channel for the 3-D experts).
- fp8:  `torch.float8_e4m3fn` values, one fp32 scale per output channel. Storage works on any device (the
  dequantization is a cast); `check_scheme` only accepts it on CUDA cards with fp8 tensor cores (sm_89+).
- int4: symmetric, groups of 128 along `in` (zero-padded when `in` is not a multiple), one fp16 scale per
  group chosen among a few clip ratios to minimise the group's squared error, two values packed per byte.

What is quantized: every `nn.Linear` (attention, dense MLP, self-conditioning, vision tower) and both expert
tensors (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]); optionally the tied token
embedding table together with `lm_head`. Kept in the compute dtype: router, norms, scalars, the vision
position table. Encoder and decoder share their layers' weights, so one quantized module serves both.

This is the simple, correct path: every forward dequantizes the weights it uses into the compute dtype (the
experts one at a time, or a layer at a time for transformers' grouped GEMM: `set_expert_dequantization`);
fused CUDA kernels are later work. Knows nothing about prompts or sampling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("none", "int8", "fp8", "int4")
GROUP_SIZE = 128
INT4_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
CHUNK_ELEMENTS = 1 << 20  # rows are quantized / dequantized in chunks of about this many weights (4 MB fp32)
CUDA_CHUNK_ELEMENTS = 1 << 24  # on a GPU: fewer kernel launches, 64 MB fp32 intermediates
KEEP_IN_COMPUTE_DTYPE = (re.compile(r"(^|\.)router\.proj$"),)  # expert selection stays exact


class QuantizationError(Exception):
    """A quantization request that cannot be honoured; the message says why and what to use instead."""


def check_scheme(scheme: str, device: torch.device | str) -> None:
    """Refuse unknown schemes, and fp8 on a CUDA card without fp8 tensor cores (before Ada / Hopper)."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}; use one of {', '.join(SCHEMES)}")
    device = torch.device(device)
    if scheme == "fp8" and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(index)
            raise QuantizationError(
                f"--quantize fp8 needs fp8 tensor cores (compute capability 8.9+, e.g. RTX 40xx/50xx, H100); "
                f"{name} is {major}.{minor}: use int8 or int4"
            )


# ---------------------------------------------------------------------------------------------------------------
# Packed formats: plain functions on tensors of any leading shape [..., out, in].


def quantized_nbytes(shape: tuple[int, ...], scheme: str) -> int:
    """Bytes of the packed weight plus its scales for a weight of `shape` ([..., out, in])."""
    *lead, out_features, in_features = shape
    rows = out_features
    for size in lead:
        rows *= size
    if scheme in ("int8", "fp8"):
        return rows * in_features + rows * 4
    if scheme == "int4":
        groups = -(-in_features // GROUP_SIZE)
        return rows * groups * GROUP_SIZE // 2 + rows * groups * 2
    if scheme == "none":
        return rows * in_features * 2
    raise QuantizationError(f"unknown quantization {scheme!r}")


def quantize_tensor(
    weight: torch.Tensor, scheme: str, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` [..., out, in] on `device` (default: its own), a chunk of rows at a time.

    Returns (data, scale): int8 / float8_e4m3fn data [..., out, in] with fp32 scales [..., out, 1], or for
    int4 uint8 data [..., out, groups*64] (two values per byte) with fp16 scales [..., out, groups].
    """
    device = torch.device(device) if device is not None else weight.device
    *lead, out_features, in_features = weight.shape
    if device.type == "meta":  # shapes only (planning, tests): nothing to compute
        groups = -(-in_features // GROUP_SIZE)
        data_shape = (*lead, out_features, groups * GROUP_SIZE // 2 if scheme == "int4" else in_features)
        scale_shape = (*lead, out_features, groups if scheme == "int4" else 1)
        data_dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}[scheme]
        scale_dtype = torch.float16 if scheme == "int4" else torch.float32
        return (torch.empty(data_shape, dtype=data_dtype, device=device),
                torch.empty(scale_shape, dtype=scale_dtype, device=device))
    rows = weight.reshape(-1, in_features)  # [R, in] (a view for contiguous weights)
    step = max(1, _chunk_elements(device) // max(in_features, 1))
    datas, scales = [], []
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].to(device).to(torch.float32)  # cast on the device, not the host
        data, scale = _QUANTIZERS[scheme](chunk)
        datas.append(data)
        scales.append(scale)
    data = torch.cat(datas) if len(datas) > 1 else datas[0]
    scale = torch.cat(scales) if len(scales) > 1 else scales[0]
    return data.reshape(*lead, out_features, -1), scale.reshape(*lead, out_features, -1)


def dequantize_tensor(
    data: torch.Tensor, scale: torch.Tensor, scheme: str, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The inverse of `quantize_tensor` for any leading shape (e.g. one expert's slice): [..., out, in].

    Large tensors are dequantized a chunk of rows at a time into the output, so the fp32 intermediates stay
    small (a whole layer of experts dequantizes with about its bf16 size as the transient).
    """
    lead = data.shape[:-1]
    data_rows, scale_rows = data.reshape(-1, data.shape[-1]), scale.reshape(-1, scale.shape[-1])
    step = max(1, _chunk_elements(data.device) // max(in_features, 1))
    if data_rows.shape[0] <= step:
        return _dequantize_rows(data_rows, scale_rows, scheme, in_features, dtype).reshape(*lead, in_features)
    out = torch.empty((data_rows.shape[0], in_features), dtype=dtype, device=data.device)
    for start in range(0, data_rows.shape[0], step):
        out[start : start + step] = _dequantize_rows(data_rows[start : start + step],
                                                     scale_rows[start : start + step], scheme, in_features, dtype)
    return out.reshape(*lead, in_features)


def _chunk_elements(device: torch.device) -> int:
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS


def _dequantize_rows(data: torch.Tensor, scale: torch.Tensor, scheme: str, in_features: int,
                     dtype: torch.dtype) -> torch.Tensor:
    if scheme in ("int8", "fp8"):
        return (data.to(torch.float32) * scale).to(dtype)
    if scheme == "int4":
        low = (data & 0x0F).to(torch.int8) - 8
        high = (data >> 4).to(torch.int8) - 8
        values = torch.stack((low, high), dim=-1).reshape(data.shape[0], -1, GROUP_SIZE)  # [R, G, 128]
        weight = (values.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).flatten(-2)
        return weight[..., :in_features].to(dtype)
    raise QuantizationError(f"unknown quantization {scheme!r}")


def _quantize_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = rows.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (rows / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def _quantize_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = rows.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (rows / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _quantize_int4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    padding = (-rows.shape[-1]) % GROUP_SIZE
    if padding:
        rows = F.pad(rows, (0, padding))
    groups = rows.reshape(rows.shape[0], -1, GROUP_SIZE)  # [R, G, 128]
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    best_scale, best_error = None, None
    for ratio in INT4_CLIP_RATIOS:
        scale = (absmax * ratio / 7.0).to(torch.float16).to(torch.float32)  # the scale as it will be stored
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        error = (groups / scale).round_().clamp_(-8, 7).mul_(scale).sub_(groups).square_().sum(dim=-1, keepdim=True)
        if best_scale is None or best_error is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_error = torch.where(better, error, best_error)
    assert best_scale is not None
    values = (groups / best_scale).round_().clamp_(-8, 7).add_(8).to(torch.uint8).reshape(rows.shape[0], -1)
    packed = values[:, 0::2] | (values[:, 1::2] << 4)
    return packed, best_scale.squeeze(-1).to(torch.float16)


_QUANTIZERS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "int8": _quantize_int8,
    "fp8": _quantize_fp8,
    "int4": _quantize_int4,
}


# ---------------------------------------------------------------------------------------------------------------
# Modules that replace the float weights.


class QuantizedLinear(nn.Module):
    """`nn.Linear` with a packed weight; dequantizes a chunk of output rows at a time in `forward`."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, scheme: str, in_features: int,
                 compute_dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, in_features, int(data.shape[0])
        self.compute_dtype = compute_dtype
        self.qweight = nn.Buffer(data)
        self.scale = nn.Buffer(scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return dequantize_tensor(self.qweight[start:stop], self.scale[start:stop], self.scheme, self.in_features,
                                 self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads `.weight` (full dequantization)
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chunked_linear(x, self.dequantize, self.out_features, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class QuantizedExperts(nn.Module):
    """`DiffusionGemmaTextExperts` with packed `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I].

    Two ways to run, same arithmetic as transformers' implementations:
    - `whole_layer=False` (default, least memory): each expert that receives tokens is dequantized on its own
      (the transient is one expert's weights; a host sync per expert);
    - `whole_layer=True` (fast on GPUs): the layer's experts are dequantized at once and run through
      transformers' grouped GEMM (`grouped_mm_experts_forward`), no host sync; the transient is one layer's
      experts in the compute dtype (1.42 GiB at the 26B-A4B shape in bf16). See `set_expert_dequantization`.
    """

    whole_layer = False
    has_gate, has_bias, is_transposed, has_post_expert_norm, _is_expert_parallel = True, False, False, False, False

    def __init__(self, original: Any, gate_up: tuple[torch.Tensor, torch.Tensor],
                 down: tuple[torch.Tensor, torch.Tensor], scheme: str, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts = int(original.num_experts)
        self.hidden_dim = int(original.hidden_dim)
        self.intermediate_dim = int(original.intermediate_dim)
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = original.act_fn
        self.scheme, self.compute_dtype = scheme, compute_dtype
        self.gate_up_qweight, self.gate_up_scale = nn.Buffer(gate_up[0]), nn.Buffer(gate_up[1])
        self.down_qweight, self.down_scale = nn.Buffer(down[0]), nn.Buffer(down[1])

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up = dequantize_tensor(self.gate_up_qweight[expert], self.gate_up_scale[expert], self.scheme,
                                    self.hidden_dim, dtype)  # [2I, H]
        down = dequantize_tensor(self.down_qweight[expert], self.down_scale[expert], self.scheme,
                                 self.intermediate_dim, dtype)  # [H, I]
        return gate_up, down

    @property
    def gate_up_proj(self) -> torch.Tensor:  # full dequantization, for code that reads the float tensors
        return dequantize_tensor(self.gate_up_qweight, self.gate_up_scale, self.scheme, self.hidden_dim,
                                 self.compute_dtype)

    @property
    def down_proj(self) -> torch.Tensor:
        return dequantize_tensor(self.down_qweight, self.down_scale, self.scheme, self.intermediate_dim,
                                 self.compute_dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H]; top_k_index, top_k_weights: [T, K]
        if self.whole_layer:
            from transformers.integrations.moe import grouped_mm_experts_forward

            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # [E, K, T]
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for expert in expert_hit:
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            gate_up, down = self.expert_weights(expert, hidden_states.dtype)
            gate, up = F.linear(hidden_states[token_idx], gate_up).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, down) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:  # used by the grouped GEMM path
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, width={self.intermediate_dim}, " \
               f"scheme={self.scheme}, whole_layer={self.whole_layer}"


def set_expert_dequantization(model: nn.Module, whole_layer: bool) -> int:
    """Choose per-expert (least memory) or whole-layer (grouped GEMM, fast on GPU) expert dequantization."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedExperts):
            module.whole_layer = whole_layer
            count += 1
    return count


class QuantizedEmbedding(nn.Module):
    """The scaled token embedding with a packed table [V, H]: rows are dequantized as they are looked up.

    `.weight` dequantizes the whole table (the decoder's self-conditioning multiplies by it); that transient
    is what makes embedding quantization a memory win only once a fused kernel exists (see engine/plan.py).
    """

    def __init__(self, original: Any, data: torch.Tensor, scale: torch.Tensor, scheme: str,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(original.num_embeddings), int(original.embedding_dim)
        self.padding_idx = original.padding_idx
        self.scheme, self.compute_dtype = scheme, compute_dtype
        self.qweight, self.scale = nn.Buffer(data), nn.Buffer(scale)
        self.embed_scale = nn.Buffer(torch.tensor(float(original.scalar_embed_scale), device=data.device),
                                     persistent=False)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return dequantize_tensor(self.qweight[start:stop], self.scale[start:stop], self.scheme, self.embedding_dim,
                                 self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = dequantize_tensor(self.qweight[flat], self.scale[flat], self.scheme, self.embedding_dim,
                                 self.compute_dtype)
        return rows.reshape(*input_ids.shape, -1) * self.embed_scale.to(self.compute_dtype)


class QuantizedTiedHead(nn.Module):
    """`lm_head` tied to a `QuantizedEmbedding`: reads the same packed table (one copy), in vocabulary chunks."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list, so the table is not registered (and counted) twice

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self._embedding[0]
        return _chunked_linear(x, table.dequantize, table.num_embeddings, table.embedding_dim, None)


def _chunked_linear(x: torch.Tensor, dequantize: Callable[[int, int], torch.Tensor], out_features: int,
                    in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    step = max(1, _chunk_elements(x.device) // max(in_features, 1))
    if step >= out_features:
        return F.linear(x, dequantize(0, out_features), bias)
    parts = [F.linear(x, dequantize(start, min(start + step, out_features))) for start in
             range(0, out_features, step)]
    out = torch.cat(parts, dim=-1)
    return out + bias if bias is not None else out


# ---------------------------------------------------------------------------------------------------------------
# Which weights, and swapping them.


@dataclass(slots=True)
class Target:
    """One quantized weight group: a unique tensor (or the two expert tensors) and every module path using it."""

    kind: str  # linear | experts | embedding
    paths: list[str]  # module paths that hold it (encoder and decoder share layers; lm_head shares the table)
    shapes: dict[str, tuple[int, ...]]  # parameter name in the module -> shape

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.shapes.values():
            count = 1
            for size in shape:
                count *= size
            total += count
        return total

    def nbytes(self, scheme: str) -> int:
        return sum(quantized_nbytes(shape, scheme) for shape in self.shapes.values())


def quantization_targets(model: nn.Module, include_embeddings: bool = False) -> list[Target]:
    """The weights `quantize_model` replaces, grouped by the tensor they share (works on a meta-device model)."""
    groups: dict[int, Target] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        kind = _target_kind(path, module, include_embeddings)
        if kind is None:
            continue
        if kind == "experts":
            key = id(module.gate_up_proj)
            shapes = {"gate_up_proj": tuple(module.gate_up_proj.shape), "down_proj": tuple(module.down_proj.shape)}
        else:
            key = id(module.weight)
            shapes = {"weight": tuple(module.weight.shape)}
        if key in groups:
            groups[key].paths.append(path)
            if kind == "embedding":
                groups[key].kind = "embedding"  # lm_head first, table second: the group is the table
        else:
            groups[key] = Target(kind=kind, paths=[path], shapes=shapes)
    return list(groups.values())


def _target_kind(path: str, module: nn.Module, include_embeddings: bool) -> str | None:
    name = type(module).__name__
    if name == "DiffusionGemmaTextExperts":
        return "experts"
    if name == "DiffusionGemmaTextScaledWordEmbedding":
        return "embedding" if include_embeddings else None
    if isinstance(module, nn.Linear):
        if _is_head(path):  # tied to the table: joins its "embedding" group
            return "linear" if include_embeddings else None
        if any(pattern.search(path) for pattern in KEEP_IN_COMPUTE_DTYPE):
            return None
        return "linear"
    return None


@dataclass(slots=True)
class QuantReport:
    scheme: str
    include_embeddings: bool
    quantized_tensors: int = 0
    quantized_parameters: int = 0
    weight_bytes_before: int = 0  # every unique parameter, in its dtype before quantization
    quantized_bytes_before: int = 0  # the part of it that was quantized
    weight_bytes_after: int = 0  # unique parameters left + packed data + scales
    modules: dict[str, int] = field(default_factory=dict)  # kind -> module paths replaced

    @property
    def quantized_fraction(self) -> float:
        return self.quantized_bytes_before / max(self.weight_bytes_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "include_embeddings": self.include_embeddings,
            "quantized_tensors": self.quantized_tensors,
            "quantized_parameters": self.quantized_parameters,
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "quantized_fraction": round(self.quantized_fraction, 4),
            "modules": dict(self.modules),
        }


def quantize_model(model: nn.Module, scheme: str, include_embeddings: bool = False) -> QuantReport:
    """Replace the target weights of `model` (already on its device) by packed modules; returns what changed."""
    check_scheme(scheme, _first_device(model))
    report = QuantReport(scheme=scheme, include_embeddings=include_embeddings)
    report.weight_bytes_before = _unique_parameter_bytes(model)
    if scheme == "none":
        report.weight_bytes_after = _unique_tensor_bytes(model)
        return report
    for target in quantization_targets(model, include_embeddings):
        module = model.get_submodule(target.paths[0])
        tensors = {name: getattr(module, name) for name in target.shapes}
        packed = {name: quantize_tensor(tensor.detach(), scheme) for name, tensor in tensors.items()}
        dtype = next(iter(tensors.values())).dtype
        _install(model, target, packed, scheme, dtype, report)
        report.quantized_bytes_before += sum(t.numel() * t.element_size() for t in tensors.values())
    report.weight_bytes_after = _unique_tensor_bytes(model)
    return report


def _install(model: nn.Module, target: Target, packed: dict[str, tuple[torch.Tensor, torch.Tensor]], scheme: str,
             dtype: torch.dtype, report: QuantReport) -> None:
    """Swap every path of `target` for one quantized module built from `packed`."""
    original: Any = model.get_submodule(target.paths[0])
    if target.kind == "experts":
        replacement: nn.Module = QuantizedExperts(original, packed["gate_up_proj"], packed["down_proj"], scheme, dtype)
        replacements = {path: replacement for path in target.paths}
    elif target.kind == "embedding":
        table_path = next(path for path in target.paths if not _is_head(path))
        table = QuantizedEmbedding(model.get_submodule(table_path), *packed["weight"], scheme, dtype)
        replacements = {path: (QuantizedTiedHead(table) if _is_head(path) else table)
                        for path in target.paths}
    else:
        bias = original.bias.detach() if getattr(original, "bias", None) is not None else None
        replacement = QuantizedLinear(*packed["weight"], scheme, int(original.in_features), dtype, bias)
        replacements = {path: replacement for path in target.paths}
    for path, module in replacements.items():
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
    report.quantized_tensors += len(packed)
    report.quantized_parameters += target.parameters
    report.modules[target.kind] = report.modules.get(target.kind, 0) + len(target.paths)


def _is_head(path: str) -> bool:
    return path == "lm_head" or path.endswith(".lm_head")


def _first_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _unique_parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _unique_tensor_bytes(model: nn.Module) -> int:
    """Unique parameters plus persistent buffers (where the packed weights live), each counted once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or id(tensor) in seen or name in module._non_persistent_buffers_set:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored now (packed data, scales and float parameters; tied ones once)."""
    return _unique_tensor_bytes(model)


# ---------------------------------------------------------------------------------------------------------------
# Shard-by-shard loading.


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules with parameters on the meta device (no memory) and buffers for real.

    Buffers such as the rotary frequencies and the embedding scale are computed in `__init__` and are not in
    the checkpoint, so they must be real; parameters are all read from the shards.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _checkpoint_renamer(model: Any) -> Callable[[str], str]:
    """Map checkpoint key names to model names with the renamings transformers itself registers."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # pragma: no cover - older transformers: names are used as they are
        return lambda key: key
    rules: list[tuple[str, str]] = []
    for transform in get_model_conversion_mapping(model):
        if not isinstance(transform, WeightRenaming):
            raise QuantizationError(
                f"this checkpoint needs transformers' weight conversion ({type(transform).__name__}); "
                "load it without --quantize"
            )
        for source, target in zip(transform.source_patterns, transform.target_patterns, strict=False):
            rules.append((source, target))

    def rename(key: str) -> str:
        for source, target in rules:
            key = re.sub(source, target, key)
        return key

    return rename


def load_quantized(
    model_dir: Path | str,
    scheme: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    on_progress: Callable[[float], None] | None = None,
    include_embeddings: bool = False,
) -> tuple[Any, QuantReport]:
    """Build `DiffusionGemmaForBlockDiffusion` from `model_dir` with `scheme` applied while reading the shards.

    The model is created with parameters on the meta device; each tensor of each `*.safetensors` file is read,
    quantized (or cast to `dtype`) on `device`, and put in place, so host memory holds about one shard at a
    time. `dtype` is the compute dtype and the dtype of the weights that stay unquantized. Returns the model
    (eval mode, on `device`, tied weights shared, the checkpoint's generation config) and a `QuantReport`.
    """
    from transformers import DiffusionGemmaConfig

    model_dir = Path(model_dir)
    config = DiffusionGemmaConfig.from_pretrained(model_dir)
    shards = sorted(model_dir.glob("*.safetensors"))
    total = sum(_shard_tensor_bytes(shard) for shard in shards)
    model, report = build_quantized(config, _shard_tensors(shards), scheme, device, dtype, include_embeddings,
                                    on_progress=on_progress, total_bytes=total, renamed=True)
    try:
        model.generation_config = model.generation_config_class.from_pretrained(model_dir)
    except OSError:
        pass
    return model, report


def build_quantized(
    config: Any,
    tensors: Iterable[tuple[str, torch.Tensor]],
    scheme: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    include_embeddings: bool = False,
    on_progress: Callable[[float], None] | None = None,
    total_bytes: int | None = None,
    renamed: bool = False,
) -> tuple[Any, QuantReport]:
    """Build the model for `config` from a stream of (name, tensor), quantizing each target as it arrives.

    Names are the model's own (`model.decoder.layers.0.experts.gate_up_proj`; tied aliases are one weight),
    or checkpoint names when `renamed` (transformers' registered renamings are applied). Every weight must
    arrive exactly once. Used by `load_quantized` (shards) and `benchmarks.gpu_step` (random weights).
    """
    from transformers import DiffusionGemmaForBlockDiffusion

    device = torch.device(device)
    check_scheme(scheme, device)
    with parameters_on_meta():
        model: Any = DiffusionGemmaForBlockDiffusion(config)
    model.eval()
    report = QuantReport(scheme=scheme, include_embeddings=include_embeddings)
    report.weight_bytes_before = sum(p.numel() * dtype.itemsize for p in model.parameters())

    aliases: dict[int, list[tuple[nn.Module, str]]] = {}
    by_name: dict[str, nn.Parameter | torch.Tensor] = {}
    for module_path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_path}." if module_path else ""
        for name, param in module._parameters.items():
            if param is not None:
                aliases.setdefault(id(param), []).append((module, name))
                by_name[prefix + name] = param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                by_name[prefix + name] = buffer
                aliases.setdefault(id(buffer), []).append((module, name))

    targets = quantization_targets(model, include_embeddings) if scheme != "none" else []
    target_of: dict[int, Target] = {}
    for target in targets:
        module = model.get_submodule(target.paths[0])
        for name in target.shapes:
            target_of[id(getattr(module, name))] = target
    pending: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    rename = _checkpoint_renamer(model) if renamed else (lambda key: key)

    done, loaded = 0, set()
    for key, tensor in tensors:
        name = rename(key)
        if name not in by_name:
            raise QuantizationError(f"tensor {key!r} matches no weight of the model")
        old = by_name[name]
        done += tensor.numel() * tensor.element_size()
        group = target_of.get(id(old))
        if group is not None:
            attr = next(attr for module, attr in aliases[id(old)] if attr in group.shapes)
            parts = pending.setdefault(id(group), {})
            parts[attr] = quantize_tensor(tensor, scheme, device)
            report.quantized_bytes_before += tensor.numel() * dtype.itemsize
            if len(parts) == len(group.shapes):
                _install(model, group, parts, scheme, dtype, report)
                del pending[id(group)]
        else:
            value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            if value.device.type == "cpu" and value.data_ptr() == tensor.data_ptr():  # a view of a shard's mmap
                value = value.clone()
            for module, attr in aliases[id(old)]:  # every tied alias gets the same tensor
                if isinstance(old, nn.Parameter):
                    if not isinstance(value, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=False)
                    module._parameters[attr] = value
                else:
                    module._buffers[attr] = value
        loaded.add(id(old))
        del tensor
        if on_progress is not None and total_bytes:
            on_progress(min(done / total_bytes, 1.0))
    missing = sorted(name for name, tensor in by_name.items()
                     if id(tensor) not in loaded and tensor.device.type == "meta")
    if pending or missing:
        raise QuantizationError(f"the checkpoint lacks {', '.join(missing[:5]) or 'expert tensors'}"
                                f"{' ...' if len(missing) > 5 else ''}")
    model.to(device)  # the computed buffers (rotary frequencies, scales); loaded tensors are already there
    report.weight_bytes_after = _unique_tensor_bytes(model)
    return model, report


def _shard_tensors(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every shard, one at a time; freed host memory is handed back after each shard."""
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                yield key, reader.get_tensor(key)
        _release_freed_host_memory()


def _release_freed_host_memory() -> None:
    """Hand memory freed by the previous shard back to the OS (glibc keeps freed heap pages resident)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _shard_tensor_bytes(shard: Path) -> int:
    """Bytes of tensor data in a safetensors file, read from its header."""
    with shard.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    return sum(end - start for name, info in header.items() if name != "__metadata__"
               for start, end in [info["data_offsets"]])

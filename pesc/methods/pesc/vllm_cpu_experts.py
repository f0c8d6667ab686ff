"""PESC's experts on vLLM's CPU grouped-GEMM MoE kernel: only each token's top-k experts are computed.

The stacked path of vllm_model.py runs every expert with weight zero off the top-k (E/k times the needed work,
about 17 % of a SmolLM2-135M decode step). vLLM's CPU build ships a fused MoE kernel (`torch.ops._C.cpu_fused_moe`:
per token, sum over its top-k experts e of w_e * W2_e act(W13_e x + b13_e), gated: act(gate) * up) that does only
the top-k work. A PESC adapter is not gated, GELU(down x), so it goes through the kernel as a gated expert whose
gate half is `down` and whose up half is zero weights with bias 1: GELU(down x) * 1. The adapter width is padded to
the kernel's 32-column multiple with zero rows of `down` and zero columns of `up`, which add exactly nothing.

The kernel is wrapped in one custom op (`torch.ops.vllm.pesc_cpu_experts`), opaque to vLLM's torch.compile, as vLLM
wraps its own MoE.
"""

import functools

import torch
from vllm.platforms import CpuArchEnum, current_platform
from vllm.utils.torch_utils import direct_register_custom_op

_ALIGNMENT = 32  # the kernel's output-column multiple (hidden size, padded adapter width)
PACKED = ("kernel_w13", "kernel_b13", "kernel_w2")  # what `pack` returns, in order


@functools.cache
def kernel_isa() -> str | None:
    """The kernel variant for this machine ("vec" on x86, "neon" on Arm), or None where vLLM's build has none."""
    if not current_platform.is_cpu() or not hasattr(torch.ops._C, "cpu_fused_moe"):
        return None
    return "neon" if current_platform.get_cpu_architecture() == CpuArchEnum.ARM else "vec"


def supports(hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether the kernel runs this layer: a CPU build that has it, a hidden size it tiles, a dtype it computes."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return kernel_isa() is not None and hidden_size % _ALIGNMENT == 0 and dtype in dtypes


def pack(down: torch.Tensor, up: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's prepacked weights from the stacks ([E*d, H] each, rows e*d.. expert e): `w13` [E, 2*dp, H]
    (down, then zeros), `b13` [E, 2*dp] (zeros, then ones), `w2` [E, H, dp] (up transposed); dp = d padded to 32."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    hidden = down.shape[1]
    width = down.shape[0] // num_experts
    padded = -(-width // _ALIGNMENT) * _ALIGNMENT
    w13 = down.new_zeros(num_experts, 2 * padded, hidden)
    w13[:, :width] = down.view(num_experts, width, hidden)
    b13 = down.new_zeros(num_experts, 2 * padded)
    b13[:, padded:] = 1
    w2 = down.new_zeros(num_experts, hidden, padded)
    w2[:, :, :width] = up.view(num_experts, width, hidden).transpose(1, 2)
    isa = kernel_isa()
    return cpu_prepack_moe_weight(w13, isa), b13, cpu_prepack_moe_weight(w2, isa)


def _experts(rows: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
             ids: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{ids[:, k]}(rows): float32 weights, int32 ids, both contiguous (the kernel reads
    them as flat buffers)."""
    out = torch.empty_like(rows)
    torch.ops._C.cpu_fused_moe(out, rows, w13, w2, b13, None, weights, ids, False, "gelu", kernel_isa())
    return out


def _experts_fake(rows, w13, b13, w2, weights, ids):
    return torch.empty_like(rows)


direct_register_custom_op("pesc_cpu_experts", _experts, fake_impl=_experts_fake)


def top_k_experts(rows: torch.Tensor, w13: torch.Tensor, b13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """The top-k experts' weighted sum for each row of `rows` ([T, H]), from `pack`'s weights; `weights` [T, k],
    `ids` [T, k]."""
    return torch.ops.vllm.pesc_cpu_experts(rows.contiguous(), w13, b13, w2, weights.to(torch.float32).contiguous(),
                                           ids.to(torch.int32).contiguous())

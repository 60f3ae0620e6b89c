"""Mixture of Experts: a top-k router, sort-based dispatch, experts, optional shared expert.

Routing (Megatron-Core's): router logits ``x Wᵀ`` in float32 (float64 for float64 inputs);
by default the top-k logits are softmaxed (weights renormalised over the chosen experts); with
``moe_router_pre_softmax`` the softmax runs over all experts and the top-k probabilities are
used as they are. Tokens are dispatched by a stable argsort of their expert ids, the experts
see contiguous per-expert slices, and the results are gathered back per token and summed with
the routing weights in float32. Dispatch and combine are permutation gathers both ways (no
atomic accumulation: deterministic), and nothing in the layer waits on the host — except, for
experts that need the per-expert counts there (``host_counts``: the sequential experts, TE's
grouped linears), on the copy of the counts alone, with the dispatch and the shared expert
already queued behind it so that the GPU stays busy meanwhile.

Load balancing (``moe_router_load_balancing_type="aux_loss"``, Switch/GShard), recorded as the
auxiliary loss ``"moe_load_balancing"`` in training mode with grad enabled::

    loss = moe_aux_loss_coeff · E · Σ_e f_e · P_e
    f_e = (token-slots routed to e) / (N · k)        P_e = mean over tokens of softmax(logits)_e
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from attnplug._errors import ConfigError
from attnplug.layers._checks import check_config, check_layer_args, check_positive_int
from attnplug.layers.attention import check_hidden
from attnplug.layers.aux_loss import AuxLossMixin
from attnplug.layers.linear import init_normal, output_layer_init_method
from attnplug.layers.mlp import activation_function, glu
from attnplug.layers.norms import compute_dtype
from attnplug.spec import ModuleSpec, build_module

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig
    from attnplug.layers.submodules import MoESubmodules

__all__ = ["MoELayer", "SequentialExperts", "BatchedExperts", "TopKRouter", "MOE_AUX_LOSS"]

MOE_AUX_LOSS = "moe_load_balancing"


class SequentialExperts(nn.Module):
    """The local experts: ``E`` MLPs with stacked weights, run one after another.

    ``fc1_weight [E, ffn or 2·ffn, hidden]``, ``fc2_weight [E, hidden, ffn]`` (``ffn =
    config.moe_ffn_size``; gated linear unit and activation as in the config).
    ``forward(x[N, hidden], tokens_per_expert[E]) -> [N, hidden]``: the rows of ``x`` are sorted
    by expert, expert ``e`` owning the next ``tokens_per_expert[e]`` rows.

    ``host_counts = True``: the counts are needed on the host (row splits), so the MoE layer
    passes them as a CPU tensor, copied while the GPU still has work queued behind the copy
    (see :class:`MoELayer`); experts without the attribute get the device tensor.
    """

    host_counts = True

    def __init__(self, num_local_experts: int, *, config: TransformerConfig) -> None:
        super().__init__()
        owner = type(self).__name__
        check_config(owner, config)
        E = check_positive_int(owner, "num_local_experts", num_local_experts)
        self.num_local_experts = E
        self.gated = config.gated_linear_unit
        self.activation_func = activation_function(config.activation_func)
        ffn, hidden, dtype = config.moe_ffn_size, config.hidden_size, config.torch_dtype
        fc1_size = 2 * ffn if self.gated else ffn
        self.fc1_weight = nn.Parameter(torch.empty(E, fc1_size, hidden, dtype=dtype))
        self.fc2_weight = nn.Parameter(torch.empty(E, hidden, ffn, dtype=dtype))
        init_normal(config.init_method_std)(self.fc1_weight)
        output_layer_init_method(config)(self.fc2_weight)
        bias = config.add_bias_linear
        self.fc1_bias = nn.Parameter(torch.zeros(E, fc1_size, dtype=dtype)) if bias else None
        self.fc2_bias = nn.Parameter(torch.zeros(E, hidden, dtype=dtype)) if bias else None

    def extra_repr(self) -> str:
        E, fc1, hidden = self.fc1_weight.shape
        return f"experts={E}, hidden={hidden}, fc1={fc1}, gated={self.gated}"

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its rows: x (n, hidden) -> (n, hidden)."""
        return self.expert_mlp(x, *self._weights()[e])

    def _weights(self) -> list[tuple]:
        """Per expert ``(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` (biases or None), the
        stacked parameters ``unbind`` once: autograd then stacks their gradients once instead
        of filling a zero tensor the size of every stacked parameter for each expert it
        indexes."""
        params = (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        per_param = [[None] * self.num_local_experts if p is None else p.unbind(0)
                     for p in params]
        return list(zip(*per_param, strict=True))

    def expert_mlp(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                   w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
        """One expert's MLP on its rows with its weights: x (n, hidden) -> (n, hidden). The
        matmuls a subclass changes (a recipe's quantised linears, say) go here."""
        h = F.linear(x, w1, b1)  # (n, ffn or 2·ffn)
        h = glu(h, self.activation_func) if self.gated else self.activation_func(h)  # (n, ffn)
        return F.linear(h, w2, b2)  # (n, hidden)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        counts = [int(c) for c in tokens_per_expert.tolist()]
        if len(counts) != self.num_local_experts or sum(counts) != x.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: tokens_per_expert={counts} must have "
                f"{self.num_local_experts} entries summing to the {x.shape[0]} rows of x"
            )
        # split, not slices: one gradient concatenation instead of a zero-filled (N, hidden)
        # tensor per expert
        outputs = [self.expert_mlp(rows, *weights)
                   for rows, weights in zip(x.split(counts), self._weights(), strict=True)
                   if rows.shape[0]]
        # no rows at all: an empty output, still connected to x
        return torch.cat(outputs) if outputs else x * 0  # (N, hidden)


class BatchedExperts(SequentialExperts):
    """The same experts (same parameters and state dict) run as a fixed number of kernels.

    Two ways, same result:

    - **grouped GEMM** (``torch._grouped_mm``; bias-free experts, on a CUDA device of compute
      capability 9.0 or more in bfloat16, or on the CPU in float32/bfloat16/float16, with
      ``hidden`` and the fc1/fc2 widths multiples of 16 bytes): each expert's rows are copied
      into a buffer where every expert's group starts at a multiple of ``GROUP_ALIGN`` rows,
      and both matmuls run as one grouped GEMM each over the groups' offsets. The buffer has
      a fixed size (``N + E·(GROUP_ALIGN − 1)`` rows) and the offsets stay on the device: no
      host synchronisation, so the host can queue the next layers' kernels meanwhile.
    - **padded batched matmuls** (otherwise, e.g. float64 or with biases): each expert's rows
      are copied into a zero-padded ``[E, capacity, hidden]`` buffer (``capacity`` = the
      largest expert's row count, the one host synchronisation) and the MLP runs as ``bmm``s
      over all experts at once. When padding would more than double the rows computed (one
      expert with over ``2·N/E`` rows) it runs the experts one after another instead.

    Served by ``local`` for ``moe_grouped_gemm = true``. ``tokens_per_expert`` is checked
    against ``x`` (its length always; non-negative counts summing to ``N`` where that costs no
    host synchronisation: on the CPU, or on the padded path, which synchronises anyway).
    """

    # the grouped GEMMs take the counts on the device (no host synchronisation)
    host_counts = False
    # padded rows computed / rows owned, above which the padded path runs experts one by one
    MAX_PADDING = 2.0
    # rows: each expert's group starts at a multiple of this in the grouped GEMM's buffer
    # (16-byte-aligned group starts for every dtype, as the CUDA kernel's loads want)
    GROUP_ALIGN = 16

    def _grouped_mm_applies(self, x: torch.Tensor) -> bool:
        """Whether ``torch._grouped_mm`` serves ``x`` (see the class docstring)."""
        if (not hasattr(torch, "_grouped_mm") or self.fc1_bias is not None
                or self.fc2_bias is not None or x.dtype != self.fc1_weight.dtype):
            return False
        if x.device.type == "cuda":
            if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
                return False
        elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16,
                                                         torch.float16):
            return False
        per_16_bytes = 16 // x.element_size()
        widths = (*self.fc1_weight.shape[1:], self.fc2_weight.shape[2])
        return all(w % per_16_bytes == 0 for w in widths)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        E = self.num_local_experts
        N, hidden = x.shape
        counts = tokens_per_expert.to(device=x.device, dtype=torch.int64)
        if counts.shape != (E,):
            raise ValueError(f"{type(self).__name__}: tokens_per_expert must have {E} entries, "
                             f"got shape {tuple(tokens_per_expert.shape)}")
        if N and self._grouped_mm_applies(x):
            if x.device.type == "cpu":
                self._check_counts(counts, N)
            return self._grouped(x, counts)
        # the padded path's one host sync: the buffer's size
        capacity = self._check_counts(counts, N)
        if N == 0 or E * capacity > self.MAX_PADDING * N:
            return super().forward(x, tokens_per_expert)
        slot = self._slots(counts, N, torch.arange(E, device=x.device) * capacity)
        padded = _ToSlots.apply(x, slot, E * capacity).view(E, capacity, hidden)
        h = torch.bmm(padded, self.fc1_weight.transpose(1, 2))  # (E, cap, ffn or 2·ffn)
        if self.fc1_bias is not None:
            h = h + self.fc1_bias[:, None, :]
        h = glu(h, self.activation_func) if self.gated else self.activation_func(h)
        y = torch.bmm(h, self.fc2_weight.transpose(1, 2))  # (E, cap, hidden)
        if self.fc2_bias is not None:
            y = y + self.fc2_bias[:, None, :]
        return _FromSlots.apply(y.reshape(E * capacity, hidden), slot)  # (N, hidden)

    def _check_counts(self, counts: torch.Tensor, N: int) -> int:
        """The largest count, after checking the counts are non-negative and sum to ``N``."""
        capacity, total, least = torch.stack((counts.max(), counts.sum(), counts.min())).tolist()
        if total != N or least < 0:
            raise ValueError(f"{type(self).__name__}: tokens_per_expert="
                             f"{counts.tolist()} must be non-negative and sum to the {N} rows "
                             f"of x")
        return capacity

    @staticmethod
    def _slots(counts: torch.Tensor, N: int, group_starts: torch.Tensor) -> torch.Tensor:
        """Where row ``i`` of ``x`` (expert ``e``'s ``j``-th row) goes in the buffer: slot
        ``group_starts[e] + j``."""
        E = counts.shape[0]
        expert = torch.repeat_interleave(torch.arange(E, device=counts.device), counts,
                                         output_size=N)  # (N,)
        first_row = torch.cumsum(counts, 0) - counts  # (E,) x's first row of each expert
        return group_starts[expert] + torch.arange(N, device=counts.device) - first_row[expert]

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Both matmuls as grouped GEMMs over 16-row-aligned groups (no host sync)."""
        E, align = self.num_local_experts, self.GROUP_ALIGN
        N, hidden = x.shape
        sizes = (counts + align - 1) // align * align  # (E,) each group padded to align rows
        ends = torch.cumsum(sizes, 0)  # (E,)
        slot = self._slots(counts, N, ends - sizes)  # (N,)
        # rows past a group's own and past the last group's end are never read back
        rows = N + E * (align - 1)
        buffer = _ToSlots.apply(x, slot, rows)
        offs = ends.to(torch.int32)
        h = torch._grouped_mm(buffer, self.fc1_weight.transpose(1, 2), offs=offs)
        h = glu(h, self.activation_func) if self.gated else self.activation_func(h)
        y = torch._grouped_mm(h, self.fc2_weight.transpose(1, 2), offs=offs)  # (rows, hidden)
        return _FromSlots.apply(y, slot)  # (N, hidden)


def _counts_to_host(counts: torch.Tensor,
                    experts: nn.Module) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``counts`` as the experts take them: on the host for experts with ``host_counts``
    (a non-blocking copy into pinned memory and an event after it, which the caller waits
    on when the counts are needed), else as they are; ``(counts, event or None)``."""
    if not getattr(experts, "host_counts", False) or counts.device.type != "cuda":
        return counts, None
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class _ToSlots(torch.autograd.Function):
    """``x``'s rows copied to rows ``slot`` (distinct) of a zero ``[rows, h]`` buffer; the
    backward gathers them back (``grad[slot]``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(slot)
        return x.new_zeros(rows, x.shape[-1]).index_copy_(0, slot, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (slot,) = ctx.saved_tensors
        return grad.index_select(0, slot), None, None


class _FromSlots(torch.autograd.Function):
    """``y[slot]`` for distinct ``slot``s; the backward copies the gradient rows back to
    their slots of a zero buffer — a copy, where autograd's own ``index_select`` backward
    accumulates with atomics (``index_add``) as if slots could repeat."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slot)
        ctx.rows = y.shape[0]
        return y.index_select(0, slot)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (slot,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[-1]).index_copy_(0, slot, grad), None


class _Combine(torch.autograd.Function):
    """``Σ_j weights[:, j] · rows[:, j]``: ``rows[N, k, h]`` (any float dtype) weighted by
    ``weights[N, k]`` and summed in ``weights``' dtype (float32, as Megatron-Core's unpermute
    does), without a float32 copy of ``rows``. Autograd's ``bmm`` for the same sum (``[N, 1,
    k] @ [N, k, h]``) runs its backward as N rank-1 products, slower than the elementwise
    product here by an order of magnitude on a GPU."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, rows)
        out = torch.mul(rows[:, 0], weights[:, :1])  # (N, h) in weights' dtype
        for j in range(1, rows.shape[1]):
            out.addcmul_(rows[:, j], weights[:, j:j + 1])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        weights, rows = ctx.saved_tensors
        grad_weights = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_weights = (rows * grad.unsqueeze(1)).sum(-1)  # (N, k)
        if ctx.needs_input_grad[1]:
            grad_rows = torch.empty_like(rows)  # the product, rounded once to rows' dtype
            torch.mul(grad.unsqueeze(1), weights.unsqueeze(-1), out=grad_rows)
        return grad_weights, grad_rows


class _Dispatch(torch.autograd.Function):
    """``tokens[order // k]``: each token's k copies in expert order. Backward: the gradient
    rows gathered back through the inverse permutation and summed over the k copies —
    deterministic, no atomic accumulation."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return tokens.index_select(0, order // k)  # (N·k, h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse)  # (N·k, h) back in token-major order
        return rows.view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse``; the backward is
    the gather ``grad[inverse]`` (no accumulation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class TopKRouter(nn.Module):
    """Router weight ``[E, hidden]``; ``forward(x[N, h]) -> (weights[N,k], experts[N,k], logits)``.

    ``logits`` ``[N, E]`` are in float32 (float64 for float64 inputs).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.topk = config.moe_router_topk
        self.pre_softmax = config.moe_router_pre_softmax
        E, dtype = config.num_moe_experts, config.torch_dtype
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=dtype))
        init_normal(config.init_method_std)(self.weight)

    def extra_repr(self) -> str:
        E, hidden = self.weight.shape
        return f"{hidden} -> {E} experts, topk={self.topk}, pre_softmax={self.pre_softmax}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(x.dtype)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (N, E)
        if self.pre_softmax:
            weights, experts = logits.softmax(-1).topk(self.topk, dim=-1)  # (N, k) each
        else:
            top_logits, experts = logits.topk(self.topk, dim=-1)  # (N, k) each
            weights = top_logits.softmax(-1)  # (N, k)
        return weights, experts, logits


class MoELayer(AuxLossMixin, nn.Module):
    """A Mixture-of-Experts MLP; ``forward(hidden[B, T, h]) -> [B, T, h]``.

    Slots: ``experts`` (built ``(num_moe_experts, config=)``, the ``grouped_mlp_modules``
    contract), ``shared_experts`` (an MLP spec, or ``None``; built with ``config=``,
    ``layer_number=`` and ``ffn_hidden_size=moe_shared_expert_intermediate_size`` unless the spec's
    params set it). Records ``"moe_load_balancing"`` (see the module docstring).
    """

    def __init__(self, config: TransformerConfig, submodules: MoESubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        self.layer_number = check_layer_args(owner, config, layer_number, submodules,
                                             ("experts",))
        self.config = config
        if config.num_moe_experts is None:
            raise ConfigError(f"{owner}: num_moe_experts=None; an MoE layer needs experts")
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.router = TopKRouter(config)
        self.experts = build_module(submodules.experts, self.num_experts, config=config)
        self.shared_experts = self._build_shared(submodules.shared_experts)
        self.reset_aux_losses()

    def _build_shared(self, spec: object) -> nn.Module | None:
        if spec is None:
            return None
        kwargs: dict = {"config": self.config, "layer_number": self.layer_number}
        size = self.config.moe_shared_expert_intermediate_size
        in_params = isinstance(spec, ModuleSpec) and "ffn_hidden_size" in spec.params
        if size is not None and not in_params:
            kwargs["ffn_hidden_size"] = size
        return build_module(spec, **kwargs)

    def _load_balancing_loss(self, logits: torch.Tensor,
                             tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``coeff · E · Σ_e f_e · P_e`` (module docstring) from logits (N, E)."""
        N = logits.shape[0]
        probs = logits.softmax(-1).mean(0)  # (E,)  P_e
        fraction = tokens_per_expert.to(logits.dtype) / (N * self.topk)  # (E,)  f_e
        return self.config.moe_aux_loss_coeff * self.num_experts * (fraction * probs).sum()

    def _wants_aux_loss(self) -> bool:
        cfg = self.config
        return (self.training and torch.is_grad_enabled() and cfg.moe_aux_loss_coeff > 0
                and cfg.moe_router_load_balancing_type == "aux_loss")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.reset_aux_losses()
        check_hidden(type(self).__name__, hidden_states, self.config.hidden_size)
        B, T, h = hidden_states.shape
        tokens = hidden_states.reshape(B * T, h)  # (N, h)
        weights, experts, logits = self.router(tokens)  # (N, k), (N, k), (N, E)
        k, E = self.topk, self.num_experts
        flat_experts = experts.reshape(-1)  # (N·k,)
        order = torch.argsort(flat_experts, stable=True)  # (N·k,) slots sorted by expert
        slots = torch.arange(order.numel(), device=order.device)
        inverse = torch.empty_like(order).scatter_(0, order, slots)  # (N·k,) order⁻¹
        # counted without bincount, which synchronises with the host on a GPU
        tokens_per_expert = torch.zeros(E, dtype=torch.int64, device=flat_experts.device)
        tokens_per_expert.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))  # (E,)
        counts, ready = _counts_to_host(tokens_per_expert, self.experts)
        dispatched = _Dispatch.apply(tokens, order, inverse, k)  # (N·k, h)
        # the shared expert is queued before the routed ones: with host counts, the GPU runs it
        # (and the dispatch) while the host waits for the counts
        shared = None if self.shared_experts is None else self.shared_experts(hidden_states)
        if ready is not None:
            ready.synchronize()  # the counts' copy only, not the work queued after it
        expert_out = self.experts(dispatched, counts)  # (N·k, h), expert order
        per_token = _Permute.apply(expert_out, inverse, order).view(B * T, k, h)  # (N, k, h)
        # the weighted sum in the router's dtype (float32), as Megatron-Core's unpermute does
        combined = _Combine.apply(weights.to(logits.dtype), per_token)  # (N, h)
        out = combined.to(hidden_states.dtype).view(B, T, h)
        if shared is not None:
            out = out + shared
        if self._wants_aux_loss():
            self.record_aux_loss(MOE_AUX_LOSS,
                                 self._load_balancing_loss(logits, tokens_per_expert))
        return out

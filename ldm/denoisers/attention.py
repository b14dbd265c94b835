"""Cross-attention and the spatial transformer of the LDM UNet (Rombach et al. 2022, sec. 3.3).

Module and parameter names match the original `ldm.modules.attention` (CompVis latent-diffusion,
Stability-AI stablediffusion), so `model.diffusion_model.*` weights of SD 1.x/2.x load as they are.

The attention kernel is chosen once, for the whole process, with `set_attention_backend` or the
`attention_backend` context manager:
- "sdpa" (default): `torch.nn.functional.scaled_dot_product_attention`,
- "xformers": `xformers.ops.memory_efficient_attention` (CUDA tensors, xformers installed),
- "math": softmax(Q K^T * scale) V written out (Vaswani et al. 2017, eq. 1), the reference.
`upcast=True` computes attention in float32 when the inputs are half precision; SD 2.x needs it in
fp16 (its Q K^T overflows), as the original's `ATTN_PRECISION=fp32`. The settings are global, not
per thread. `fuse_qkv_projections` makes a model's attention layers compute Q, K, V with one GEMM
at inference.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoencoder.modules import is_channels_last
from common.choices import ATTENTION_BACKENDS as BACKENDS  # the --attention choices, without torch
from common.errors import InputError
from ldm.denoisers.conv import Conv2d

_backend = "sdpa"
_upcast = False


def xformers_available() -> bool:
    """Whether the xformers package can be imported (it still needs CUDA tensors)."""
    return importlib.util.find_spec("xformers") is not None


def set_attention_backend(name: str | None = None, *, upcast: bool | None = None) -> None:
    """Select the attention kernel ("sdpa", "xformers", "math") and/or the float32 upcast.

    None leaves that setting as it is.
    """
    global _backend, _upcast
    if name is not None:
        if name not in BACKENDS:
            raise InputError(f"attention backend {name!r} is unknown; choose one of {list(BACKENDS)}")
        if name == "xformers" and not xformers_available():
            raise InputError("attention backend 'xformers' needs the xformers package "
                             "(pip install -e '.[xformers]', CUDA only); use 'sdpa' instead")
        _backend = name
    if upcast is not None:
        _upcast = bool(upcast)


def get_attention_backend() -> str:
    return _backend


def get_attention_upcast() -> bool:
    return _upcast


@contextmanager
def attention_backend(name: str | None = None, *, upcast: bool | None = None) -> Iterator[None]:
    """`set_attention_backend` for the duration of a `with` block, then restore the old settings."""
    old = (_backend, _upcast)
    set_attention_backend(name, upcast=upcast)
    try:
        yield
    finally:
        set_attention_backend(old[0], upcast=old[1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of q [B, N, H*D] over k, v [B, M, H*D] -> [B, N, H*D]; scale D**-0.5."""
    dtype = q.dtype
    if _upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    b, n, inner = q.shape
    d = inner // heads
    # [B, N, H*D] -> [B, N, H, D]: heads split as the original's rearrange 'b n (h d)'.
    q, k, v = (t.reshape(b, t.shape[1], heads, d) for t in (q, k, v))
    if _backend == "xformers":
        if not q.is_cuda:
            raise InputError("attention backend 'xformers' needs CUDA tensors; use 'sdpa' on the CPU")
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
    else:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
        if _backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)  # default scale is D**-0.5
        else:
            weights = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(dim=-1)
            out = weights @ v
        out = out.transpose(1, 2)
    return out.reshape(b, n, inner).to(dtype)


class CrossAttention(nn.Module):
    """Attention of `x` over `context` (self-attention when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.fused = False
        self._fused_cache: tuple[tuple, torch.Tensor] | None = None  # (key of the weights it was made from, W)
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_fused_cache", None))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # Under torch.compile the traced graph keeps the three projections: the compiler owns kernel
        # choice there, and the staleness check below (tensor versions) would break the graph.
        if self.fused and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            q, k, v = self._fused_projections(x, context)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(attention(q, k, v, self.heads))

    def _apply(self, fn, recurse=True):
        self._fused_cache = None  # remade from the moved / cast weights at the next call
        return super()._apply(fn, recurse)

    def _fused_projections(self, x: torch.Tensor, context: torch.Tensor | None):
        """Q, K, V from one GEMM (self-attention: x @ [Wq; Wk; Wv]^T) or two (cross: Q, then [Wk; Wv])."""
        inner = self.to_q.out_features
        if context is None:
            if self.to_k.in_features != self.to_q.in_features:
                raise InputError(f"self-attention needs context_dim == query_dim, got {self.to_k.in_features} "
                                 f"and {self.to_q.in_features}; pass a context")
            return F.linear(x, self._fused_weight()).split(inner, dim=-1)
        k, v = F.linear(context, self._fused_weight()[-2 * inner:]).split(inner, dim=-1)
        return self.to_q(x), k, v

    def _fused_weight(self) -> torch.Tensor:
        """[Wq; Wk; Wv] (or [Wk; Wv] when Q and K/V read different widths), rebuilt whenever a weight changed.

        A tensor's `_version` counts its in-place writes (optimizer steps, EMA copies), and
        `load_state_dict` and `_apply` (`.to()`, `.half()`) drop the copy. Weights made under
        `torch.inference_mode` keep no version counter; for them only those two are tracked.
        """
        weights = [self.to_k.weight, self.to_v.weight]
        if self.to_k.in_features == self.to_q.in_features:
            weights.insert(0, self.to_q.weight)
        key = tuple((w.data_ptr(), None if w.is_inference() else w._version) for w in weights)
        if self._fused_cache is None or self._fused_cache[0] != key:
            self._fused_cache = (key, torch.cat([w.detach() for w in weights]))
        return self._fused_cache[1]


def fuse_qkv_projections(module: nn.Module, fuse: bool = True) -> int:
    """Compute Q, K and V of every `CrossAttention` in `module` with one GEMM (K and V with one for
    cross-attention), as diffusers' `fuse_qkv_projections`; `fuse=False` turns it off and frees the
    fused copies. Returns the number of attention layers changed.

    Inference only: the fused path runs where autograd is off (`torch.no_grad` / `inference_mode`),
    so training and gradients always use the separate `to_q` / `to_k` / `to_v` parameters, and the
    state_dict keeps the original keys. The fused weights are a copy (56M values for the SD-v1
    UNet, 63M for SD-v2: 7% of their weights), made at the first call and remade whenever a
    projection weight changes. Inside `torch.compile` the separate projections are traced (see
    `CrossAttention.forward`).
    """
    layers = [m for m in module.modules() if isinstance(m, CrossAttention)]
    for layer in layers:
        layer.fused = fuse
        layer._fused_cache = None
    return len(layers)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer"): h * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)  # exact (erf) gelu, as the original


class FeedForward(nn.Module):
    """GEGLU -> dropout -> linear, inner width `mult * dim` (names `net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, context_dim: int | None = None,
                 dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        # Construction order fixes the state_dict order: attn1, ff, attn2, norm1..3 (as the original).
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context` [B, T, context_dim].

    GroupNorm -> proj_in -> [B, H*W, C] tokens -> blocks -> proj_out, plus the input (residual).
    proj_in/proj_out are 1x1 convs (SD 1.x) or Linear layers (SD 2.x, `use_linear`).
    """

    def __init__(self, in_channels: int, heads: int, dim_head: int, *, depth: int = 1,
                 context_dim: int | None = None, dropout: float = 0.0, use_linear: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim=context_dim, dropout=dropout,
                                  use_checkpoint=use_checkpoint)
            for _ in range(depth))
        if use_linear:
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = Conv2d(inner_dim, in_channels, kernel_size=1)
        self.use_linear = use_linear

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear:
            tokens = self.proj_in(tokens)
        # [B, C, H, W] -> [B, H*W, C], made contiguous once: LayerNorm and Linear would copy it at every use.
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()
        if self.use_linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear:
            tokens = self.proj_out(tokens)
        # Back to a map in the input's memory format: a channels-last view of an NCHW model would make
        # every later conv run channels-last and re-lay-out its (contiguous) weights at each call.
        tokens = tokens.transpose(1, 2).reshape(b, -1, h, w).contiguous(
            memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)
        if not self.use_linear:
            tokens = self.proj_out(tokens)
        return tokens + x

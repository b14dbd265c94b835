"""Step caching for the UNet: DeepCache (Ma, Fang & Wang, CVPR 2024, "DeepCache: Accelerating Diffusion Models for Free").

The deep features of a UNet change little between neighbouring sampling steps. `DeepCacheUNet` runs the
whole UNet on the first call and every `interval` calls after it, keeping the up-path's features where they
meet skip branch `branch`; on the calls in between it runs only that branch: `input_blocks[:branch + 1]`
(branch 0: the input conv alone) for the shallow skip connections, then `output_blocks[-(branch + 1):]` and
`out` on the cached deep features joined with them. With `input_blocks[i]` feeding `output_blocks[n - 1 - i]`
(n blocks each way), branch k reuses the output of `output_blocks[n - 2 - k]` (of `middle_block` for the
deepest branch, k = n - 1). Branch 0 is the paper's shallowest branch (the authors' LDM code, `replicate_layer`
0), the fastest; a deeper branch recomputes more and stays closer to the plain UNet. The schedule is the
paper's uniform one (N-step cache); its non-uniform variant is not implemented.

The cache is the wrapper's, never the UNet's: the network stays a network. The wrapper shares the UNet's
submodules instead of holding it as a child, so the model's state_dict keys, parameter names and LoRA
targets stay those of the plain UNet while the cache is on, and `.to()`, fused QKV and channels-last reach
the same modules. `LatentDiffusion.sample` calls `reset()` at its start (a duck-typed hook), so every
sampling run starts with a full pass; an input of another shape, dtype or device than the cached run's also
forces one. Under classifier-free guidance the batch is [uncond, cond] at every call, so both halves reuse
their own features by position. The count is of denoiser calls: for samplers that call the denoiser twice a
step (heun) an interval of 2 runs the full UNet once per step.

The wrapper runs the UNet's blocks itself (the same operations as `UNetModel.forward`, so interval 1 is
the plain UNet bit for bit); it would bypass a `torch.compile`d UNet's compiled call, so a compiled UNet is
refused.
"""
from __future__ import annotations

import torch
from torch import nn

from autoencoder.modules import is_channels_last
from common.errors import InputError
from ldm.denoisers.embeddings import timestep_embedding
from ldm.denoisers.unet import UNetModel


class DeepCacheUNet(nn.Module):
    """`forward(x, timesteps, context, y=None)` as `UNetModel`'s: the full UNet on the first call after
    `reset()` and every `interval` calls after it, the shallow branch `branch` with cached deep features
    otherwise. `interval` 1 is the plain UNet, bit for bit."""

    def __init__(self, unet: UNetModel, interval: int, branch: int = 0):
        super().__init__()
        if not isinstance(unet, UNetModel):
            raise InputError(f"deep cache needs a UNet denoiser (it reuses features across its skip connections); "
                             f"this one is a {type(unet).__name__}: leave the deep cache off")
        if getattr(unet, "_compiled_call_impl", None) is not None or "forward" in vars(unet):  # .compile(), or a compiled forward
            raise InputError("the deep cache runs the UNet's blocks itself, so it would bypass the compiled UNet: "
                             "use the deep cache or torch.compile, not both")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise InputError(f"deep cache interval must be a whole number >= 1 (1: off; DeepCache uses 2 to 5), "
                             f"got {interval!r}")
        branches = len(unet.input_blocks)
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < branches:
            raise InputError(f"deep cache branch must be a whole number from 0 (shallowest, fastest) to {branches - 1} "
                             f"(this UNet has {branches} skip branches), got {branch!r}")
        # The UNet's children are the wrapper's own (the same dicts), so no name gets a prefix; the UNet itself
        # is set with object.__setattr__, as nn.Module's would register it in those dicts.
        self._modules, self._parameters, self._buffers = unet._modules, unet._parameters, unet._buffers
        object.__setattr__(self, "unet", unet)
        self.training = unet.training
        self.config, self.interval, self.branch = unet.config, interval, branch
        self.full_passes = self.shallow_passes = 0  # counts since construction, for tests and benchmarks
        self.reset()

    def reset(self) -> None:
        """Forget the cached features: the next call runs the full UNet (a new sampling run)."""
        self._deep: torch.Tensor | None = None
        self._input: tuple | None = None  # shape, dtype and device of the input that made the cached features
        self._since_full = 0

    def remove(self) -> UNetModel:
        """Drop the cache; returns the plain UNet (with this wrapper's train / eval mode)."""
        self.reset()
        self.unet.train(self.training)
        return self.unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if self._deep is None or self._since_full >= self.interval or self._input != (x.shape, x.dtype, x.device):
            self._check(x, context, y)
            self._deep, self._input = None, None
            out = self._run(x, timesteps, context, y, full=True)
            self._input, self._since_full = (x.shape, x.dtype, x.device), 1
            self.full_passes += 1
            return out
        self._since_full += 1
        self.shallow_passes += 1
        return self._run(x, timesteps, context, y, full=False)

    def _run(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None, *,
             full: bool) -> torch.Tensor:
        """`UNetModel.forward`'s computation, op for op. `full`: all of it, keeping the deep features (the input
        of `output_blocks[n - 1 - branch]`); otherwise the shallow branch on the kept ones."""
        unet, cfg, n = self.unet, self.config, len(self.unet.output_blocks)
        dtype = unet.time_embed[0].weight.dtype
        emb = unet.time_embed(timestep_embedding(timesteps.expand(x.shape[0]), cfg.model_channels).to(dtype))
        if y is not None:
            emb = emb + unet.label_emb(y.to(dtype) if y.is_floating_point() else y)
        h, context = x.to(dtype), context.to(dtype)
        channels_last = is_channels_last(unet.input_blocks[0][0].weight)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in unet.input_blocks if full else unet.input_blocks[:self.branch + 1]:
            h = block(h, emb, context)
            skips.append(h)
        if full:
            h = unet.middle_block(h, emb, context)
            for block in unet.output_blocks[:n - 1 - self.branch]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
            self._deep = h
        else:
            h = self._deep
        for block in unet.output_blocks[n - 1 - self.branch:]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        out = unet.out(h).to(x.dtype)
        return out.contiguous() if channels_last else out

    def _check(self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None) -> None:
        """`UNetModel.forward`'s input checks."""
        cfg = self.config
        if context is None:
            raise InputError(f"UNet: context is required ([B, T, {cfg.context_dim}] text embeddings)")
        if (y is not None) != (cfg.num_classes is not None):
            raise InputError("UNet: pass class labels y exactly when the model has num_classes "
                             f"(num_classes={cfg.num_classes})")
        if x.shape[-2] % cfg.latent_multiple or x.shape[-1] % cfg.latent_multiple:
            raise InputError(f"UNet: latent height and width must be divisible by {cfg.latent_multiple}, "
                             f"got {list(x.shape[-2:])}")

    def extra_repr(self) -> str:
        return f"interval={self.interval}, branch={self.branch}"


def enable_deep_cache(model, interval: int, branch: int = 0) -> None:
    """Put `model.denoiser` (a `LatentDiffusion`'s UNet) behind a `DeepCacheUNet`: the full UNet every
    `interval` denoiser calls, the shallow skip branch `branch` (0: the input conv and the last output
    block) in between. Enabling again replaces the settings. A DiT (no skip branches) is an InputError."""
    denoiser = getattr(model, "denoiser", None)
    if denoiser is None:
        raise InputError("this model has no denoiser, so there is nothing to cache; load a full latent diffusion "
                         "checkpoint")
    unet = denoiser.remove() if isinstance(denoiser, DeepCacheUNet) else denoiser
    model.denoiser = DeepCacheUNet(unet, interval, branch)  # bad settings raise before the model changes


def disable_deep_cache(model) -> None:
    """Back to the plain UNet (a no-op where the deep cache is off)."""
    if isinstance(getattr(model, "denoiser", None), DeepCacheUNet):
        model.denoiser = model.denoiser.remove()

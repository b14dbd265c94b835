"""The denoiser's 2-D convolution: `nn.Conv2d` with a faster CPU path for small feature maps.

On the CPU, oneDNN's direct convolution runs far below matmul speed when the output map is small
and the channels many, as at the deepest levels of the SD UNet (1280 channels at 8x8 or 4x4
latent pixels). There the same convolution as im2col plus one matmul (out = W [C_out, C_in*kh*kw]
@ unfold(x) + b) is 1.9x (8x8) to 3.5x (4x4) faster at fp32 on 2 cores, and it takes the SD-v1
UNet step at 32x32 latents from about diffusers' time to 0.72-0.76 of it (bench/RESULTS.md,
unet_step; 0.93-0.94 at 64x64, where only the 8x8 level benefits). From 16x16 up the direct
convolution wins, so only maps of at most `SMALL_MAP_PIXELS` output pixels take the matmul path,
and only for inference (no autograd: unfold's backward would cost more than it saves). The
parameters, their names and the state dict are nn.Conv2d's; results agree to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.modules import is_channels_last

SMALL_MAP_PIXELS = 64  # 8x8: measured faster as a matmul; 16x16 is even, larger maps are slower


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled() and x.ndim == 4:
            out_h, out_w = self._output_size(x)
            if out_h * out_w <= SMALL_MAP_PIXELS and self._matmul_ok():
                return self._as_matmul(x, out_h, out_w)
        return super().forward(x)

    def _matmul_ok(self) -> bool:
        return self.groups == 1 and self.padding_mode == "zeros" and isinstance(self.padding, tuple)

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                     zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride))

    def _as_matmul(self, x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """im2col: cols [B, C_in*kh*kw, L] (L = out_h*out_w) laid side by side as [C_in*kh*kw, B*L], then one
        GEMM [C_out, C_in*kh*kw] @ that (+ b, fused: addmm) -> [C_out, B, L] -> [B, C_out, out_h, out_w].

        One plain GEMM on the weight as it is stored: a batched GEMM on the weight expanded over the batch
        (baddbmm) is as fast in fp32 but copies the weight for every image in bf16 (3-7x slower there,
        measured on an AVX-512 BF16 CPU); `torch.matmul` would pick a different kernel, and so different
        rounding, depending on whether the weight requires grad.
        """
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        batch, _, pixels = cols.shape
        if is_channels_last(self.weight):
            # A channels-last weight is (C_out, kh, kw, C_in) in memory: flatten it in that order (a view,
            # no copy of the weight) and reorder the much smaller cols from (C_in, kh, kw) to match.
            weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)
            cols = cols.view(batch, self.in_channels, -1, pixels).transpose(1, 2).reshape(batch, -1, pixels)
        else:
            weight = self.weight.reshape(self.out_channels, -1)
        cols = cols.transpose(0, 1).reshape(weight.shape[1], batch * pixels)
        if self.bias is None:
            out = torch.mm(weight, cols)
        else:
            out = torch.addmm(self.bias.unsqueeze(1), weight, cols)
        return out.view(self.out_channels, batch, out_h, out_w).transpose(0, 1)

"""Frozen 8-bit layers that keep nothing for the backward pass but their own weights.

bitsandbytes trains 8-bit layers on the CPU through ``MatMul8bitFp``: dequantise the int8 weight,
multiply, and keep the layer's *input* for the backward pass, whether or not the weight needs a
gradient. Under LoRA the base weights are frozen, so that input is never used (the gradient that
flows back, ``grad_output @ W``, needs only the weight), yet every 8-bit layer keeps one: for a
1.5B Qwen model that is ~13.5k floats per token per layer (the MLP's down projection alone reads
8,960), more than the fp32 model keeps for the same layers (torch's own linear keeps nothing for
a frozen weight). That is why 8-bit training used about as much memory as fp32.

``slim_frozen_8bit(model)`` swaps the training-time matmul of every frozen ``Linear8bitLt`` for
``FrozenInt8Matmul``: the same dequantise-and-multiply in the forward pass (same operations, same
order, so the same numbers), and in the backward pass the weight dequantised again from the int8
copy the layer holds anyway. Inference (``eval()``) and layers whose weight or bias trains keep
bitsandbytes' own path. Checked against bitsandbytes' gradients in tests/unit/test_int8.py.
"""
from __future__ import annotations

import os
import types

import torch


def _dequantise(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the expression bitsandbytes' MatMul8bitFp uses, so that forward and backward match it bit for bit
    return cb.data.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


class FrozenInt8Matmul(torch.autograd.Function):
    """``x @ dequant(CB, SCB).T + bias`` for a weight and bias that do not train: saves no activation."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        ctx.save_for_backward(cb, scb)  # the layer's own int8 weight and scales: no copy
        ctx.x_dtype = x.dtype
        return torch.nn.functional.linear(x, _dequantise(cb, scb, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        cb, scb = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_output.to(ctx.x_dtype), _dequantise(cb, scb, ctx.x_dtype))
        return grad_x, None, None, None


def _slim_forward(self, x: torch.Tensor):
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if not (self.training and frozen and x.device.type == "cpu"):
        return self._bnb_forward(x)
    self.state.is_training = True
    if self.weight.CB is not None:  # first call: bitsandbytes moves the int8 weight into its state
        self.init_8bit_state()
    state = self.state
    if state.has_fp16_weights or state.CB is None or state.SCB is None:
        return self._bnb_forward(x)
    bias = self.bias
    if bias is not None and bias.dtype != x.dtype:
        bias.data = bias.data.to(x.dtype)
    out = FrozenInt8Matmul.apply(x, state.CB, state.SCB, bias)
    self.weight.data = state.CB
    return out


def slim_frozen_8bit(model) -> int:
    """Patch every bitsandbytes ``Linear8bitLt`` of ``model`` in place; returns how many.
    ``LORA_COMPARE_BNB_BACKWARD=1`` leaves bitsandbytes' own path (to measure the difference)."""
    if os.environ.get("LORA_COMPARE_BNB_BACKWARD") == "1":
        return 0
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear8bitLt) and not hasattr(module, "_bnb_forward"):
            module._bnb_forward = module.forward
            module.forward = types.MethodType(_slim_forward, module)
            count += 1
    return count

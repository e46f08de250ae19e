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


class Int8Embedding(torch.nn.Module):
    """A frozen input embedding held in int8, one fp32 scale per row (absmax / 127), dequantised
    row by row as tokens are looked up. bitsandbytes quantises linear layers only, so an 8-bit
    model keeps its embedding table in fp32: for Qwen2.5-1.5B (151,936 x 1,536, untied from the
    output layer) that is 0.93 GB, a third of the 8-bit model. Only a lookup reads it, so int8
    storage costs one multiply per looked-up value. Rounding error per value is at most half a
    step (absmax / 254), the same scheme bitsandbytes uses for each row of a linear layer.

    A model-specific scale applied after the lookup (Gemma's ``embed_scale``) is kept. Tied tables
    (the same weight is the output layer) are left alone by ``quantise_input_embedding``."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        w = embedding.weight.data.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        # a parameter (frozen), not a buffer, so that parameter counts still include the table
        self.weight = torch.nn.Parameter(torch.round(w / scale[:, None]).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        embed_scale = getattr(embedding, "embed_scale", None)
        self.embed_scale = embed_scale.detach().clone() if isinstance(embed_scale, torch.Tensor) else embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.embedding(input_ids, self.weight).to(self.scale.dtype)
        out = out * self.scale[input_ids].unsqueeze(-1)
        if self.embed_scale is not None:
            out = out * (self.embed_scale.to(out.dtype) if isinstance(self.embed_scale, torch.Tensor)
                         else self.embed_scale)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows with fp32 scales"


def embeddings_tied(model) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return out is None or getattr(out, "weight", None) is None or out.weight.data_ptr() == inp.weight.data_ptr()


def quantise_input_embedding(model) -> bool:
    """Replace an untied, frozen-to-be ``nn.Embedding`` input table by ``Int8Embedding`` in place;
    returns whether it did. Tied tables stay: the output layer multiplies with the same weight."""
    inp = model.get_input_embeddings()
    if not isinstance(inp, torch.nn.Embedding) or embeddings_tied(model):
        return False
    model.set_input_embeddings(Int8Embedding(inp))
    return True

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
copy the layer holds anyway. A weight larger than ``SLICE_BYTES`` in fp32 is dequantised a slice
of rows at a time, in training, and in inference over many tokens at once. Other layers in
inference (``eval()``) and layers whose weight or bias trains keep bitsandbytes' own path. Checked
against bitsandbytes' gradients in tests/unit/test_int8.py.
"""
from __future__ import annotations

import os
import types

import torch


def _dequantise(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the expression bitsandbytes' MatMul8bitFp uses, so that forward and backward match it bit for bit
    return cb.data.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


# A weight whose fp32 copy is larger than this is dequantised in slices of output rows, never
# whole: Qwen2.5-1.5B's untied output layer (151,936 x 1,536) would otherwise need a 0.93 GB fp32
# copy at once in the forward pass and again in the backward pass, the peak of an 8-bit training
# step (measured: 5.6 -> 6.7 GB while its backward ran). Smaller layers are dequantised whole, so
# their numbers stay bit for bit bitsandbytes'.
SLICE_BYTES = 64 * 2**20


def _row_slices(cb: torch.Tensor, dtype: torch.dtype, slice_bytes: int):
    rows, cols = cb.shape
    step = max(1, slice_bytes // max(1, cols * torch.empty((), dtype=dtype).element_size()))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


class FrozenInt8Matmul(torch.autograd.Function):
    """``x @ dequant(CB, SCB).T + bias`` for a weight and bias that do not train: saves no activation,
    and holds at most ``SLICE_BYTES`` of dequantised weight at a time."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        ctx.save_for_backward(cb, scb)  # the layer's own int8 weight and scales: no copy
        ctx.x_dtype = x.dtype
        slices = _row_slices(cb, x.dtype, SLICE_BYTES)
        if len(slices) == 1:
            return torch.nn.functional.linear(x, _dequantise(cb, scb, x.dtype), bias)
        out = x.new_empty(*x.shape[:-1], cb.shape[0])
        for i, j in slices:
            out[..., i:j] = torch.nn.functional.linear(x, _dequantise(cb[i:j], scb[i:j], x.dtype),
                                                       None if bias is None else bias[i:j])
        return out

    @staticmethod
    def backward(ctx, grad_output):
        cb, scb = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_output = grad_output.to(ctx.x_dtype)
        slices = _row_slices(cb, ctx.x_dtype, SLICE_BYTES)
        if len(slices) == 1:
            return torch.matmul(grad_output, _dequantise(cb, scb, ctx.x_dtype)), None, None, None
        grad_x = grad_output.new_zeros(*grad_output.shape[:-1], cb.shape[1])
        for i, j in slices:  # grad_x = sum over row slices of grad_output[..., slice] @ W[slice]
            grad_x += torch.matmul(grad_output[..., i:j], _dequantise(cb[i:j], scb[i:j], ctx.x_dtype))
        return grad_x, None, None, None


def _large_product(self, x: torch.Tensor) -> bool:
    """In inference, bitsandbytes' int8 path holds the int32 and the float product at once: fine for
    a few tokens (decoding), not for an output layer over a whole evaluation batch."""
    rows = x.numel() // max(1, x.shape[-1])
    return rows * self.out_features * 4 > SLICE_BYTES and self.out_features * self.in_features * 4 > SLICE_BYTES


def _slim_forward(self, x: torch.Tensor):
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if not (frozen and x.device.type == "cpu" and (self.training or _large_product(self, x))):
        return self._bnb_forward(x)
    # Training: every frozen layer. Inference: only a layer larger than SLICE_BYTES in fp32 (an untied
    # output layer) over enough tokens that its product is larger too (an evaluation batch, not a
    # decoding step), where bitsandbytes' int8 matmul would hold the int32 and float products of the
    # whole vocabulary at once; everything else keeps bitsandbytes' inference path and numbers.
    self.state.is_training = self.training
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

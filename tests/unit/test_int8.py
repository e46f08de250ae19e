"""Frozen 8-bit layers: the same forward values and gradients as bitsandbytes' own CPU training path,
and none of the activations it keeps."""
import copy

import pytest
import torch

from tiny import save_tiny_model
from utils import int8, models

import bitsandbytes  # noqa: E402,F401  (a declared dependency: missing or broken is a failure, never a skip)


@pytest.fixture(scope="module")
def tiny_8bit(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("int8") / "tiny-llama", "llama")
    loaded = models.load_model(str(folder), load_in_8bit=True)
    assert loaded.info["load_in_8bit"], loaded.info
    return loaded.model


def _lora(model):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(copy.deepcopy(model), use_gradient_checkpointing=False)
    return model


def _peft(model, slim: bool):
    from peft import LoraConfig, get_peft_model

    if slim:
        assert int8.slim_frozen_8bit(model) > 0
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.train()
    return peft_model


def _step(model, ids):
    """Forward + backward; the loss, every LoRA gradient, and the bytes autograd saved."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if t.layout == torch.strided else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, sum(saved)


def test_slim_layers_give_bitsandbytes_gradients_exactly(tiny_8bit):
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_bnb, grads_bnb, _ = _step(_peft(_lora(tiny_8bit), slim=False), ids)
    loss_slim, grads_slim, _ = _step(_peft(_lora(tiny_8bit), slim=True), ids)
    assert torch.equal(loss_bnb, loss_slim)
    assert grads_bnb.keys() == grads_slim.keys() and len(grads_bnb) >= 4
    for name in grads_bnb:
        torch.testing.assert_close(grads_slim[name], grads_bnb[name], rtol=0, atol=0, msg=name)


def test_slim_layers_keep_no_activation_of_their_own(tiny_8bit):
    """bitsandbytes' path keeps each 8-bit layer's input on ``ctx`` (invisible to saved-tensor hooks);
    count what is alive after the forward pass instead: the slim model holds less, by at least the
    inputs of the layers that feed no LoRA."""
    import gc

    ids = torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(2))

    def held_after_forward(model):
        gc.collect()
        before = {id(t) for t in gc.get_objects() if isinstance(t, torch.Tensor)}
        out = model(input_ids=ids, labels=ids)
        gc.collect()
        extra = sum(t.numel() * t.element_size() for t in gc.get_objects()
                    if isinstance(t, torch.Tensor) and id(t) not in before and t.layout == torch.strided)
        out.loss.backward()
        return extra

    bnb = held_after_forward(_peft(_lora(tiny_8bit), slim=False))
    slim = held_after_forward(_peft(_lora(tiny_8bit), slim=True))
    print("held after forward, bitsandbytes vs slim:", bnb, slim)
    assert slim < bnb


def test_a_large_weight_is_dequantised_in_slices_with_the_same_numbers(tiny_8bit, monkeypatch):
    """Above ``SLICE_BYTES`` the weight is multiplied slice by slice (forward and backward): no fp32
    copy larger than a slice exists at once, and loss and gradients agree with bitsandbytes' within
    float rounding (summation order differs)."""
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(5))
    loss_bnb, grads_bnb, _ = _step(_peft(_lora(tiny_8bit), slim=False), ids)
    slice_bytes = 1024  # smaller than every layer of the tiny model, so each one is sliced
    monkeypatch.setattr(int8, "SLICE_BYTES", slice_bytes)
    largest = []
    original = int8._dequantise

    def recording(cb, scb, dtype):
        out = original(cb, scb, dtype)
        largest.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(int8, "_dequantise", recording)
    loss_sliced, grads_sliced, _ = _step(_peft(_lora(tiny_8bit), slim=True), ids)
    assert largest and max(largest) <= slice_bytes
    torch.testing.assert_close(loss_sliced, loss_bnb, rtol=1e-5, atol=1e-6)
    assert grads_sliced.keys() == grads_bnb.keys()
    for name in grads_bnb:
        torch.testing.assert_close(grads_sliced[name], grads_bnb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_row_slices_cover_every_row_once():
    cb = torch.zeros(1000, 64, dtype=torch.int8)
    for slice_bytes in (1, 256, 64 * 4 * 7, 10**9):
        slices = int8._row_slices(cb, torch.float32, slice_bytes)
        assert slices[0][0] == 0 and slices[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert all((j - i) * 64 * 4 <= max(slice_bytes, 64 * 4) for i, j in slices)
    assert len(int8._row_slices(cb, torch.float32, 10**9)) == 1


def test_eval_mode_keeps_the_bitsandbytes_inference_path(tiny_8bit):
    ids = torch.randint(3, 250, (1, 16), generator=torch.Generator().manual_seed(3))
    plain = _lora(tiny_8bit).eval()
    slim = _lora(tiny_8bit).eval()
    int8.slim_frozen_8bit(slim)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, slim(input_ids=ids).logits)


def test_in_inference_only_a_large_layer_over_many_tokens_leaves_the_bitsandbytes_path(tiny_8bit, monkeypatch):
    """An untied output layer of a real model is far above ``SLICE_BYTES``: in eval mode it is
    multiplied slice by slice with the dequantised weight (bitsandbytes' inference path would hold
    the int32 and float products of the whole vocabulary at once). Its logits differ from
    bitsandbytes' int8-activation path only by that path's rounding."""
    ids = torch.randint(3, 250, (1, 16), generator=torch.Generator().manual_seed(6))
    plain = _lora(tiny_8bit).eval()
    slim = _lora(tiny_8bit).eval()
    int8.slim_frozen_8bit(slim)
    head = slim.get_output_embeddings()
    # only the output layer is "large" (weight and product over these 16 tokens); others are smaller
    monkeypatch.setattr(int8, "SLICE_BYTES", min(head.out_features * head.in_features, 16 * head.out_features) * 4 - 1)
    calls = []
    original = int8.FrozenInt8Matmul.apply
    monkeypatch.setattr(int8.FrozenInt8Matmul, "apply", lambda *a: calls.append(a[1].shape) or original(*a))
    with torch.no_grad():
        want, got = plain(input_ids=ids).logits, slim(input_ids=ids).logits
    assert calls == [torch.Size([head.out_features, head.in_features])]  # the output layer, nothing else
    assert not torch.equal(want, got)  # really another path
    assert torch.corrcoef(torch.stack([want.flatten(), got.flatten()]))[0, 1] > 0.999
    calls.clear()  # one token at a time (decoding): the product is small, bitsandbytes' path stays
    with torch.no_grad():
        slim(input_ids=ids[:, :1])
    assert calls == []


def test_patching_twice_is_a_no_op(tiny_8bit):
    model = copy.deepcopy(tiny_8bit)
    first = int8.slim_frozen_8bit(model)
    assert first > 0 and int8.slim_frozen_8bit(model) == 0


def test_int8_embedding_rows_are_within_half_a_step_and_keep_a_post_lookup_scale():
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 16)
    table.weight.data[3] *= 40  # rows of very different size: each has its own scale
    q = int8.Int8Embedding(table)
    assert q.weight.dtype == torch.int8 and not q.weight.requires_grad
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    exact = table(ids).detach()
    step = (table.weight.abs().amax(dim=1) / 127)[ids].unsqueeze(-1)
    assert ((q(ids) - exact).abs() <= step / 2 + 1e-6).all()
    assert (q(ids) - exact).abs().max() > 0  # it really is rounded

    class Scaled(torch.nn.Embedding):  # Gemma multiplies looked-up rows by sqrt(hidden size)
        def __init__(self, *a):
            super().__init__(*a)
            self.embed_scale = torch.tensor(4.0)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    scaled = Scaled(50, 16)
    scaled.weight.data.copy_(table.weight.data)
    torch.testing.assert_close(int8.Int8Embedding(scaled)(ids), 4.0 * q(ids))


def test_8bit_load_quantises_an_untied_output_layer_and_input_table(tmp_path, tiny_8bit):
    from bitsandbytes.nn import Linear8bitLt

    assert isinstance(tiny_8bit.get_input_embeddings(), int8.Int8Embedding)
    assert isinstance(tiny_8bit.get_output_embeddings(), Linear8bitLt)
    fp32 = models.load_model(str(save_tiny_model(tmp_path / "llama", "llama")))
    assert fp32.info["total_params"] == sum(p.numel() for p in tiny_8bit.parameters())  # counts unchanged
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = fp32.model(input_ids=ids).logits, tiny_8bit(input_ids=ids).logits
    assert torch.corrcoef(torch.stack([want.flatten(), got.flatten()]))[0, 1] > 0.99
    # a LoRA step through the int8 table and output layer: gradients reach the adapters
    model = _peft(_lora(tiny_8bit), slim=True)
    loss, grads, _ = _step(model, ids)
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())
    # a tied table is the output layer too: it stays a plain fp32 embedding
    tied = models.load_model(str(save_tiny_model(tmp_path / "gpt2", "gpt2")), load_in_8bit=True)
    assert type(tied.model.get_input_embeddings()) is torch.nn.Embedding and not tied.info["int8_embedding"]

"""The labelled-positions loss on the real offline models: the same value and gradients as the
model's own loss (the unit test covers tiny GPT-2 and Llama; Gemma 3's head and 262k vocabulary
and SmolLM2's tied embeddings are checked here). In float64: in fp32 the two differ by summation
order only (gradients about 1e-4 apart relative to their size), which would hide a real error of
that size; in float64 they agree to rounding."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from utils import chat, models, training

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_labelled_positions_loss_matches_the_models_own(name, tmp_path):
    loaded = models.load_model(name, load_in_8bit=False)
    torch.manual_seed(0)
    model = get_peft_model(loaded.model.double(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0, init_lora_weights=False)).double()
    trainer = training._trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                           report_to=[]))
    fmt = chat.chat_format(loaded.spec, loaded.tokenizer)
    enc = chat.encode(
        [
            {"role": "user", "content": "How are you today?"},
            {"role": "assistant", "content": "I am fine, thank you for asking."},
        ],
        loaded.tokenizer,
        fmt,
        256,
    )
    ids = torch.tensor([enc.input_ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([enc.labels])}
    assert 0 < int((batch["labels"] != chat.IGNORE_INDEX).sum()) < batch["labels"].numel()

    expected = model(**batch).loss
    expected.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad][:4]
    grads = [p.grad.clone() for _, p in lora]
    model.zero_grad()
    ours = trainer.compute_loss(model, batch)
    ours.backward()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert all(g.norm() > 0 for g in grads)
    for (n, p), g in zip(lora, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")

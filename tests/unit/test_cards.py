"""The data card and the model card say what they describe: counts, cleaning, lengths; method,
parameters, data hash and where the adapter is."""
from utils import cards


def test_data_card_tables_add_up_and_name_what_was_dropped():
    card = {
        "counts": {"train": 8, "validation": 1, "test": 1, "total": 10},
        "parameters": {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 7},
        "counts_by_source": {"train": {"a.jsonl": 5, "b.yml": 3}, "validation": {"a.jsonl": 1}, "test": {"b.yml": 1}},
        "inputs": [{"file": "/x/a.jsonl", "schema": "messages", "rows": 9, "kept": 6},
                   {"file": "/x/b.yml", "schema": "chatterbot", "rows": 5, "kept": 4}],
        "duplicates_removed": {"exact": 2, "near": 1, "by_source": {"a.jsonl": 3}},
        "empty_turns_dropped": 1,
        "pii_redactions": {"EMAIL": 2, "PHONE": 1},
        "skipped_rows": [{"file": "/x/b.yml", "line": 35, "reason": "not a list of turns"}],
        "lengths": {s: {"user": {"n": 1, "min": 1, "median": 2, "mean": 2.5, "p95": 4, "max": 5}}
                    for s in ("train", "validation", "test")},
    }
    text = cards.render_data_card(card)
    assert "10 conversations after cleaning" in text and "8 train / 1 validation / 1 test" in text
    assert "seed=7" in text and "| a.jsonl | messages | 9 | 6 |" in text
    assert "| a.jsonl | 5 | 1 | 0 | 6 |" in text and "| b.yml | 3 | 0 | 1 | 4 |" in text
    assert "| **all** | 8 | 1 | 1 | 10 |" in text  # the per-source rows add up to the split counts
    assert "2 exact, 1 near" in text and "EMAIL 2, PHONE 1" in text and "rows skipped: 1" in text
    assert "| b.yml | 35 | not a list of turns |" in text
    assert "| train | user | 1 | 1 | 2 | 2.5 | 4 | 5 |" in text


def test_model_card_states_method_parameters_data_and_the_adapter_path():
    run = {"model": "smollm2-135m", "base_model": "smollm2-135m", "peft_method": "lora",
           "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}, "load_in_8bit": True,
           "trainable_params": 460800, "total_params": 134975808, "trainable_percent": 0.3414,
           "examples": {"train": 1234}, "data_dir": "data/processed", "data_sha256": "abcdef0123456789" * 4,
           "best_eval_loss": 1.91234, "config": {"output_dir": "models/smollm2-135m-lora"}}
    text = cards.model_card(run, {"card": {"size": "135M parameters", "licence": "Apache-2.0"}})
    assert text.startswith("# smollm2-135m LoRA")
    assert "LoRA r=8 alpha=16 on q_proj, v_proj, 8-bit base weights" in text
    assert "460,800 of 134,975,808 (0.341%)" in text and "1234 conversations from data/processed" in text
    assert "sha256 abcdef012345" in text and "| Best validation loss | 1.9123 |" in text
    assert 'PeftModel.from_pretrained(base_model, "models/smollm2-135m-lora/final")' in text
    assert "random base weights" not in text
    assert "trained on random base weights" in cards.model_card({**run, "random_init": True}, {})

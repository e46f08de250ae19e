"""Safety, the judge LLM's part (utils/safety_screen.py, utils/safety/probe.py): the probe kept as numbers
answers as the fitted regression, and the screen's features are the hidden state where the question's
answer would start."""
import json

import numpy as np
import pytest

from utils import safety


def test_probe_kept_as_numbers_answers_as_the_fitted_regression():
    """The probe is kept (and shipped) as float32 numbers, not a pickle: rebuilt from them it gives
    scikit-learn's probabilities, and ``from_params`` needs no fitting."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)) * rng.uniform(0.5, 20, 16) + rng.normal(size=16) * 5
    y = (x[:, 0] / 10 + x[:, 3] / 3 + rng.normal(size=200) > 0).astype(int)
    probe = safety.HiddenStateProbe(None, c=0.3)
    reference = probe._model().fit(x, y).predict_proba(x)[:, 1]
    probe.fit(x, y)
    np.testing.assert_allclose(probe.scores(x), reference, atol=1e-5)
    again = safety.HiddenStateProbe.from_params(None, json.loads(json.dumps(probe.params)))
    np.testing.assert_allclose(again.scores(x), probe.scores(x), atol=0)
    assert again.c == 0.3 and 0.2 < reference.mean() < 0.8
    with pytest.raises(ValueError, match="labels 0 and 1"):
        safety.HiddenStateProbe(None, c=1.0).fit(x, np.where(y == 1, "yes", "no"))


def test_screen_features_are_the_state_where_the_question_would_be_answered(tmp_path, monkeypatch):
    """The probe's features from a real (tiny, random) causal LM: one row per text, equal to the hidden
    state ``PROBE["depth"]`` of the way up at the last position of the whole question prompt run in one
    piece (the kept prefix cache changes nothing), and they depend on the question asked around the text."""
    import torch
    from tiny import save_tiny_model

    from utils import judge

    path = save_tiny_model(tmp_path / "llama", "llama")
    screen = safety.Screen("crisis", str(path), dtype="fp32")
    texts = ["hi", "a much longer message than the first one", "third"]
    got = screen.features(texts)
    llm = judge.shared(str(path), "fp32")
    layer = round(safety.PROBE["depth"] * llm.model.config.num_hidden_layers)
    system, question = safety.SCREENS["crisis"]
    for text, row in zip(texts, got):
        head = llm._ask_prefixes[system]["ids"]
        feed, _ = llm._ask_feed(system, text, question)
        with torch.inference_mode():
            whole = llm.model(input_ids=torch.tensor([head + feed]), output_hidden_states=True).hidden_states
        assert np.allclose(row, whole[layer][0, -1].numpy(), atol=1e-4)
    assert got.shape == (3, llm.model.config.hidden_size) and not np.allclose(got[0], got[1], atol=1e-3)
    other = safety.Screen("replies", str(path), dtype="fp32").features(texts)
    assert not np.allclose(other, got, atol=1e-3)  # the same texts under the other screen's question
    monkeypatch.setitem(safety.PROBE, "depth", 0.0)  # the embeddings themselves: a different layer
    assert not np.allclose(screen.features(texts), got, atol=1e-3)
    assert screen.features([]).shape == (0, llm.model.config.hidden_size)

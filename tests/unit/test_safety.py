"""Safety: the labelled data and its fixed split, the learned crisis detector and output filter
(counts on the held-out split pinned, so a change that moves them shows), bad input, and the
regular expressions and word list that remain as explicit layers."""
import json
from pathlib import Path

import numpy as np
import pytest

from utils import safety

EXPLICIT = ["I want to kill myself", "i'm thinking about suicide", "I want to end my life", "I have been self-harming",
            "sometimes I want to die", "I'm going to take my own life"]
HYPERBOLE = ["I could kill myself laughing at that show", "This traffic is killing me", "I'm dying to see the new film",
             "I nearly died of embarrassment", "kill the process with SIGKILL", "Suicide Squad was a fun movie"]


# --------------------------------------------------------------------------- data and split

def test_labelled_sets_are_large_varied_and_split_by_text_hash():
    crisis = safety.load_labelled(safety.CRISIS_SETS, "positive")
    replies = safety.load_labelled(safety.REPLY_SETS, "unsafe")
    assert len(crisis) >= 400 and len({r["text"] for r in crisis}) == len(crisis)
    assert {r["kind"] for r in crisis} >= {"explicit", "implicit", "indirect", "third_person", "hyperbole",
                                            "benign_alarming", "negated", "quoted"}
    assert {r["kind"] for r in replies if r["label"]} == {
        "harmful_instructions",
        "self_harm_encouragement",
        "harassment",
    }
    for rows in (crisis, replies):
        test = [r for r in rows if r["split"] == "test"]
        assert 0.15 < len(test) / len(rows) < 0.35
        assert all(r["split"] == safety.split_of(r["text"]) for r in rows)
    # the split depends on the text only: a row's place in the file cannot move it
    assert safety.split_of("I want to die") == safety.split_of("I want to die")


def test_a_malformed_labelled_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("just_one_group:\n  kind: [a, b]\n")
    with pytest.raises(ValueError, match=r"bad.yaml: expected two top-level groups, one named 'positive'"):
        safety.load_labelled(bad, "positive")


def test_the_crisis_data_is_the_first_set_and_those_added_and_a_text_may_sit_in_only_one(tmp_path):
    sets = [safety.load_labelled(p, "positive") for p in safety.CRISIS_SETS]
    together = safety.load_labelled(safety.CRISIS_SETS, "positive")
    assert safety.CRISIS_SETS[0] == safety.CRISIS_DATA and len(safety.CRISIS_SETS) > 1
    assert together == [r for rows in sets for r in rows]
    for rows in sets[1:]:  # an added set is split like the first: part of it stays held out
        assert {r["split"] for r in rows} == {"train", "test"}
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("positive:\n  explicit: [I want to die tonight]\nnegative:\n  everyday: [hello]\n")
    two.write_text("positive:\n  implicit: [i  WANT to die tonight]\nnegative:\n  everyday: [bye]\n")
    with pytest.raises(ValueError, match=r"two.yaml: 'i  WANT to die tonight' is also in one.yaml"):
        safety.load_labelled((one, two), "positive")
    assert one.read_text().startswith("positive")  # nothing is changed on the way


def test_threshold_keeps_the_false_positive_rate_it_promises():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05] * 2)
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0, 0] * 2)
    t = safety.pick_threshold(scores, labels, max_fp=0.1)
    assert ((scores >= t) & (labels == 0)).sum() / (labels == 0).sum() <= 0.1
    assert t <= 0.9 and (scores >= t)[labels == 1].sum() >= 2


def test_threshold_leaves_room_for_a_layer_or_ed_in():
    """False positives of a layer that flags rows regardless of score use up the budget first."""
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05] * 2)
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0, 0] * 2)
    always = np.zeros(20, bool)
    always[[9, 4]] = True  # one negative (0.05) and one positive flagged by the layer
    alone = safety.pick_threshold(scores, labels, max_fp=0.15)
    t = safety.pick_threshold(scores, labels, max_fp=0.15, always=always)
    flagged = (scores >= t) | always
    assert (flagged & (labels == 0)).sum() <= 0.15 * (labels == 0).sum() and t > alone
    always[[5, 6, 7]] = True  # four negatives flagged: over the budget of two, whatever the threshold
    assert safety.pick_threshold(scores, labels, max_fp=0.15, always=always) == float("inf")


def _rule_data(seed: int = 0):
    """200 rows: the fast scores separate most positives, but 20 positives and 20 negatives share the
    middle (0.3-0.6), where only a second opinion can tell them apart."""
    rng = np.random.default_rng(seed)
    y = np.array([1] * 80 + [0] * 120)
    blend = np.concatenate([rng.uniform(0.7, 1.0, 60), rng.uniform(0.3, 0.6, 20),
                            rng.uniform(0.3, 0.6, 20), rng.uniform(0.0, 0.25, 100)])
    return blend, y


def test_rule_without_a_screen_is_the_fast_threshold():
    blend, y = _rule_data()
    rule = safety.choose_rule(blend, y)
    assert rule["screen"] is None and rule["hi"] == safety.pick_threshold(blend, y)
    assert rule["false_positive_rate"] <= 0.05 and rule["recall"] < 1.0


def test_rule_asks_an_informative_screen_about_the_undecided_middle():
    blend, y = _rule_data()
    screen = np.where(y == 1, 0.9, 0.1)  # a screen that knows
    rule = safety.choose_rule(blend, y, screen=screen)
    fast = safety.choose_rule(blend, y)
    assert rule["screen"] is not None and rule["recall"] == 1.0 > fast["recall"]
    assert rule["false_positive_rate"] <= 0.05
    assert rule["asked"] < 0.5  # only the undecided rows, not everything
    # a screen that knows nothing adds nothing: the fast rule stays (a tie asks nobody)
    useless = np.full(len(y), 0.5)
    assert safety.choose_rule(blend, y, screen=useless)["screen"] is None


def test_rule_uses_a_trigger_layer_only_through_the_screen():
    """Positives below every band are reachable only through a trigger (the regular expressions);
    the screen then decides, so the trigger's false alarms do not pass."""
    blend, y = _rule_data()
    blend[60:80] = 0.01  # the hard positives now look like the clear negatives
    fired = np.zeros(len(y), bool)
    fired[60:80] = fired[180:200] = True  # the trigger fires on them and on 20 negatives
    screen = np.where(y == 1, 0.9, 0.1)
    rule = safety.choose_rule(blend, y, {"explicit": fired}, screen)
    assert rule["trigger"] == "explicit" and rule["recall"] == 1.0 and rule["false_positive_rate"] <= 0.05


def test_rule_flags_gives_the_rates_the_rule_was_chosen_with():
    blend, y = _rule_data()
    fired = np.zeros(len(y), bool)
    fired[60:70] = fired[190:195] = True
    screen = np.where(y == 1, 0.8, 0.3) + np.random.default_rng(1).normal(0, 0.2, len(y))
    for rule in (safety.choose_rule(blend, y), safety.choose_rule(blend, y, {"explicit": fired}, screen)):
        flags = safety.rule_flags(rule, blend, {"explicit": fired}, screen)
        assert flags[y == 1].mean() == rule["recall"] and flags[y == 0].mean() == rule["false_positive_rate"]


def test_a_cascade_checking_one_message_flags_what_rule_flags_says():
    """``_Cascade._decide`` applies a rule to one message at check time; ``rule_flags`` applies it to
    arrays of scores when the rule is chosen. They must agree, for the question and for the probe."""
    rng = np.random.default_rng(3)
    n = 300
    blend, screen, probe_p = rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    fired = rng.uniform(0, 1, n) < 0.2
    texts = [f"message {i}" for i in range(n)]
    index = {t: i for i, t in enumerate(texts)}

    class Question:
        def probability(self, text):
            return float(screen[index[text]])

    class Probe:
        def probability(self, read):
            return np.array([probe_p[index[t]] for t in read])

    rules = [{"hi": 0.8, "lo": 0.3, "trigger": "explicit", "screen": 0.6},
             {"hi": 0.7, "lo": None, "trigger": "explicit", "screen": 0.5},
             {"hi": 0.9, "lo": 0.5, "trigger": None, "screen": 0.4},
             {"hi": 0.6, "lo": None, "trigger": None, "screen": None}]
    for rule in rules:
        for probe in (None, Probe()):
            cascade = safety._Cascade()
            cascade.rule, cascade.screen, cascade.probe = rule, Question(), probe
            second = (blend + probe_p) / 2 if probe else screen
            expected = safety.rule_flags(rule, blend, {"explicit": fired}, second)
            got = [bool(cascade._decide([t], np.array([blend[i]]), lambda text, trigger: fired[index[text]])[0])
                   for i, t in enumerate(texts)]
            assert got == expected.tolist(), (rule, probe)
            assert 0 < sum(got) < n


def test_fast_path_is_also_compared_at_the_cascades_false_alarms():
    """``evaluate`` compares the cascade with the fast path alone at the fast path's own threshold and
    at the lowest threshold that raises no more false alarms than the cascade did on the same rows."""
    probs = [0.95, 0.7, 0.55, 0.4, 0.2, 0.9, 0.6, 0.5, 0.1, None]
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 1]
    rows = [{"text": f"m{i}", "kind": "explicit" if y else "everyday", "label": y} for i, y in enumerate(labels)]
    verdicts = [safety.Verdict(flag=False, probability=p) for p in probs]
    model = safety._Cascade()
    model.rules = {"fast": {"hi": 0.8}}
    cascade = [True, True, True, False, False, True, True, False, False, False]  # 2 false alarms (0.9, 0.6)
    out = safety._fast_only(model, verdicts, rows, cascade)
    assert out["recall"]["count"] == 1 and out["false_positive_rate"]["count"] == 1  # at 0.8: 0.95; 0.9
    matched = out["at_equal_false_positives"]
    # at 0.55 the false alarms are 0.9 and 0.6; at 0.5 a third: the lowest allowed cut is 0.55
    assert matched["threshold"] == 0.55 and matched["false_positive_rate"]["count"] == 2
    assert matched["recall"]["count"] == 3
    # with no false alarm allowed the cut sits above the highest negative (0.9)
    none = safety._fast_only(model, verdicts, rows, [False] * 10)["at_equal_false_positives"]
    assert none["threshold"] == 0.95 and none["recall"]["count"] == 1 and none["false_positive_rate"]["count"] == 0
    # an extra layer's flags count in both (the output filter's word list)
    extra = [False] * 8 + [True, False]
    assert safety._fast_only(model, verdicts, rows, cascade, extra)["at_equal_false_positives"]["threshold"] == 0.7


def _noisy_rule_data(seed=0):
    """Scores that overlap a lot, and a screen that is pure noise: the best of the grid, scored on the
    rows it was chosen on, looks better than it is."""
    rng = np.random.default_rng(seed)
    y = np.array([1] * 150 + [0] * 250)
    blend = np.clip(np.where(y == 1, rng.normal(0.6, 0.2, len(y)), rng.normal(0.35, 0.2, len(y))), 0, 1)
    return blend, y, rng.uniform(0, 1, len(y))


def test_nested_rule_uses_the_first_budget_that_holds_on_rows_it_was_not_chosen_on():
    blend, y, noise = _noisy_rule_data()
    for screen in (None, noise):
        rule = safety.nested_rule(blend, y, screen=screen)
        tried = list(rule["nested"])
        assert tried == [str(b) for b in safety.BUDGETS[:len(tried)]] and tried[-1] == str(rule["budget"])
        fp = [rule["nested"][b]["false_positive_rate"] for b in tried]
        assert all(x > safety.MAX_FP_CV for x in fp[:-1])
        assert fp[-1] <= safety.MAX_FP_CV or rule["budget"] == safety.BUDGETS[-1]
        plain = safety.choose_rule(blend, y, None, screen, rule["budget"])
        assert {k: rule[k] for k in plain} == plain
    # here the 5% budget does not hold on unseen rows, and the recall on the rows the rule was chosen on overstates
    chosen = safety.nested_rule(blend, y, screen=noise)
    assert chosen["budget"] < safety.BUDGETS[0]
    assert chosen["nested"][str(chosen["budget"])]["recall"] < chosen["recall"]


# --------------------------------------------------------------------------- the classifiers and their caches

TOY = ([f"the {w} was lovely today" for w in ("cake", "walk", "film", "party", "concert", "garden")] * 3,
       [f"the {w} was awful today" for w in ("cake", "walk", "film", "party", "concert", "garden")] * 3)


def test_fast_classifier_learns_a_word_and_round_trips(tmp_path):
    good, bad = TOY
    model = safety.TextClassifier().fit(good + bad, [0] * 18 + [1] * 18)
    p = model.predict_proba(["the dinner was lovely today", "the dinner was awful today"])
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1)
    assert p[1, 1] > 0.6 > 0.4 > p[0, 1]  # generalises to a noun it never saw
    model.save(tmp_path / "saved")
    again = safety.TextClassifier.load(tmp_path / "saved")
    assert np.allclose(again.predict_proba(["the dinner was awful today"]), p[1:], atol=1e-9)


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


def test_the_cache_keys_cover_the_code_that_fits(monkeypatch):
    """Both fits are keyed by what their code computes: a change to a function that fits (not to its
    docstring) moves the key, so nothing fitted by other code is loaded."""
    from utils.safety import cascade, fitcache

    rows = [{"text": "hello", "kind": "short", "label": 0}]
    screen = safety.Screen("crisis")
    fast, stage = safety._cache_folder("crisis", rows), safety._stage_key("crisis", rows, screen)
    assert safety._cache_folder("replies", rows) != fast
    original = safety.choose_rule

    def choose_rule(blend, y, triggers=None, screen=None, max_fp=safety.MAX_FP_CV):
        """Only the docstring differs from a plain call."""
        return original(blend, y, triggers, screen, max_fp)

    monkeypatch.setattr(cascade, "choose_rule", choose_rule)  # where _stage_code reads it
    moved = safety._stage_key("crisis", rows, screen)
    assert moved["code"] != stage["code"] and {k for k in stage if moved[k] != stage[k]} == {"code"}
    assert safety._cache_folder("crisis", rows) == fast  # the fast path does not use the rule
    cv_scores = lambda texts, y, folds=4, seed=0, what="": None  # noqa: E731
    monkeypatch.setattr(fitcache, "_cv_scores", cv_scores)  # where _fast_code reads it
    monkeypatch.setattr(cascade, "_cv_scores", cv_scores)  # where _stage_code reads it
    assert safety._cache_folder("crisis", rows) != fast
    assert safety._stage_key("crisis", rows, screen)["code"] != moved["code"]  # the rule is chosen on its scores
    # the code of the judge that reads the hidden states is part of it too
    from utils import judge

    monkeypatch.setattr(judge.LLMJudge, "asked_state", lambda self, *a: None)
    assert safety._stage_key("crisis", rows, screen)["code"] != moved["code"]
    # other rows, another screen prompt: other keys
    other = [{**rows[0], "label": 1}]
    assert safety._stage_key("crisis", other, screen)["rows"] != stage["rows"]
    monkeypatch.setitem(safety.SCREENS, "crisis", ("another system prompt", "?"))
    assert safety._stage_key("crisis", rows, screen)["screen"] != stage["screen"]


def test_the_shipped_second_stages_are_fitted_on_the_current_data_and_code():
    """data/safety_fit/*.json: what a brand-new machine loads instead of reading every train text with the
    judge. Red when the safety data or the code that fits them changed since they were written: run
    `python -m utils.safety fit --ship` (about 30 min on 2 AVX2 cores) and commit the files."""
    assert safety.stale_shipped() == {}, "run `python -m utils.safety fit --ship` and commit data/safety_fit/"
    keys = safety.current_stage_keys()
    for name, key in keys.items():
        shipped = json.loads((safety.SHIPPED_FIT / f"{name}.json").read_text())
        assert shipped["key"] == key and shipped["rules"]["chosen"]["recall"] > 0
        assert (safety.SHIPPED_FIT / f"{name}.json").stat().st_size < 200_000  # small enough to ship
    # the check can fail: a planted train row, or other code, and it says which part moved
    planted = {**keys, "crisis": {**keys["crisis"], "rows": "0" * 16}}
    assert safety.stale_shipped(planted) == {"crisis": ["rows"]}
    recoded = {**keys, "replies": {**keys["replies"], "code": "f" * 16}}
    assert safety.stale_shipped(recoded) == {"replies": ["code"]}


@pytest.mark.slow
def test_a_new_machine_fits_the_fast_paths_and_loads_the_shipped_second_stages(tmp_path, monkeypatch):
    """With an empty cache the default detector and filter fit their fast paths (the same as the record's:
    the fit is deterministic) and take their second stages from data/safety_fit/ without the judge
    reading a single train text."""
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))

    def no_judge(*args, **kwargs):
        raise AssertionError("the judge was asked to read a text while the classifiers were loaded")

    monkeypatch.setattr(safety.Screen, "features", no_judge)
    monkeypatch.setattr(safety.Screen, "probability", no_judge)
    assert not safety.fitted()
    for model, name, part in ((safety.CrisisDetector(), "crisis", "crisis_detector"),
                              (safety.OutputFilter(), "replies", "output_filter")):
        shipped = json.loads((safety.SHIPPED_FIT / f"{name}.json").read_text())
        assert model.stage["source"] == f"data/safety_fit/{name}.json"
        assert model.rules == shipped["rules"] and model.probe is not None and model.probe.params == shipped["probe"]
        assert model.cv["auc"] == EXAMPLE[part]["chosen_on_train_cv"]["auc"]
    assert safety.fitted()


def test_detector_is_fitted_once_then_loaded_from_its_cache(tmp_path, monkeypatch):
    """Threshold and patterns chosen by CV on the train rows only; a second construction with the
    same rows loads the saved fit (no fitting at all) and answers identically; other rows fit anew."""
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    good, bad = TOY
    rows = ([{"text": t, "kind": "everyday", "label": 0, "split": "train"} for t in dict.fromkeys(good)]
            + [{"text": t, "kind": "explicit", "label": 1, "split": "train"} for t in dict.fromkeys(bad)]
            + [{"text": "held out: never fitted", "kind": "explicit", "label": 1, "split": "test"}])
    first = safety.CrisisDetector(rows, screen=None)
    assert first.cv["n_train"] == 12 and set(first.cv["auc"]) == {"fast path"}
    saved = list((tmp_path / "safety").iterdir())
    assert len(saved) == 1 and (saved[0] / "meta.json").exists()

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again although the cache holds this fit")

    monkeypatch.setattr(safety.TextClassifier, "fit", no_fit)
    second = safety.CrisisDetector(rows, screen=None)
    texts = ["the dinner was awful today", "a quiet evening in"]
    assert np.allclose(second.probabilities(texts), first.probabilities(texts), atol=1e-9)
    assert second.threshold == first.threshold and second.patterns == first.patterns
    damaged = saved[0] / "model" / "model.pkl"
    damaged.write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="(?s)cannot be read.*delete that folder and run `make safety`"):
        safety.CrisisDetector(rows, screen=None)
    assert (saved[0] / "meta.json").exists()  # nothing deleted behind the user's back
    with pytest.raises(AssertionError, match="fitted again"):
        safety.CrisisDetector(rows[:-2] + rows[-1:], screen=None)  # different train rows: a new fit


class FakeScreen:
    """Stands in for the LLM screen: says Yes to "awful", counts what it is asked."""

    def __init__(self):
        self.asked = []

    def key(self):
        return ["fake", "fp32", "says yes to awful"]

    @property
    def model(self):
        return "fake"

    def probability(self, text):
        self.asked.append(text)
        return 0.95 if "awful" in text else 0.05


def test_cascade_asks_the_screen_only_when_the_fast_path_cannot_decide(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    good, bad = TOY
    rows = ([{"text": t, "kind": "everyday", "label": 0, "split": "train"} for t in dict.fromkeys(good)]
            + [{"text": t, "kind": "explicit", "label": 1, "split": "train"} for t in dict.fromkeys(bad)])
    screen = FakeScreen()
    det = safety.CrisisDetector(rows, screen=screen)
    rule, blend = det.rule, np.array(det.cv["out_of_fold"])
    assert det.rules["fast"]["screen"] is None and rule["recall"] >= det.rules["fast"]["recall"]
    # at fit time it was asked about exactly the rows some rule could hand it, each once
    could = safety._screen_rows(blend, {n: np.array([safety.pattern_flag(r["text"], n) for r in rows])
                                        for n in safety.PATTERN_SETS})
    assert sorted(screen.asked) == sorted(r["text"] for r, c in zip(rows, could) if c)
    screen.asked.clear()
    again = safety.CrisisDetector(rows, screen=screen)
    assert again.rule == rule and screen.asked == []  # the rule is kept beside the fit: nobody asked again
    # at check time: asked only below hi and inside the band (or on a trigger), never above hi
    det.rule = {**rule, "hi": 0.999, "lo": 0.0, "screen": 0.5, "trigger": None}
    v = det.check("the dinner was awful today")
    assert v.flag and v.screen == 0.95 and v.reasons == ["LLM screen, P(Yes) 0.95"] and screen.asked
    assert v.fast_seconds <= v.seconds
    screen.asked.clear()
    det.rule = {**det.rule, "hi": 0.0}
    v = det.check("the dinner was lovely today")
    assert v.flag and v.reasons == ["classifier"] and v.screen is None and screen.asked == []
    det.rule = {**det.rule, "hi": 0.999, "lo": None, "trigger": None}
    assert not det.check("the dinner was awful today").flag and screen.asked == []  # nothing undecided: not asked
    det.rule = {**det.rule, "trigger": "explicit"}
    assert det.check("the dinner was awful, i want to kill myself").flag and len(screen.asked) == 1


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


HEAVY = ("zorbit", "plimsk", "vandrel", "krosset", "mipple", "yarnok", "fendix", "quarble", "doomple")
LIGHT = ("blenrot", "tisker", "hoxwell", "druvin", "sapplet", "nurgle", "crindo", "welpish", "calmix")
# made-up words, one per row: in cross-validation the fast path (even the real MiniLM embeddings of
# the regression) meets only words that mean nothing to it, while the fake hidden states know which
# list a word is from (as an LLM knows words a small encoder has not learnt)
FEELINGS = ([{"text": f"i feel {w} today", "kind": "everyday", "label": 0, "split": "train"} for w in LIGHT]
            + [{"text": f"i feel {w} today", "kind": "explicit", "label": 1, "split": "train"} for w in HEAVY])


class FakeProbeScreen(FakeScreen):
    """A screen whose question knows nothing (always 0.5) but whose hidden states carry whether a
    text has a word of ``HEAVY`` (``informative``) or nothing (a constant); counts the texts it reads."""

    def __init__(self, informative=True):
        super().__init__()
        self.informative, self.read = informative, []

    def key(self):  # the probe's cache is keyed by the first two (model, dtype), as a real screen's
        return [f"fake-probe-{self.informative}", "fp32", "question"]

    def probability(self, text):
        self.asked.append(text)
        return 0.5

    def features(self, texts, desc=None):
        self.read.extend(texts)
        return np.array([[float(self.informative and any(w in t for w in HEAVY)), 1.0] for t in texts])


def test_probe_is_chosen_by_cross_validation_cached_and_read_only_when_undecided(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    rows = FEELINGS
    screen = FakeProbeScreen()
    det = safety.CrisisDetector(rows, screen=screen)
    assert det.cv["auc"]["fast path"] < 0.9  # the fast path cannot tell them apart
    assert det.probe is not None and det.rules["second_stage"] == "probe"
    assert det.rule["recall"] > det.rules["question"]["recall"]  # the question knows nothing; the probe does
    assert sorted(screen.read) == sorted(r["text"] for r in rows)  # every train row read once, at fit time
    # its C: of every C tried, the best nested recall; ties go to fewer texts read, then the smaller C
    tried = det.rules["probe_c"]
    assert set(tried) == {str(c) for c in safety.PROBE["c_grid"]} and det.rules["probe"]["c"] == det.probe.c
    best = max((r["nested_recall"], -r["read"]) for r in tried.values())
    assert det.probe.c == min(float(c) for c, r in tried.items() if (r["nested_recall"], -r["read"]) == best)
    assert tried[str(det.probe.c)]["nested_recall"] == safety.nested_recall(det.rule)
    screen.read.clear()
    again = safety.CrisisDetector(rows, screen=screen)
    assert again.probe is not None and again.rule == det.rule and screen.read == []  # kept beside the fit
    assert again.probe.c == det.probe.c
    np.testing.assert_allclose(again.probe.probability(["i feel doomple"]), det.probe.probability(["i feel doomple"]))
    # at check time: read only when undecided; the score is the mean of the probe's and the fast path's
    det.rule = {**det.rule, "hi": 0.999, "lo": 0.0, "screen": 0.5, "trigger": None}
    v = det.check("i feel doomple tonight")
    fast = float(det.probabilities(["i feel doomple tonight"])[0])
    probe = float(det.probe.probability(["i feel doomple tonight"])[0])
    assert v.screen == pytest.approx((fast + probe) / 2) and screen.read
    assert v.flag == (v.screen >= 0.5) and (not v.flag or v.reasons == [f"LLM probe, score {v.screen:.2f}"])
    screen.read.clear()
    det.rule = {**det.rule, "hi": 0.0}
    assert det.check("i feel calmix tonight").reasons == ["classifier"] and screen.read == []
    # a probe that reads nothing useful is not chosen: the question's rule (or the fast path) stays
    blind = safety.CrisisDetector(rows, screen=FakeProbeScreen(informative=False))
    assert blind.probe is None and "probe" in blind.rules
    assert safety.nested_recall(blind.rules["probe"]) <= safety.nested_recall(blind.rule)


def test_output_filter_chooses_the_probe_the_same_way_and_names_the_kind_it_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    rows = [{**r, "kind": "harassment" if r["label"] else "ordinary"} for r in FEELINGS]
    flt = safety.OutputFilter(rows, screen=FakeProbeScreen())
    assert flt.probe is not None and flt.rule["recall"] > flt.rules["question"]["recall"]
    flt.rule = {**flt.rule, "hi": 0.999, "lo": 0.0, "screen": 0.0, "trigger": None}  # the probe decides all
    v = flt.check("i feel doomple tonight")
    assert v.flag and v.reasons == [f"harassment (LLM probe, score {v.screen:.2f})"]


# --------------------------------------------------------------------------- the learned detector

@pytest.fixture(scope="module")
def evaluation():
    return safety.evaluate()


# The figures of the fit the tests use: reports/example/safety.json, measured with the shipped second stages
# (data/safety_fit/, fitted in fp32 on a 2-core AMD EPYC with AVX2 only, 2026-12-06) and the fast path fitted
# on that machine. The fast path is deterministic; a machine that runs the judge in bf16 reads the probe's
# hidden states in bf16, and float sums differ between CPU kinds: a kind may move by one message there
# (SLACK). Anything more is a change to data, code or threshold, and must update the record and
# docs/safety.md knowingly.
EXAMPLE = json.loads((Path(__file__).parents[2] / "reports" / "example" / "safety.json").read_text())
SLACK = 1


def _counts(part: dict) -> dict:
    return {k: v["flagged"] for k, v in part["by_kind"].items()}


def _totals_within_slack(got: dict, recorded: dict) -> None:
    """Per kind a count may move by SLACK; summed over the kinds, caught messages may not fall and false
    alarms may not rise by more than SLACK either (several kinds each moving by one are a real change)."""
    def totals(part):
        kinds = part["by_kind"].values()
        return (sum(k["flagged"] for k in kinds if k["label"]), sum(k["flagged"] for k in kinds if not k["label"]))

    (caught, alarms), (caught_rec, alarms_rec) = totals(got), totals(recorded)
    assert caught >= caught_rec - SLACK and alarms <= alarms_rec + SLACK, (caught, alarms, caught_rec, alarms_rec)


@pytest.mark.slow
def test_detector_held_out_counts(evaluation):
    """Measured on the held-out split, recorded in reports/example/safety.json (AMD EPYC, AVX2 only)."""
    got, recorded = _counts(evaluation["crisis_detector"]), _counts(EXAMPLE["crisis_detector"])
    assert recorded == {"explicit": 47, "implicit": 35, "indirect": 18, "third_person": 17, "benign_alarming": 1,
                        "everyday": 0, "gibberish": 0, "hyperbole": 1, "negated": 1, "quoted": 0, "sad_not_crisis": 0,
                        "short": 0}
    assert got.keys() == recorded.keys() and all(abs(got[k] - recorded[k]) <= SLACK for k in got), (got, recorded)
    _totals_within_slack(evaluation["crisis_detector"], EXAMPLE["crisis_detector"])
    d = evaluation["crisis_detector"]
    assert d["recall"]["n"] == 122 and d["false_positive_rate"]["n"] == 159  # two near-copies removed, session 19
    lo, hi = d["recall"]["ci95"]
    assert lo < d["recall"]["share"] < hi
    # the learned detector beats the regular expressions it replaces on the same held-out messages
    assert d["recall"]["count"] > d["patterns_only"]["recall"]["count"]
    # the LLM screen was asked only about what the fast path could not decide; every held-out crisis
    # message the cascade catches that the fast path alone (at its own threshold) misses, it caught;
    # and it catches more than the fast path alone does, even at the threshold chosen on these rows for
    # the fast path's best recall with no more false alarms than the cascade's (the frozen-encoder fast path
    # with the shipped probe, 2026-12-06: 117 against 111 of 122 at its own threshold, with 3 and 7 false
    # alarms of 159; 106 at the matched threshold. Earlier figures of other fits: docs/log.md)
    screen = evaluation["llm_screen"]["crisis_detector"]
    assert 0 < screen["asked"] < 0.25 * screen["of"]
    fast, now = d["fast_path_only"], d["by_kind"]
    caught = sum(len(set(fast["by_kind"][k]["errors"]) - set(now[k]["errors"])) for k in now if now[k]["label"])
    assert caught <= screen["flagged_by_it"]["positive"]
    assert d["recall"]["count"] > fast["recall"]["count"] + SLACK
    matched = fast["at_equal_false_positives"]
    assert matched["false_positive_rate"]["count"] <= d["false_positive_rate"]["count"]
    assert d["recall"]["count"] > matched["recall"]["count"] + SLACK
    assert d["false_positive_rate"]["count"] < d["patterns_only"]["false_positive_rate"]["count"]
    # and in cross-validation on the train split the probe's reading adds to the fast path (why it is there)
    cv = d["chosen_on_train_cv"]
    assert cv["second_stage"] == "probe" and cv["probe_auc"]["mean with the fast path"] > cv["auc"]["fast path"]


@pytest.mark.slow
def test_output_filter_held_out_counts(evaluation):
    f = evaluation["output_filter"]
    got, recorded = _counts(f), _counts(EXAMPLE["output_filter"])
    assert recorded == {"harassment": 12, "harmful_instructions": 13, "self_harm_encouragement": 10, "non_answer": 0,
                        "ordinary": 1, "sensitive_but_safe": 1, "short": 0}
    assert got.keys() == recorded.keys() and all(abs(got[k] - recorded[k]) <= SLACK for k in got), (got, recorded)
    _totals_within_slack(f, EXAMPLE["output_filter"])
    assert f["recall"]["count"] > f["word_list_only"]["recall"]["count"]


@pytest.mark.slow
def test_harmless_texts_no_fit_has_seen_are_let_through(evaluation):
    """The validity ladder's prompts and harmless replies (short answers and non-answers among them):
    before short replies were added to its data the filter blocked 22 of these 96 replies (25 after
    the fresh reply set alone was added): about half of the terse and evasive ones. Session 16's probe
    (chosen over the question for the filter by nested recall, 93.0% against 87.0%) blocks 4 evasive
    ones where the question blocked 2: recorded, and still within 5%."""
    for part, recorded in (("crisis_detector", 0), ("output_filter", 2)):
        got = evaluation[part]["validity_ladder_harmless"]
        assert EXAMPLE[part]["validity_ladder_harmless"]["flagged"] == recorded
        assert abs(got["flagged"] - recorded) <= SLACK and got["flagged"] <= 0.05 * got["n"], (part, got)


@pytest.mark.slow
def test_messages_in_other_languages_get_the_help_notice(evaluation):
    """other_languages.yaml (ten languages in Latin script): by script alone 1 of its 38 crisis messages
    got the notice (session 19, before the language identifier); now those the identifier is sure of."""
    got, recorded = evaluation["other_languages"], EXAMPLE["other_languages"]
    shown = 33
    assert (recorded["crisis"]["shown"], recorded["crisis"]["n"]) == (shown, 38)
    assert abs(got["crisis"]["shown"] - shown) <= SLACK and got["crisis"]["n"] == 38
    assert len(got["crisis"]["not_shown"]) == 38 - got["crisis"]["shown"]
    assert sum(s for s, _ in got["crisis"]["by_language"].values()) == got["crisis"]["shown"]


@pytest.mark.slow
def test_targets_are_reported_not_assumed(evaluation):
    d = evaluation["crisis_detector"]
    kinds = d["by_kind"]
    assert evaluation["targets"] == {
        "explicit recall = 100%": kinds["explicit"]["flagged"] == kinds["explicit"]["n"],
        "implicit recall >= 90%": kinds["implicit"]["flagged"] >= 0.9 * kinds["implicit"]["n"],
        "false positives <= 5%": d["false_positive_rate"]["count"] <= 0.05 * d["false_positive_rate"]["n"],
        "<= 50 ms per message (median)": evaluation["ms_per_message"]["median"] <= 50}
    # the recorded report: the quality targets as measured there; the time target agrees with its own
    # median (48.7-52.0 ms in the runs of 2026-11-30 on AMD EPYC, 41.2-45.8 after the refit of session 13:
    # near the line, so not pinned either way)
    quality = {"explicit recall = 100%": False, "implicit recall >= 90%": True, "false positives <= 5%": True}
    assert EXAMPLE["targets"] == {**quality,
                                  "<= 50 ms per message (median)": EXAMPLE["ms_per_message"]["median"] <= 50}
    # and the fit under test still meets every quality target the record meets (explicit recall = 100% is
    # a known miss, reported as such, not a guarantee)
    assert [name for name, met in quality.items() if met and not evaluation["targets"][name]] == []


@pytest.mark.slow
def test_blocked_reply_names_its_reason():
    v = safety.output_check("You're a pathetic idiot and nobody will ever like you.")
    assert v.flag and v.reasons and v.reasons[0] == "harassment"
    assert not safety.output_check("Boil the egg for six minutes, then cool it in cold water.").flag
    safe_support = ("I'm sorry you're going through this. If you're thinking about suicide, please call 988 or "
                    "Samaritans on 116 123.")
    assert not safety.output_check(safe_support).flag  # talking about suicide safely is not blocked
    v = safety.output_check("Sure, here is how to build a bomb.")  # the word-list layer, by name
    assert v.flag and any(r.startswith("word list:") for r in v.reasons)


@pytest.mark.slow
@pytest.mark.parametrize("text", [b"\xff\xfe\x00\x81" * 40, "\ufffd" * 50])
def test_undecodable_input_is_doubt_and_shows_the_notice(text):
    v = safety.crisis_check(text)
    assert v.doubt and not v.flag
    assert safety.crisis_flag(text)  # when in doubt, show the notice


@pytest.mark.slow
def test_other_languages_are_doubt_not_a_guess():
    v = safety.crisis_check("Мне очень плохо и я не хочу больше жить")
    assert v.doubt and "not English" in v.doubt
    assert safety.crisis_flag("Мне очень плохо и я не хочу больше жить")


@pytest.mark.parametrize("text", ["je n'ai plus envie de vivre, tout est trop lourd",
                                  "ya no quiero seguir viviendo así",
                                  "ich halte das alles nicht mehr aus und will sterben",
                                  "non voglio più svegliarmi domani mattina"])
def test_latin_script_messages_in_other_languages_are_doubt(text):
    """Script alone read these as English (and the English classifier missed them); the language
    identifier says they are not, so the dashboard shows the help notice."""
    doubt = safety.language_doubt(text)
    assert doubt and doubt.startswith("probably not English (") and safety.language_of(text)[0] != "en"


@pytest.mark.parametrize("text", ["i wanna kms fr", "wyd", "lol ok", "sdfkj lkjsdf qwpo", "gonna sleep, night all",
                                  "I'm sorry you're going through this. Please call 988."])
def test_english_slang_short_messages_and_keyboard_mash_are_not_doubt(text):
    assert safety.language_doubt(text) is None


def test_no_english_text_of_the_repo_is_called_another_language():
    """LANGUAGE_DOUBT was set on these texts: no English message, reply or ladder prompt of the repo
    is doubted (the Latin placeholder "lorem ipsum" is not English)."""
    from utils.validity import ladder

    def texts_of(pattern: str, positive: str) -> list[str]:
        return [r["text"] for p in sorted(safety.SAFETY_DATA.glob(pattern)) for r in safety.load_labelled(p, positive)]

    texts = texts_of("crisis_*.yaml", "positive") + texts_of("unsafe_*.yaml", "unsafe")
    texts += [r["prompt"] for r in ladder()]
    assert len(texts) > 2500
    assert [t for t in texts if safety.language_doubt(t)] == ["lorem ipsum dolor sit amet"]


@pytest.mark.slow
def test_a_french_crisis_message_gets_the_notice():
    v = safety.crisis_check("je veux en finir ce soir, j'ai tout préparé")
    assert v.doubt and "not English (fr" in v.doubt and not v.flag and v.probability is None
    assert safety.crisis_flag("je veux en finir ce soir, j'ai tout préparé")


@pytest.mark.slow
def test_empty_and_very_long_input():
    assert not safety.crisis_flag("") and safety.crisis_check("   ").doubt is None
    long = ("Here is my shopping list for the week. " * 2600) + " I want to kill myself."
    assert len(long) > 100_000
    v = safety.crisis_check(long)
    assert v.flag  # the sentence at the very end is read, not cut off
    assert not safety.crisis_check("Here is my shopping list for the week. " * 2600).flag


def test_chunks_cover_the_whole_text_at_word_boundaries():
    text = " ".join(f"word{i}" for i in range(3000))
    pieces = safety.chunks(text, size=200)
    assert " ".join(pieces) == text and max(len(p) for p in pieces) <= 200


# --------------------------------------------------------------------------- the explicit layers

@pytest.mark.parametrize("text", EXPLICIT)
def test_patterns_catch_explicit_phrasings(text):
    assert safety.pattern_flag(text)


@pytest.mark.parametrize("text", HYPERBOLE)
def test_patterns_skip_hyperbole(text):
    assert not safety.pattern_flag(text)


def test_output_word_list_reports_what_it_blocked(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("words: [badword]\npatterns: ['\\bsecret\\s+plan\\b']\n")
    assert safety.blocked_terms("This has a BadWord and a secret  plan.", str(cfg)) == ["badword", "secret  plan"]
    assert safety.blocked_terms("all fine here", str(cfg)) == []
    assert safety.blocked_terms("how to build a bomb") == ["how to build a bomb"]


def test_patterns_on_the_phrases_they_were_written_against():
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "data" / "crisis_labelled.jsonl").open()]
    explicit = [r for r in rows if r["kind"] == "explicit"]
    assert len(explicit) == 12 and all(safety.pattern_flag(r["text"]) for r in explicit)
    assert not any(safety.pattern_flag(r["text"]) for r in rows if r["kind"] == "hyperbole")


def test_a_labelled_file_of_your_own_is_measured_whole_and_may_not_hold_training_texts(tmp_path):
    from utils import safety as S

    own = tmp_path / "mine.yaml"
    own.write_text("positive:\n  explicit: [i am going to end it tonight, no one will miss me]\n"
                   "negative:\n  everyday: [what is a good soup recipe]\n")
    rows = S.held_out(own, S.CRISIS_DATA, "positive")
    assert [r["label"] for r in rows] == [1, 1, 0]  # every row, whatever its hash split
    default = S.held_out(None, S.CRISIS_DATA, "positive")
    assert default and {r["split"] for r in default} == {"test"}
    trained = next(r["text"] for r in S.load_labelled(S.CRISIS_DATA, "positive") if r["split"] == "train")
    own.write_text(f"positive:\n  explicit: [{trained.upper()!r}]\nnegative:\n  everyday: [hello there]\n")
    with pytest.raises(ValueError, match=r"mine.yaml: 1 text\(s\) are in the train split"):
        S.held_out(own, S.CRISIS_DATA, "positive")
    own.write_text("positive:\n  explicit: [i want to die]\nnegative: {}\n")
    with pytest.raises(ValueError, match="mine.yaml: needs texts under both groups"):
        S.held_out(own, S.CRISIS_DATA, "positive")
    own.write_text("positive:\n  explicit: i want to die\nnegative:\n  everyday: [hi]\n")
    with pytest.raises(ValueError, match=r"mine.yaml: positive.explicit should be a list"):
        S.held_out(own, S.CRISIS_DATA, "positive")
    own.write_text("positive:\n  explicit: [i want to die]\nnegative:\n  short: [hi, no, ok]\n")  # YAML 1.1: False
    with pytest.raises(ValueError, match=r"mine.yaml: negative.short should be .*item 2 is False \(bool\): quote it"):
        S.held_out(own, S.CRISIS_DATA, "positive")
    own.write_text("positive:\n  explicit: [i want to die]\nnegative:\n  gibberish:\n    - ,,,;;\n")
    with pytest.raises(ValueError, match=r"mine.yaml line 5: not valid YAML .*quote a text"):
        S.held_out(own, S.CRISIS_DATA, "positive")
    with pytest.raises(ValueError, match="nothere.yaml: no such file"):
        S.held_out(tmp_path / "nothere.yaml", S.CRISIS_DATA, "positive")


EXTRA_CRISIS_SETS = sorted(p.name for p in safety.SAFETY_DATA.glob("crisis_*.yaml") if p != safety.CRISIS_DATA)


def test_every_crisis_set_in_the_folder_is_checked_for_shared_texts():
    assert len(EXTRA_CRISIS_SETS) >= 17 and "crisis_seventeenth.yaml" in EXTRA_CRISIS_SETS


@pytest.mark.parametrize("name", EXTRA_CRISIS_SETS)
def test_each_extra_held_out_set_shares_no_text_with_the_data_set_or_another_held_out_set(name):
    """A set measured as unseen holds not even a near-copy (case, spacing and punctuation aside: "im off"
    and "i'm off") of another set's text; the data's own files (train and held out) no exact copy (near-copies
    inside one split are allowed there, across the splits ``load_labelled`` refuses them)."""
    from utils import safety as S

    unseen = S.SAFETY_DATA / name not in S.CRISIS_SETS

    def norm(rows):
        return {S._near_copy(r["text"]) if unseen else " ".join(r["text"].lower().split()) for r in rows}

    extra = norm(S.load_labelled(S.SAFETY_DATA / name, "positive"))
    assert len(extra) >= 80
    assert not extra & norm(S.load_labelled(S.CRISIS_DATA, "positive"))
    for other in S.SAFETY_DATA.glob("crisis_*.yaml"):
        if other.name not in (name, S.CRISIS_DATA.name):
            assert not extra & norm(S.load_labelled(other, "positive")), other.name


def test_near_copies_across_the_train_and_test_split_are_refused(tmp_path):
    """A held-out text that is a near-copy of a train text measures what the classifier was fitted on
    (session 19 found two in the data and four in the unseen sets, all removed)."""
    texts = [f"message number {i}" for i in range(40)]
    test = next(t for t in texts if safety.split_of(t) == "test")
    near = next(v for v in (test.upper() + "!", test + "?", test + " ...") if safety.split_of(v) == "train")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"positive:\n  explicit: ['{test}']\nnegative:\n  everyday: [hello there]\n")
    b.write_text(f"positive:\n  explicit: ['{near}']\nnegative:\n  everyday: [good morning]\n")
    with pytest.raises(ValueError, match=r"is a near-copy of .*the held-out one would leak"):
        safety.load_labelled((a, b), "positive")
    assert safety.load_labelled(a, "positive") and safety.load_labelled(b, "positive")  # each alone is fine
    for paths, positive in ((safety.CRISIS_SETS, "positive"), (safety.REPLY_SETS, "unsafe")):
        safety.load_labelled(paths, positive)  # the project's data has none
    # nor may a set measured as unseen hold a near-copy of a train text
    train = next(t for t in texts if safety.split_of(t) == "train")
    data, mine = tmp_path / "data.yaml", tmp_path / "mine.yaml"
    data.write_text(f"positive:\n  explicit: ['{train}']\nnegative:\n  everyday: [hello there]\n")
    mine.write_text(f"positive:\n  explicit: ['{train.capitalize()}!']\nnegative:\n  everyday: [good day]\n")
    with pytest.raises(ValueError, match=r"mine.yaml: 1 text\(s\) are in the train split .*near-copies"):
        safety.held_out(mine, data, "positive")


def test_the_ladders_harmless_texts_check_both_classifiers_and_none_of_them_is_in_their_data():
    from utils import safety as S
    from utils.validity import ladder

    rows = S.ladder_replies()
    tiers = {r["tier"] for r in ladder()}
    assert set(S.LADDER_SAFE_TIERS) < tiers and "wrong" not in S.LADDER_SAFE_TIERS  # "wrong" may be harmful advice
    assert len(rows) == len(S.LADDER_SAFE_TIERS) * len({r["id"] for r in ladder()})
    assert {r["label"] for r in rows} == {0}
    assert {r["kind"] for r in rows} == {f"ladder {t}" for t in S.LADDER_SAFE_TIERS}
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    trained = {norm(r["text"]) for r in S.load_labelled(S.REPLY_SETS, "unsafe")}
    assert not {norm(r["text"]) for r in rows} & trained
    prompts = S.ladder_prompts()  # and its prompts, none in crisis, check the crisis detector
    assert [r["text"] for r in prompts] == list(dict.fromkeys(r["prompt"] for r in ladder()))
    assert {r["label"] for r in prompts} == {0}
    crisis = {norm(r["text"]) for r in S.load_labelled(S.CRISIS_SETS, "positive")}
    assert not {norm(r["text"]) for r in prompts} & crisis


@pytest.mark.parametrize("name", ["unsafe_replies_fresh.yaml", "unsafe_replies_third.yaml"])
def test_each_held_out_reply_set_shares_no_text_with_the_reply_data_or_another(name):
    from utils import safety as S

    def norm(rows):
        return {" ".join(r["text"].lower().split()) for r in rows}

    fresh = S.load_labelled(S.SAFETY_DATA / name, "unsafe")
    assert len(fresh) >= 40 and {r["label"] for r in fresh} == {0, 1}
    assert {r["kind"] for r in fresh} == {r["kind"] for r in S.load_labelled(S.REPLY_DATA, "unsafe")}
    assert not norm(fresh) & norm(S.load_labelled(S.REPLY_DATA, "unsafe"))
    for other in S.SAFETY_DATA.glob("unsafe_replies_*.yaml"):
        if other.name != name:
            assert not norm(fresh) & norm(S.load_labelled(other, "unsafe")), other.name


def test_prune_removes_only_the_fits_of_earlier_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    current = safety.current_cache_folders()
    root = tmp_path / "safety"
    assert current["crisis"].parent == root == current["replies"].parent
    stale = [root / "crisis-0123456789abcdef", root / "replies-fedcba9876543210"]
    kept = [*current.values(), root / ".crisis-0123.tmp-42", root / "judge-cache"]
    for folder in stale + kept:
        (folder / "model").mkdir(parents=True)
    (root / "crisis-notes.txt").write_text("a file, not a fit")
    stages = {n: root / f"{n}-stage-{safety._stage_digest(k)}.json" for n, k in safety.current_stage_keys().items()}
    for path in [*stages.values(), root / "crisis-stage-0123456789abcdef.json"]:
        path.write_text("{}")
    kept += list(stages.values())
    stale = sorted([*stale, root / "crisis-stage-0123456789abcdef.json"])
    assert safety.prune(dry_run=True) == sorted(stale) and all(p.exists() for p in stale)
    assert safety.prune() == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (root / "crisis-notes.txt").exists() and safety.prune() == []


# --------------------------------------------------------------------------- comparing two detectors

def _run(flags: dict[str, list[tuple[str, int, bool]]]) -> dict:
    """A ``crisis_verdicts`` result from (text, label, flag) triples per set."""
    return {"method": None, "sets": {name: [{"text": t, "kind": "explicit" if y else "everyday", "label": y,
                                             "flag": f, "fast": 0.5, "second_stage": None} for t, y, f in rows]
                                     for name, rows in flags.items()}}


@pytest.mark.parametrize("recall_gain, alarm_gain, keep", [
    (3, 0, True), (0, 2, True), (0, 0, False), (-1, 0, False), (-2, -1, False),
    (-5, 9, False),  # session 18's five-set refit: nine fewer false alarms for five more misses
    (-5, 10, True), (4, -2, True), (3, -2, False)])
def test_the_keep_or_revert_rule_keeps_a_trade_only_when_it_gains_twice_what_it_loses(recall_gain, alarm_gain, keep):
    assert safety.decide(recall_gain, alarm_gain)["keep"] is keep


def test_comparing_two_runs_matches_messages_by_text_across_sets_and_counts_changes():
    before = _run({"held-out": [("a", 1, True), ("b", 1, False), ("c", 0, True), ("d", 0, False)],
                   "crisis_new": [("e", 1, False), ("f", 0, True)]})
    # after a data change the new set's held-out rows are part of the held-out split, and "d" is gone
    after = _run({"held-out": [("A ", 1, True), ("b", 1, True), ("c", 0, False), ("e", 1, True), ("f", 0, True)]})
    result = safety.compare_verdicts(before, after)
    assert result["total"]["before"] == {"caught": 1, "crisis": 3, "false_alarms": 2, "safe": 2}
    assert result["total"]["after"] == {"caught": 3, "crisis": 3, "false_alarms": 1, "safe": 2}
    assert result["sets"]["crisis_new"]["after"]["caught"] == 1 and result["not_in_both"] == 1
    assert sorted(r["text"] for r in result["changed"]) == ["b", "c", "e"]
    assert result["keep"] and result["recall_gain"] == 2 and result["false_alarms_fewer"] == 1
    relabelled = _run({"held-out": [("a", 0, True)]})
    with pytest.raises(ValueError, match="'a' is labelled 1 before and 0 after"):
        safety.compare_verdicts(before, relabelled)
    with pytest.raises(ValueError, match="share no message"):
        safety.compare_verdicts(before, _run({"x": [("zzz", 1, True)]}))


def test_verdicts_of_a_labelled_file_refuse_train_texts_and_the_cli_compares_two_runs(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("positive:\n  explicit: ['tonight is the night i end it, written for this test']\n"
                    "negative:\n  everyday: ['the bins go out on a tuesday, written for this test']\n")
    flag_all = lambda text: safety.Verdict(True, 0.9)  # noqa: E731
    found = safety.crisis_verdicts([mine], check=flag_all)
    assert [(r["label"], r["flag"]) for r in found["sets"]["mine"]] == [(1, True), (0, True)]
    unsure = safety.crisis_verdicts([mine], check=lambda text: safety.Verdict(False, None, "probably not English"))
    assert [r["doubt"] for r in unsure["sets"]["mine"]] == ["probably not English"] * 2  # kept: it shows the notice
    trained = next(r["text"] for r in safety.load_labelled(safety.CRISIS_SETS, "positive") if r["split"] == "train")
    (tmp_path / "fitted.yaml").write_text(json.dumps({"positive": {"explicit": [trained]},
                                                         "negative": {"everyday": ["a new text for this test"]}}))
    with pytest.raises(ValueError, match="fitted.yaml: 1 text.* in the train split"):
        safety.crisis_verdicts([tmp_path / "fitted.yaml"], check=flag_all)
    with pytest.raises(ValueError, match="nothing to measure"):
        safety.crisis_verdicts([], check=flag_all)
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps(found))
    after.write_text(json.dumps(safety.crisis_verdicts([mine], check=lambda t: safety.Verdict("end it" in t, 0.5))))
    assert safety.main(["compare", str(before), str(after), "--out", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    assert "false alarms 1/1 -> 0/1" in printed and printed.strip().endswith("keep: it gains without losing")
    assert json.loads((tmp_path / "cmp.json").read_text())["keep"] is True
    before.write_text("{not json")
    assert safety.main(["compare", str(before), str(after)]) == 2
    assert "before.json: not a `verdicts` file" in capsys.readouterr().err
    before.write_text(json.dumps({"sets": {"mine": [{"text": "a", "label": 1}]}}))
    assert safety.main(["compare", str(before), str(after)]) == 2
    assert "before.json: set 'mine', message 1: expected text, kind, label, flag and fast" in capsys.readouterr().err
    assert safety.main(["compare", str(after), str(after), "--out", str(tmp_path / "no" / "x.json")]) == 2
    assert "the folder" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_the_readme_results_table_is_the_recorded_verdicts():
    """Each row of the README's crisis results table agrees with the per-message verdicts it cites
    (reports/example/safety_verdicts.json, written by `python -m utils.safety verdicts`)."""
    import re

    root = Path(__file__).parents[2]
    sets = json.loads((root / "reports" / "example" / "safety_verdicts.json").read_text())["sets"]
    readme = (root / "docs" / "safety.md").read_text()
    rows = re.findall(r"^  \| (held-out split|\w+) \((\d+)[^)]*\) \| (\d+)/(\d+) \| (\d+)/(\d+) \| (\d+)/(\d+)[^|]* \| "
                      r"\**(\d+)/(\d+)", readme, re.M)
    assert len(rows) == len(sets), [r[0] for r in rows]
    total = np.zeros(8, int)
    for name, size, *counts in rows:
        got = sets["held-out" if name == "held-out split" else f"crisis_{name}"]

        def count(keep):
            picked = [m for m in got if keep(m)]
            return [sum(m["flag"] for m in picked), len(picked)]

        want = (count(lambda m: m["kind"] == "explicit") + count(lambda m: m["kind"] == "implicit")
                + count(lambda m: m["label"] == 1) + count(lambda m: m["label"] == 0))
        assert len(got) == int(size) and [int(c) for c in counts] == want, (name, counts, want)
        total += np.array(want) * (name != "held-out split")
    # and the held-out split by kind, with its intervals, is the recorded evaluation (reports/example/safety.json)
    kinds = re.findall(r"^  \| (\w+) \| (caught|false alarms) \| (\d+)/(\d+) \| (\d+)% \[(\d+), (\d+)\] \|$",
                       readme, re.M)
    recorded = EXAMPLE["crisis_detector"]["by_kind"]
    assert [k[0] for k in kinds] == list(recorded)
    for kind, counted, flagged, n, share, lo, hi in kinds:
        k = recorded[kind]
        assert counted == ("caught" if k["label"] else "false alarms")
        assert (int(flagged), int(n)) == (k["flagged"], k["n"])
        assert [int(share), int(lo), int(hi)] == [round(100 * x) for x in (k["share"], *k["ci95"])], kind
    unseen = re.search(r"the \w+ unseen sets \((\d+)\)\*\* \| \*\*(\d+)/(\d+),.*?\| \*\*(\d+)/(\d+),.*?\| "
                       r"\*\*(\d+)/(\d+),.*?\| \*\*(\d+)/(\d+),", readme)
    assert unseen and int(unseen[1]) == total[[5, 7]].sum() and [int(x) for x in unseen.groups()[1:]] == list(total)

"""Safety, the two cascades (utils/safety/cascade.py): one message decided as the rule says, the screen
asked only when the fast path cannot decide, the probe chosen by cross-validation, the output filter naming
the kind it blocks, and bad input (undecodable, other languages, empty, very long)."""
import numpy as np
import pytest
from safety_cases import TOY

from utils import safety


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

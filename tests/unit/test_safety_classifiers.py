"""Safety, the fast path and its rule (utils/safety/classifiers.py): thresholds that keep the
false-positive rate they promise, the cascade's rule chosen on cross-validated scores (and its budget in a
nested split), and the fast classifier learning a word and round-tripping through its save."""
import numpy as np
from safety_cases import TOY

from utils import safety


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

def test_fast_classifier_learns_a_word_and_round_trips(tmp_path):
    good, bad = TOY
    model = safety.TextClassifier().fit(good + bad, [0] * 18 + [1] * 18)
    p = model.predict_proba(["the dinner was lovely today", "the dinner was awful today"])
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1)
    assert p[1, 1] > 0.6 > 0.4 > p[0, 1]  # generalises to a noun it never saw
    model.save(tmp_path / "saved")
    again = safety.TextClassifier.load(tmp_path / "saved")
    assert np.allclose(again.predict_proba(["the dinner was awful today"]), p[1:], atol=1e-9)

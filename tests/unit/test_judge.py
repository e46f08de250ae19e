"""The judge's machinery on a tiny random Llama (byte tokenizer, plain format): the cached prefix
and chained answer lines give the same grades as full passes, grades are expectations over 1..5,
and pairwise verdicts cancel position."""
import math

import pytest
import torch

from tiny import save_tiny_model
from utils import hardware, judge as J


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("judge") / "llama", "llama")
    return J.LLMJudge(str(path), dtype="fp32")


def full_pass_grades(judge, prompt, reply):
    """Reference: each conversation re-encoded and run from scratch for every line, no cache."""
    def read(ids):
        with torch.inference_mode():
            logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1]
        probs = torch.softmax(logits[judge.grade_ids].float(), -1)
        return float((probs * torch.arange(1, 6)).sum()), int(probs.argmax()) + 1

    coh = judge._coherence_prefix
    out = {}
    out["coherence"], written = read(coh["ids"] + judge._encode(f"Text: {reply}" + coh["tail"] + "Grade: "))
    ids = judge._grade_prefix["ids"] + judge._encode(J.reply_block(prompt, reply) + judge._grade_prefix["tail"]
                                                     + "Coherence: ")
    for c in ("relevance", "overall"):
        ids = ids + judge._encode(f"{written}\n{c.capitalize()}: ")
        out[c], written = read(ids)
    ids = judge._correct_prefix["ids"] + judge._encode(f"{J.reply_block(prompt, reply)}\n{J.CORRECT_QUESTION}"
                                                       + judge._correct_prefix["tail"])
    with torch.inference_mode():
        logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1]
    out["correct"] = float(torch.softmax(logits[judge.verdict_ids].float(), -1)[0])
    return out


def test_cached_prefix_and_chained_lines_equal_full_passes(tiny_judge):
    got = tiny_judge.grade("how are you?", "fine thanks, and you?")
    ref = full_pass_grades(tiny_judge, "how are you?", "fine thanks, and you?")
    for c in ("coherence", "relevance", "correct"):
        assert got[c] == pytest.approx(ref[c], abs=1e-4)
    assert got["overall_rubric"] == pytest.approx(ref["overall"], abs=1e-4)
    # the cached prefix is not changed by use: the same reply grades the same the second time (computed
    # again, past the content cache)
    again = tiny_judge._grade_batch([("how are you?", "fine thanks, and you?")], None)[0]
    assert all(again[c] == pytest.approx(got[c], abs=1e-6) for c in (*J.CRITERIA, "correct"))


def test_replies_graded_together_get_the_grades_each_gets_alone(tiny_judge):
    """Several replies of different lengths in one forward pass (right-padded, padding masked, each
    row at its own positions, the chained answer lines continuing each row): the same grades and
    pairwise probabilities as one at a time, and the same as full passes without any cache."""
    items = [("how are you?", "fine thanks, and you?"), ("what is two and two?", "four"),
             ("name a colour", "blue, or perhaps a deep green like the sea on a grey winter morning"),
             ("say cat", "cat")]
    together = tiny_judge._grade_batch(items, "be kind")
    for (prompt, reply), got in zip(items, together):
        alone = tiny_judge._grade_batch([(prompt, reply)], "be kind")[0]
        for key in (*J.CRITERIA, "correct", "overall_rubric"):
            assert got[key] == pytest.approx(alone[key], abs=1e-4), (reply, key)
    ref = full_pass_grades(tiny_judge, *items[2])  # (no rubric line there: graded without one here)
    plain = tiny_judge._grade_batch(items, None)[2]
    assert plain["relevance"] == pytest.approx(ref["relevance"], abs=1e-4)
    assert plain["correct"] == pytest.approx(ref["correct"], abs=1e-4)
    triples = [(p, r, "no") for p, r in items]
    batched = tiny_judge._prefer_batch(triples)
    assert batched == pytest.approx([tiny_judge._prefer_batch([t])[0] for t in triples], abs=1e-4)


def test_overall_is_the_rubric_grade_kept_with_the_calibrated_probability_of_true_and_safe(tiny_judge):
    g = tiny_judge.grade("what is two and two?", "four")
    q = g["correct_calibrated"]
    assert q == pytest.approx(tiny_judge.calibrated(g["correct"]))
    mixed = [q * p + (1 - q) * (i == 0) for i, p in enumerate(g["overall_rubric_probs"])]
    assert g["overall_probs"] == pytest.approx(mixed, abs=1e-3)
    assert g["overall"] == pytest.approx(1 + q * (g["overall_rubric"] - 1), abs=1e-3)
    assert 1 <= g["overall"] <= g["overall_rubric"] + 1e-9
    # q is the logistic map of the calibration fit, computed here from its two numbers
    cal = tiny_judge.calibration()
    p = min(max(g["correct"], 1e-6), 1 - 1e-6)
    assert q == pytest.approx(1 / (1 + math.exp(-(cal["slope"] * math.log(p / (1 - p)) + cal["intercept"]))))


def test_a_judge_surer_the_answer_is_true_keeps_more_of_the_rubric_grade(tiny_judge, monkeypatch):
    monkeypatch.setattr(tiny_judge, "_calibration", {"slope": 1.5, "intercept": -2.9})  # the shipped judge's fit
    q = [tiny_judge.calibrated(p) for p in (0.1, 0.5, 0.9, 0.99)]
    assert q == sorted(q) and q[0] < 0.01 and q[-1] > 0.9
    assert q[2] == pytest.approx(1 / (1 + math.exp(-(1.5 * math.log(9) - 2.9))))
    grades = {**{f"{c}_probs": [0.0, 0.0, 0.0, 0.0, 1.0] for c in J.CRITERIA}, **{c: 5.0 for c in J.CRITERIA}}
    sure, unsure = tiny_judge._with_correctness(grades, 0.99), tiny_judge._with_correctness(grades, 0.5)
    assert 1 < unsure["overall"] < sure["overall"] < 5 and sure["overall_rubric"] == unsure["overall_rubric"] == 5


class ScriptedJudge:
    """Stands in for the judge in the calibration fit: P(Yes) given per answer, calls counted."""

    def __init__(self, p_of):
        self.p_of, self.calls = p_of, 0
        self.info, self.dtype, self.fmt = {"weights": "scripted"}, "fp32", "plain"

    def correct_many(self, pairs):
        self.calls += len(pairs)
        return [self.p_of(prompt, reply) for prompt, reply in pairs]


def test_calibration_is_fitted_once_and_follows_the_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_COMPARE_CACHE", str(tmp_path))
    rows = J.calibration_set()
    label = {(q, a): y for q, a, y in rows}
    # a judge that tells right from wrong, with some overlap so the fit is finite
    informative = ScriptedJudge(lambda q, a: (0.8 if label[(q, a)] else 0.7) + 0.15 * (len(a) % 2))
    informative.info = {"gguf_sha256": "ab" * 32}  # weights known by content: the fit goes to disk
    fit = J._calibration(informative)
    assert informative.calls == len(rows) and fit["slope"] > 0 and fit["n"] == len(rows)
    assert len(list((tmp_path / "judge").glob("correctness-*.json"))) == 1
    monkeypatch.setattr(J, "_FITS", {})  # a new process: read from the file, not asked again
    again = ScriptedJudge(lambda q, a: 0.5)
    again.info = informative.info
    assert J._calibration(again) == fit and again.calls == 0
    # a judge whose "Yes" goes the wrong way gets slope 0: the check cannot reorder replies
    backwards = ScriptedJudge(lambda q, a: (0.3 if label[(q, a)] else 0.9) + 0.05 * (len(a) % 3))
    backwards.info = {"weights": "backwards"}
    flat = J._calibration(backwards)
    assert flat["slope"] == 0 and flat["intercept"] == pytest.approx(math.log(2))  # two true answers per wrong one
    assert J._calibration(backwards) is flat and backwards.calls == len(rows)  # once per process, not on disk
    assert len(list((tmp_path / "judge").glob("correctness-*.json"))) == 1


def test_calibration_set_is_labelled_and_on_its_own_topics():
    from utils import evaluation, validity

    rows = J.calibration_set()
    assert len(rows) >= 45 and {y for *_, y in rows} == {0, 1}
    prompts = {q for q, *_ in rows}
    seen = ({r["prompt"] for r in validity.ladder()} | {it["prompt"] for it in evaluation.load_domain_suite()}
            | {q for q, *_ in J.EXAMPLES} | {q for q, *_ in J.CORRECT_EXAMPLES})
    assert not prompts & seen
    assert {v for *_, v in J.CORRECT_EXAMPLES} == {"Yes", "No"}


def test_a_damaged_calibration_set_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "cal.yaml"
    bad.write_text("items:\n- prompt: q\n  good: a\n")
    with pytest.raises(J.JudgeError, match=r"cal.yaml: items\[0\] needs non-empty text"):
        J.calibration_set(bad)


def test_grade_is_the_expectation_over_the_five_grades(tiny_judge):
    g = tiny_judge.grade("say cat", "cat cat cat", note="be brief")
    for c in J.CRITERIA:
        probs = g[f"{c}_probs"]
        assert sum(probs) == pytest.approx(1, abs=1e-3)
        assert g[c] == pytest.approx(sum((i + 1) * p for i, p in enumerate(probs)), abs=1e-3)
        assert 1 <= g[c] <= 5
    assert g["judge_seconds"] > 0
    assert tiny_judge.timing_summary()["grade"]["calls"] >= 1


def test_note_goes_into_the_instructions_and_nothing_sits_between_question_and_answer(tiny_judge):
    # an extra line between question and answer made the real judge grade that line (an echoed
    # question: 1.1 -> 4.3 of 5); the note goes into the instructions, in a prefix of its own
    assert J.reply_block("q?", "a.") == "Question: q?\nAnswer: a."
    with_note = tiny_judge._grade_prefix_for("be kind")
    assert with_note is tiny_judge._grade_prefix_for("be kind")  # computed once per note
    assert tiny_judge._grade_prefix_for(None) is tiny_judge._grade_prefix
    text = tiny_judge.tokenizer.decode(with_note["ids"])
    assert f"{J.NOTE_LEAD} be kind" in text and "be kind" not in tiny_judge.tokenizer.decode(
        tiny_judge._grade_prefix["ids"])
    assert text.index("be kind") < text.index(J.EXAMPLES[0][0])  # before the examples
    assert J.pair_block("q?", "a.", "b.") == "User message: q?\n\nReply A: a.\n\nReply B: b.\n\n"
    plain, kind = tiny_judge.grade("say cat", "cat cat"), tiny_judge.grade("say cat", "cat cat", note="be kind")
    assert plain["coherence"] == kind["coherence"]  # the note reaches relevance and overall only
    assert (plain["relevance"], plain["overall"]) != (kind["relevance"], kind["overall"])


def test_examples_are_on_prompts_outside_the_ladder_and_the_suite():
    from utils import evaluation, validity

    seen = {r["prompt"] for r in validity.ladder()} | {it["prompt"] for it in evaluation.load_domain_suite()}
    assert not seen & {q for q, *_ in J.EXAMPLES}
    assert all(1 <= g <= 5 for _, _, *grades in J.EXAMPLES for g in grades)
    # the coherence pass's examples: none is a ladder or suite reply (nor those replies' words rearranged)
    words = {tuple(sorted(r["reply"].split())) for r in validity.ladder() if r["reply"]}
    assert not words & {tuple(sorted(t.split())) for t, _ in J.COHERENCE_EXAMPLES}
    assert {g for _, g in J.COHERENCE_EXAMPLES} == {1, 5}


def test_empty_reply_gets_one_without_asking(tiny_judge):
    before = tiny_judge.timing["grade"].calls
    g = tiny_judge.grade("say cat", "   ")
    assert all(g[c] == 1.0 for c in J.CRITERIA)
    assert tiny_judge.timing["grade"].calls == before


def test_pairwise_cancels_position(tiny_judge):
    ab = tiny_judge.compare("say dog", "dog dog", "cat")
    ba = tiny_judge.compare("say dog", "cat", "dog dog")
    assert ab["p_a"] == pytest.approx(1 - ba["p_a"], abs=1e-6)
    assert {ab["verdict"], ba["verdict"]} in ({"A", "B"}, {"tie"})


def test_pairwise_verdicts_run_in_fp32_where_the_grades_run_in_bf16(tiny_judge):
    """bf16 turned real verdicts into ties on the ladder, so a bf16 judge compares with an fp32 copy
    of itself, loaded on the first comparison: its verdicts are the fp32 judge's, its grades its own."""
    judge = J.LLMJudge(tiny_judge.name, dtype="bf16")
    assert judge.pair_dtype == "fp32" and judge.info["pair_dtype"] == "fp32" and judge._pair_model is None
    assert next(judge.model.parameters()).dtype == torch.bfloat16
    got, want = judge.compare("say dog", "dog dog", "cat"), tiny_judge.compare("say dog", "dog dog", "cat")
    assert next(judge._pair_model.parameters()).dtype == torch.float32
    assert next(judge.model.parameters()).dtype == torch.bfloat16  # the grades stay in bf16
    assert got["p_a_shown_first"] == pytest.approx(want["p_a_shown_first"], abs=1e-6)
    assert got["p_a_shown_second"] == pytest.approx(want["p_a_shown_second"], abs=1e-6)
    # the validity cache knows the difference; an fp32 judge compares with itself
    assert judge.fingerprint() != tiny_judge.fingerprint() and tiny_judge._pair_model is tiny_judge.model


def test_verdict_needs_both_orders_to_agree(tiny_judge, monkeypatch):
    # prefer_many gets (q, a, b) then (q, b, a): the probability that the reply shown first is better
    monkeypatch.setattr(tiny_judge, "prefer_many", lambda items: [0.8, 0.3])  # A wins in both orders
    assert tiny_judge.compare("q", "a", "b")["verdict"] == "A"
    # whichever is shown first wins: position bias, no verdict
    monkeypatch.setattr(tiny_judge, "prefer_many", lambda items: [0.8, 0.6])
    out = tiny_judge.compare("q", "a", "b")
    assert out["verdict"] == "tie" and out["p_a"] == pytest.approx(0.6)


def test_bf16_judge_stays_close_to_fp32(tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama")
    fp32 = J.LLMJudge(str(path), dtype="fp32").grade("say cat", "cat cat")
    bf16 = J.LLMJudge(str(path), dtype="bf16")
    assert bf16.dtype == "bf16" and bf16.info["dtype"] == "bf16"
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got = bf16.grade("say cat", "cat cat")
    for c in J.CRITERIA:
        assert got[c] == pytest.approx(fp32[c], abs=0.25)


def test_fingerprint_changes_with_what_the_answers_depend_on(tiny_judge, monkeypatch):
    before = tiny_judge.fingerprint()
    monkeypatch.setattr(J, "SYSTEM", J.SYSTEM + " Be strict.")
    assert tiny_judge.fingerprint() != before


def test_dtype_choice_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert hardware.pick_dtype("auto", "judge") == "fp32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "avx512_bf16"}))
    assert hardware.pick_dtype("auto", "inference") == "bf16"
    assert hardware.pick_dtype("fp32") == "fp32"
    with pytest.raises(ValueError, match="dtype='fp16' for judge; expected one of"):
        hardware.pick_dtype("fp16", "judge")


def test_coherence_is_graded_on_the_reply_alone(tiny_judge):
    a = tiny_judge.grade("say cat", "cat cat cat")
    b = tiny_judge.grade("tell me about the weather in a long sentence", "cat cat cat", note="sunny")
    assert a["coherence"] == b["coherence"] and a["coherence_probs"] == b["coherence_probs"]
    assert (a["relevance"], a["overall"]) != (b["relevance"], b["overall"])  # the question reaches the other two


@pytest.mark.parametrize("text,judged", [
    ("Drink a glass with each meal. Keep a bottle on your desk so that", "Drink a glass with each meal."),
    ('He said "stop." Then he', 'He said "stop."'),
    ("Use 2.5 cups of flour. Then", "Use 2.5 cups of flour."),
    ("Two steps:\n\n1. Rinse it", "Two steps:\n\n1. Rinse it"),  # "1." is a list marker, not a sentence end
    ("Intro. Steps:\n\n1. Rinse it", "Intro."),
    ("no sentence ends here", "no sentence ends here"),
])
def test_a_cut_reply_is_judged_up_to_its_last_complete_sentence(text, judged):
    assert J.complete_part(text) == judged


def test_the_scorer_shows_the_judge_only_the_complete_part_of_a_truncated_reply():
    from utils.metrics import Scorer

    seen = []

    class Recorder:
        def grade(self, prompt, reply, reference=None, note=None):
            seen.append(reply)
            return {"overall": 3.0}

    rows = Scorer(None, Recorder()).score(["q", "q"], ["Done. And th", "Done. And th"], truncated=[True, False])
    assert seen == ["Done.", "Done. And th"]
    assert [r["truncated"] for r in rows] == [True, False] and rows[0]["words"] == 3  # the cheap signals see it all


def test_each_pass_keeps_its_own_instructions_in_the_plain_format(tiny_judge):
    # a model without a chat template has no system role: each prefix's own instructions go in
    # front of its first turn (the coherence and pairwise passes once got the grading instructions,
    # and the pairwise pass, which has no example turns, none at all)
    assert tiny_judge.fmt == "plain"
    decode = tiny_judge.tokenizer.decode
    assert J.COHERENCE_SYSTEM[:60] in decode(tiny_judge._coherence_prefix["ids"])
    assert J.SYSTEM[:60] not in decode(tiny_judge._coherence_prefix["ids"])
    assert J.PAIR_SYSTEM[:60] in decode(tiny_judge._pair_prefix["ids"])
    assert J.SYSTEM[:60] in decode(tiny_judge._grade_prefix["ids"])


def test_ask_is_one_pass_on_the_kept_prefix_and_reuses_it_unchanged(tiny_judge):
    """``ask`` (the safety screen's question): P(Yes) against P(No) after the instructions, the
    text and the question; equal to a full pass without the cached prefix, and the same twice."""
    yes, no = (tiny_judge._encode(c)[0] for c in "YN")  # byte tokens stand in for "Yes" and "No"
    tiny_judge._yes_no = [yes, no]
    system, text, question = "You screen messages.", "i want to go home", "Flag it? Answer Yes or No."
    got = tiny_judge.ask(system, text, question)
    prefix = tiny_judge._ask_prefixes[system]
    ids = prefix["ids"] + tiny_judge._encode(f"Message: {text}\n\n{question}" + prefix["tail"])
    with torch.inference_mode():
        logits = tiny_judge.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert got == pytest.approx(float(torch.softmax(logits[[yes, no]].float(), -1)[0]), abs=1e-4)
    assert 0 < got < 1 and tiny_judge.ask(system, text, question) == pytest.approx(got, abs=1e-6)
    assert tiny_judge.ask(system, "something else entirely", question) != pytest.approx(got, abs=1e-6)


def test_ask_refuses_a_judge_whose_yes_is_not_one_token(tmp_path):
    judge = J.LLMJudge(str(save_tiny_model(tmp_path / "llama", "llama")), dtype="fp32")
    with pytest.raises(J.JudgeError, match="'Yes' is not a single token"):
        judge.ask("You screen messages.", "hello", "Flag it?")


def test_the_validity_cache_entry_changes_with_the_code_that_formats_grades_and_counts(monkeypatch):
    from utils import validity

    class Fingerprinted:
        def fingerprint(self):
            return "judge"

    base = validity.validity_key(Fingerprinted())
    real = validity.code_key
    for changed in ("chat.py", "judge.py", "validity.py"):
        monkeypatch.setattr(validity, "code_key", lambda path, c=changed: real(path) + (b"x" if path.name == c
                                                                                          else b""))
        assert validity.validity_key(Fingerprinted()) != base, changed
    monkeypatch.setattr(validity, "code_key", lambda path: real(path) + (b"x" if path.name == "models.py" else b""))
    assert validity.validity_key(Fingerprinted()) == base  # a file it does not read
    monkeypatch.setattr(validity, "code_key", real)
    assert validity.validity_key(Fingerprinted(), notes=True) != base


def test_the_validity_cache_key_ignores_comments_and_docstrings_but_not_code(tmp_path):
    from utils import validity

    def key(src):
        path = tmp_path / "m.py"
        path.write_text(src)
        return validity.code_key(path)

    base = key('"""Module."""\nX = 1\n\n\ndef f(a):\n    """Doc."""\n    return a + X\n')
    assert key('"""Other words."""\nX = 1  # a comment\n\n\ndef f(a):\n    """More."""\n    return a + X\n') == base
    assert key('X = 1\n\n\ndef f(a):\n    return a + X\n') == base
    assert key('"""Module."""\nX = 2\n\n\ndef f(a):\n    """Doc."""\n    return a + X\n') != base
    assert key('"""Module."""\nX = 1\n\n\ndef f(a):\n    """Doc."""\n    return "a" + X\n') != base


def test_two_threads_asking_for_the_shared_judge_at_once_load_it_once(monkeypatch):
    # the dashboard loads the safety screen's judge in a background thread while a page may ask for the
    # grader: the second caller waits for the first one's judge instead of loading a second copy
    import threading
    import time as clock

    made = []

    class SlowJudge:
        def __init__(self, model, dtype):
            clock.sleep(0.3)  # a load long enough for the other thread to ask meanwhile
            made.append((model, dtype))

    monkeypatch.setattr(J, "LLMJudge", SlowJudge)
    J._shared.cache_clear()
    try:
        got = []
        threads = [threading.Thread(target=lambda: got.append(J.shared("some-judge", "fp32"))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert made == [("some-judge", "fp32")] and len(got) == 3 and got[0] is got[1] is got[2]
    finally:
        J._shared.cache_clear()

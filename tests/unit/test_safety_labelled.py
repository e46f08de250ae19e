"""Safety, the labelled sets (utils/safety/labelled.py): their size and kinds, the fixed split by a hash
of each text, one file per text, near-copies refused across the split, the sets measured as unseen sharing
no text with those fitted on, and the rows a labelled file of your own is measured on."""
import pytest

from utils import safety


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
        # the categories a user expects the filter to cover, each with its examples
        "weapons_explosives", "poisons_dangerous_chemistry", "self_harm", "illegal_drugs", "sexual_content_minors",
    }
    assert {r["kind"] for r in replies if not r["label"]} >= {"supportive_distress", "safe_on_dangerous_topics"}
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


EXTRA_CRISIS_SETS = sorted(p.relative_to(safety.SAFETY_DATA).as_posix()
                           for p in safety.SAFETY_DATA.glob("*/crisis_*.yaml") if p != safety.CRISIS_DATA)


def test_every_crisis_set_in_the_folder_is_checked_for_shared_texts():
    assert len(EXTRA_CRISIS_SETS) >= 17 and "unseen/crisis_dementia_carers_scams.yaml" in EXTRA_CRISIS_SETS


def test_the_sets_fitted_on_are_in_fitted_and_the_others_in_unseen():
    """data/eval/safety/fitted/ holds exactly the sets the classifiers are fitted on; unseen/ only sets measured on."""
    folders = {p.parent.name for p in safety.SAFETY_DATA.glob("*/*.yaml")}
    assert folders == {"fitted", "unseen"} and not list(safety.SAFETY_DATA.glob("*.yaml"))
    assert sorted(safety.SAFETY_DATA.glob("fitted/*.yaml")) == sorted(safety.CRISIS_SETS + safety.REPLY_SETS)


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
    for other in S.SAFETY_DATA.glob("*/crisis_*.yaml"):
        if other not in (S.SAFETY_DATA / name, S.CRISIS_DATA):
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


@pytest.mark.parametrize("name", ["fitted/unsafe_replies_petty_crime.yaml", "unseen/unsafe_replies_home_family.yaml"])
def test_each_held_out_reply_set_shares_no_text_with_the_reply_data_or_another(name):
    from utils import safety as S

    def norm(rows):
        return {" ".join(r["text"].lower().split()) for r in rows}

    fresh = S.load_labelled(S.SAFETY_DATA / name, "unsafe")
    assert len(fresh) >= 40 and {r["label"] for r in fresh} == {0, 1}
    assert {r["kind"] for r in fresh} == {r["kind"] for r in S.load_labelled(S.REPLY_DATA, "unsafe")}
    assert not norm(fresh) & norm(S.load_labelled(S.REPLY_DATA, "unsafe"))
    for other in S.SAFETY_DATA.glob("*/unsafe_replies_*.yaml"):
        if other != S.SAFETY_DATA / name:
            assert not norm(fresh) & norm(S.load_labelled(other, "unsafe")), other.name

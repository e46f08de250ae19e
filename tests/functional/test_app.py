"""The dashboard through streamlit.testing.v1.AppTest, on tiny random models (real generation)."""
import json
import threading

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tiny import save_tiny_model, write_splits
from utils import serving, training
from utils.training import TrainConfig

pytestmark = pytest.mark.slow
APP = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "streamlit_app.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    data = write_splits(root / "data")
    base = save_tiny_model(root / "tiny-llama", "llama")
    models_dir = root / "models"
    # trained until the adapter's greedy replies differ from the base model's (a mix-up of the two
    # in concurrent sessions must show in their outputs)
    training.train(TrainConfig(model=str(base), data_dir=str(data), output_dir=str(models_dir / "tiny-lora"),
                               load_in_8bit=False, max_steps=30, eval_steps=10, save_steps=10, batch_size=4,
                               learning_rate=3e-2, lora_dropout=0.0), log=lambda *a: None)
    return {"root": root, "data": data, "base": base, "models": models_dir}


@pytest.fixture
def app(world, monkeypatch, tmp_path):
    def make(models_dir=None, data_dir=None, reports_dir=None, screen=False):
        monkeypatch.setenv("LORA_COMPARE_MODELS_DIR", str(models_dir or world["models"]))
        monkeypatch.setenv("LORA_COMPARE_DATA_DIR", str(data_dir or world["data"]))
        monkeypatch.setenv("LORA_COMPARE_REPORTS_DIR", str(reports_dir or tmp_path / "reports"))
        monkeypatch.setenv("LORA_COMPARE_RATINGS_DB", str(tmp_path / "ratings.sqlite"))
        monkeypatch.setenv("LORA_COMPARE_BASES", str(world["base"]))
        monkeypatch.setenv("LORA_COMPARE_JUDGE", str(world["base"]))  # the tiny model stands in for the judge
        # the safety classifiers without their LLM screen (tested in tests/unit/test_safety_cascade.py): loading
        # the 1.5B judge would only slow these tests of how the dashboard draws what they decide
        # (test_the_default_screen_decides_the_help_notice below runs the default set-up, screen and all)
        if screen:
            monkeypatch.delenv("LORA_COMPARE_SAFETY_SCREEN", raising=False)
        else:
            monkeypatch.setenv("LORA_COMPARE_SAFETY_SCREEN", "none")
        st.cache_resource.clear()
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        assert not at.exception, at.exception
        return at

    return make


def _texts(at):
    return " ".join(str(m.value) for m in at.markdown) + " ".join(str(c.value) for c in at.caption)


def test_compare_page_generates_both_sides_for_real(app):
    at = app()
    assert "Research demo" in _texts(at)
    assert [s.label for s in at.selectbox] == ["Model A", "Model B"]
    assert "LoRA" in at.selectbox(key="model_a").value
    at.text_area(key="prompt").input("say cat 3")
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert labels.count("latency") == 2 and labels.count("tokens/s") == 2 and labels.count("words") == 2
    assert any(h.value.startswith("A:") for h in at.subheader) and any(h.value.startswith("B:") for h in at.subheader)


def test_validation_prompt_shows_reference_and_scores(app):
    at = app()
    at.toggle(key="use_val").set_value(True).run()
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    assert any(h.value == "Reference answer" for h in at.subheader)
    # without the judge: the reference metrics only
    assert list(at.dataframe[0].value.columns) == ["model", "words", "ROUGE-L", "similarity to reference"]
    at.toggle(key="grade").set_value(True).run()
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table.columns) == ["model", "overall /5", "relevance /5", "coherence /5", "true and safe (judge's P)",
                                   "words", "ROUGE-L", "similarity to reference"] and len(table) == 2
    assert table["overall /5"].between(1, 5).all() and table["true and safe (judge's P)"].between(0, 1).all()


def test_no_adapters_and_no_data(app, tmp_path):
    at = app(models_dir=tmp_path / "empty-models", data_dir=tmp_path / "no-data")
    assert any("No fine-tuned adapters yet" in i.value for i in at.info)
    assert at.toggle(key="use_val").disabled
    assert "no processed data" in _texts(at)


def test_the_engine_is_llama_cpp_by_default_only_where_both_models_are_gguf_presets(app, monkeypatch, tmp_path):
    from utils import engine

    engine.check_engine("llama.cpp")  # installed by `make venv`: the default below needs it
    at = app(models_dir=tmp_path / "empty-models")  # the tiny folder model on both sides: torch
    assert at.radio(key="engine").value == "torch"
    # two shipped GGUF presets (nothing is loaded until Generate): llama.cpp, which needs no conversion
    monkeypatch.setenv("LORA_COMPARE_BASES", "smollm2-135m,gemma3-270m")
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert at.radio(key="engine").value == "llama.cpp" and at.radio(key="engine").options == ["torch", "llama.cpp"]
    # one of them a folder: torch for both
    monkeypatch.setenv("LORA_COMPARE_BASES", f"smollm2-135m,{tmp_path / 'empty-models'}")
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert at.radio(key="engine").value == "torch"


def test_the_page_is_usable_while_the_safety_models_load_and_a_message_waits_for_them(app, monkeypatch):
    # the safety classifiers and their judge load in a background thread from the first page on (on a
    # brand-new machine the judge is converted first, minutes): the page does not wait; Generate does
    import threading

    from utils import safety

    release, finished, real_preload = threading.Event(), [], safety.preload

    def held_preload():
        release.wait(60)  # held until the test lets it go
        real_preload()
        finished.append(True)

    monkeypatch.setattr(safety, "preload", held_preload)
    at = app()
    assert not finished, "the page waited for the safety models"
    assert [s.label for s in at.selectbox] == ["Model A", "Model B"]  # usable at once
    at.text_area(key="prompt").input("say cat 3")
    threading.Timer(2, release.set).start()  # the load ends while Generate is waiting for it
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    assert finished, "a message was screened before the safety models were loaded"
    assert [m.label for m in at.metric].count("tokens/s") == 2


def test_empty_prompt_gets_a_message(app):
    at = app()
    at.text_area(key="prompt").input("")  # the page opens with the write-up's prompt in the box
    at.button(key="generate").click().run()
    assert any("prompt is empty" in w.value for w in at.warning)


def test_arena_vote_is_stored_and_leaderboard_shown(app, world, tmp_path, monkeypatch):
    from utils.judge import LLMJudge

    graded = {}  # what the judge returned for each (prompt, reply) the page had it grade
    real = LLMJudge.grade_many

    def spy(self, items, progress=None):
        out = real(self, items, progress)
        graded.update({tuple(item[:2]): grade for item, grade in zip(items, out)})
        return out

    monkeypatch.setattr(LLMJudge, "grade_many", spy)
    at = app()
    at.sidebar.radio(key="page").set_value("Blind arena").run()
    at.text_area(key="arena_prompt").input("say dog 2")
    at.button(key="arena_generate").click().run()
    assert not at.exception, at.exception
    assert [h.value for h in at.subheader][:2] == ["Model A", "Model B"]
    at.button(key="vote_tie").click().run()
    assert not at.exception, at.exception
    from utils.ratings import RatingStore

    votes = RatingStore(tmp_path / "ratings.sqlite").votes()
    assert len(votes) == 1 and votes[0]["vote"] == "tie" and votes[0]["auto_relevance_a"] is not None
    # the stored grades are those the judge gave each reply, each under its own letter
    vote = votes[0]
    for side in "ab":
        grades = graded[(vote["prompt"], vote[f"output_{side}"])]
        assert vote[f"auto_relevance_{side}"] == pytest.approx(grades["relevance"], abs=1e-9)
        assert vote[f"auto_coherence_{side}"] == pytest.approx(grades["coherence"], abs=1e-9)
    assert any("Leaderboard (1 votes)" in h.value for h in at.subheader)


def test_reports_page_lists_runs(app, tmp_path):
    at = app()
    at.sidebar.radio(key="page").set_value("Reports").run()
    assert any("No reports" in i.value for i in at.info)
    run = tmp_path / "reports" / "20260101-000000"
    run.mkdir(parents=True)
    ci = {"mean": 3.0, "low": 2.5, "high": 3.5, "n": 4}
    (run / "metrics.json").write_text(json.dumps({
        "latency": {"m · fp32 base": {"avg_s": 1.0, "median_s": 0.9, "ci_low": 0.8, "ci_high": 1.2, "n": 6,
                                      "roofline_fraction": 0.5}},
        "response": {"m (LoRA)": {"avg_len_words": ci, "overall": ci, "coherence": ci, "relevance": ci}},
        "verdicts": ["m (LoRA) vs m (base): the judge prefers m (LoRA)."],
        "trainable_params": {"m": {"trainable": 10, "total": 1000, "percent": 1.0}}}))
    at = app(reports_dir=tmp_path / "reports")
    at.sidebar.radio(key="page").set_value("Reports").run()
    assert not at.exception, at.exception
    assert [h.value for h in at.subheader] == ["Latency", "Response quality", "Trainable parameters"]
    assert "the judge prefers m (LoRA)" in " ".join(m.value for m in at.markdown)
    assert at.dataframe[1].value["Overall /5"][0] == "3.00 [2.50, 3.50]"


def test_concurrent_sessions_match_sequential_outputs(world):
    pool = serving.ModelPool(capacity=2, models_dir=world["models"])
    choices = serving.available_choices(world["models"], (str(world["base"]),))
    assert len(choices) == 2
    prompts = [[{"role": "user", "content": f"say cat {i}"}] for i in range(4)]
    sequential = [[serving.generate_reply(pool.get(c), p, max_new_tokens=8)[0] for p in prompts] for c in choices]
    assert all(a != b for a, b in zip(*sequential)), sequential  # base and adapter answer differently
    results = {}

    def session(k, choice):
        results[k] = [serving.generate_reply(pool.get(choice), p, max_new_tokens=8)[0] for p in prompts]

    threads = [threading.Thread(target=session, args=(k, c)) for k, c in enumerate(choices * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[k] for k in range(4)] == sequential * 2
    assert len(pool.loaded_keys()) == 2


def test_pool_is_bounded_and_refuses_outside_paths(world, tmp_path):
    pool = serving.ModelPool(capacity=1, models_dir=world["models"])
    a, b = serving.available_choices(world["models"], (str(world["base"]),))
    pool.get(a)
    pool.get(b)
    assert pool.loaded_keys() == [(b.model, b.adapter, b.engine)]
    outside = serving.Choice("x", str(world["base"]), str(tmp_path))
    with pytest.raises(serving.ChoiceError, match="is outside"):
        pool.get(outside)


def test_streamed_token_count_and_long_prompt_notice(world):
    pool = serving.ModelPool(capacity=1, models_dir=world["models"])
    entry = pool.get(serving.Choice("base", str(world["base"])))
    text, stats = serving.generate_reply(entry, [{"role": "user", "content": "hi"}], max_new_tokens=7)
    assert 1 <= stats.new_tokens <= 7 and not stats.truncated
    long = [{"role": "user", "content": "word " * 400}]
    text, stats = serving.generate_reply(entry, long, max_new_tokens=4, max_prompt_tokens=100)
    assert stats.truncated and stats.prompt_tokens == 100


@pytest.mark.parametrize("prompt", [
    "   ", "\x00\x07 control \x1b[31m characters \x7f", "x" * 3000, "supercalifragilistic" * 50,
    "Привет, как дела? 你好吗？ مرحبا", "🙂🚀🔥 emoji only 👍🏽",
], ids=["whitespace", "control", "very-long-prompt", "long-single-token", "non-latin", "emoji"])
def test_odd_prompts_get_a_reply_not_a_crash(world, prompt):
    pool = serving.ModelPool(capacity=1, models_dir=world["models"])
    entry = pool.get(serving.Choice("base", str(world["base"])))
    text, stats = serving.generate_reply(entry, [{"role": "user", "content": prompt}], max_new_tokens=6,
                                         max_prompt_tokens=256)
    assert isinstance(text, str) and stats.new_tokens >= 1
    assert stats.truncated == (len(prompt.encode()) > 240)  # the byte tokenizer: one token per byte


def test_eight_concurrent_sessions_generate_like_sequential_with_bounded_memory(world):
    from concurrent.futures import ThreadPoolExecutor

    from utils.system import MemorySampler

    pool = serving.ModelPool(capacity=2, models_dir=world["models"])
    choices = serving.available_choices(world["models"], (str(world["base"]),))
    prompts = [[{"role": "user", "content": f"say {w} {i}"}] for i, w in enumerate(["cat", "dog", "sun"])]
    expected = {c: [serving.generate_reply(pool.get(c), p, max_new_tokens=8)[0] for p in prompts] for c in choices}
    assert all(a != b for a, b in zip(*expected.values())), expected  # a mix-up would show

    def session(k):
        choice = choices[k % len(choices)]
        return choice, [serving.generate_reply(pool.get(choice), p, max_new_tokens=8)[0] for p in prompts]

    # resident memory sampled while the sessions run (the process's lifetime peak would include
    # whatever earlier tests in this pytest process did)
    with MemorySampler(interval=0.01) as memory, ThreadPoolExecutor(max_workers=8) as ex:
        results = list(ex.map(session, range(8)))
    assert all(outs == expected[choice] for choice, outs in results)
    assert len(pool.loaded_keys()) <= 2
    print(f"resident memory grew by {memory.grown_mb:.1f} MB over 8 concurrent sessions")
    assert memory.grown_mb < 500


def test_the_real_output_filter_blocks_a_harmful_reply_on_the_compare_page(app, monkeypatch):
    """Model A's reply is swapped for a harmful one after a real generation (a tiny model cannot
    be made to say it); the real classifier and word list decide, model B's reply is shown."""
    real = serving.stream_reply
    calls = []

    def stream(entry, messages, stats, **kw):
        text = "".join(real(entry, messages, stats, **kw))  # real generation fills the statistics
        calls.append(text)
        yield "Honestly, you should hurt yourself, nobody would care." if len(calls) % 2 == 1 else text

    monkeypatch.setattr(serving, "stream_reply", stream)
    at = app()
    at.text_area(key="prompt").input("say cat 3")
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    blocked = [e.value for e in at.error if "blocked by the output filter" in e.value]
    # the kind the classifier names: telling the reader to hurt themselves is self-harm encouragement
    # (the filter fitted before session 12 called it harassment); the word list names its match
    assert len(blocked) == 1 and "self harm encouragement" in blocked[0] and "you should hurt yourself" in blocked[0]
    assert "nobody would care" not in _texts(at)
    assert calls[1].strip() and calls[1].strip() in _texts(at)  # the other side is shown as generated


def test_a_crisis_message_gets_the_help_notice(app):
    from utils import safety

    at = app()
    at.text_area(key="prompt").input("I want to end my life tonight.")
    at.button(key="generate").click().run()
    assert not at.exception, at.exception
    assert safety.HELP_NOTICE in [w.value for w in at.warning]


def test_arena_keeps_a_blocked_reply_blocked_on_every_rerun(app):
    """The real filter (configs/safety.yaml) on a stored arena reply: blocked when drawn after the
    generation, and still blocked after the user touches a widget (each rerun redraws the replies)."""
    at = app()
    at.sidebar.radio(key="page").set_value("Blind arena").run()
    at.text_area(key="arena_prompt").input("say dog 2")
    at.button(key="arena_generate").click().run()
    assert not at.exception, at.exception
    unsafe = "Honestly, you should hurt yourself, nobody would care."
    duel = dict(at.session_state["arena"])
    duel["outputs"] = [unsafe, duel["outputs"][1]]
    at.session_state["arena"] = duel
    for touch in (lambda: at.checkbox(key="arena_rate").check(), lambda: at.checkbox(key="arena_rate").uncheck(),
                  lambda: at.text_area(key="arena_prompt").input("something else")):
        touch()
        at.run()
        assert not at.exception, at.exception
        blocked = [e.value for e in at.error if "blocked by the output filter" in e.value]
        assert len(blocked) == 1 and "you should hurt yourself" in blocked[0]
        assert "nobody would care" not in _texts(at)


def test_symlink_escaping_models_dir_and_missing_adapter_config_are_refused(world, tmp_path):
    import shutil

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    outside = tmp_path / "outside-lora"
    shutil.copytree(world["models"] / "tiny-lora", outside)
    (models_dir / "sneaky").symlink_to(outside, target_is_directory=True)
    with pytest.raises(serving.ChoiceError, match="is outside"):
        serving.check_adapter_path(models_dir / "sneaky", models_dir)
    assert serving.trained_adapters(models_dir) == []  # not even offered
    broken = models_dir / "broken"
    shutil.copytree(world["models"] / "tiny-lora", broken)
    (broken / "final" / "adapter_config.json").unlink()
    with pytest.raises(serving.ChoiceError, match="has no final/adapter_config.json"):
        serving.check_adapter_path(broken, models_dir)


def test_concurrent_sampled_generations_are_reproducible_from_their_seeds(world):
    """Sampling uses torch's global generator: two models sampling at once must not share draws."""
    from concurrent.futures import ThreadPoolExecutor

    pool = serving.ModelPool(capacity=2, models_dir=world["models"])
    choices = serving.available_choices(world["models"], (str(world["base"]),))
    jobs = [(choices[k % 2], seed) for k, seed in enumerate([1, 2, 3, 4, 5, 6, 7, 8])]

    def reply(job):
        choice, seed = job
        return serving.generate_reply(pool.get(choice), [{"role": "user", "content": "say sun 9"}], max_new_tokens=24,
                                      do_sample=True, temperature=1.5, top_p=1.0, seed=seed)[0]

    sequential = [reply(j) for j in jobs]
    assert len(set(sequential)) > 1  # the seeds matter, so a mix-up would show
    with ThreadPoolExecutor(max_workers=8) as ex:
        assert list(ex.map(reply, jobs)) == sequential


def test_an_ordinary_message_and_its_replies_get_no_help_notice(app):
    """Was a known defect (session 12): the detector flagged short greetings and commands and the tiny test
    model's token salad, since no data set held short messages; fixed by crisis_short.yaml (session 13)."""
    from utils import safety

    at = app()
    for prompt in ("How long should I boil an egg if I want the yolk runny?", "say cat 3", "hello"):
        at.text_area(key="prompt").input(prompt)
        at.button(key="generate").click().run()
        assert not at.exception, at.exception
        assert safety.HELP_NOTICE not in [w.value for w in at.warning], prompt


def test_the_default_screen_decides_the_help_notice(app):
    """The dashboard's default set-up end to end: the crisis detector with its LLM screen (the 1.5B judge).
    The first held-out messages (the safety data's test split) that the fast path cannot decide, so that it
    asks the screen: for each, the page shows the help notice exactly when the screened verdict says so."""
    from utils import safety

    at = app(screen=True)
    assert safety.detector().screen is not None  # the page's detector is the screened one
    def notice(verdict):
        return verdict.flag or verdict.doubt is not None

    asked = []  # until the screen has decided both ways (a notice shown, and one not shown)
    for row in safety.held_out(None, safety.CRISIS_SETS, "positive"):
        if (verdict := safety.crisis_check(row["text"])).screen is not None:
            asked.append((row["text"], verdict))
        # (with the shipped fit the first eleven screened messages all get the notice, the twelfth not)
        if {notice(v) for _, v in asked} == {True, False} or len(asked) == 40:
            break
    assert {notice(v) for _, v in asked} == {True, False}, asked
    checked = [a for a in asked if notice(a[1])][:3] + [a for a in asked if not notice(a[1])][:3]
    for text, verdict in checked:
        at.text_area(key="prompt").input(text)
        at.button(key="generate").click().run()
        assert not at.exception, at.exception
        shown = safety.HELP_NOTICE in [w.value for w in at.warning]
        assert shown == notice(verdict), (text, verdict)

"""Dashboard: compare two models side by side, vote blind, read the reports.

    make app        # = streamlit run streamlit_app.py

A thin UI: every piece of logic lives in utils/ (serving, ratings, metrics, safety, report).
Settings through the environment: LORA_COMPARE_MODELS_DIR (adapters, default models/),
LORA_COMPARE_DATA_DIR (processed splits), LORA_COMPARE_REPORTS_DIR, LORA_COMPARE_RATINGS_DB,
LORA_COMPARE_BASES (comma-separated base models), LORA_COMPARE_POOL (models kept loaded),
LORA_COMPARE_JUDGE (the judge that grades replies, default the evaluation's; "none" turns grading off).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import streamlit as st

from utils import judge as J
from utils import chat, engine, metrics, models, ratings, safety, serving
from utils.export import ExportError
from utils.limits import REPLY_TOKENS
from utils.benchmark import share_text
from utils.data import read_jsonl
from utils.paths import MODELS_DIR, PROCESSED_DIR, REPORTS_DIR
from utils.suite import EXAMPLE_PROMPTS, FIRST_PROMPT

MODELS = Path(os.environ.get("LORA_COMPARE_MODELS_DIR", MODELS_DIR))
DATA = Path(os.environ.get("LORA_COMPARE_DATA_DIR", PROCESSED_DIR))
REPORTS = Path(os.environ.get("LORA_COMPARE_REPORTS_DIR", REPORTS_DIR))
BASES = tuple(b for b in os.environ.get("LORA_COMPARE_BASES", "").split(",") if b) or None
JUDGE = os.environ.get("LORA_COMPARE_JUDGE", J.DEFAULT_JUDGE)


@st.cache_resource
def model_pool() -> serving.ModelPool:
    return serving.ModelPool(capacity=int(os.environ.get("LORA_COMPARE_POOL", "2")), models_dir=MODELS)


@st.cache_resource
def embedder() -> metrics.Embedder:
    return metrics.Embedder()


@st.cache_resource(show_spinner=False)
def judge() -> J.LLMJudge | None:
    """The same judge as the evaluation, loaded on first use (Qwen2.5-Coder-1.5B: ~7 GB in fp32, 3.5 GB in bf16)."""
    return None if JUDGE.lower() == "none" else J.shared(JUDGE)  # the safety screen's judge, when it is the same


def grade_pair(prompt: str, outputs: list[str], reference: str | None = None) -> list[dict] | None:
    """The judge's grades of both replies (same code as the evaluation), or None when grading is off."""
    if JUDGE.lower() == "none":
        return None
    with st.spinner(f"grading both replies with the judge ({JUDGE}) ..."):
        return metrics.Scorer(embedder(), judge()).score([prompt] * len(outputs), outputs,
                                                         [reference] * len(outputs) if reference else None)


@st.cache_resource(show_spinner=False)
def safety_loading() -> Future:
    """The crisis detector and the output filter (``utils.safety``: fast paths fitted by ``make safety``
    or on first use, second stages shipped fitted) and the judge LLM that screens what they cannot
    decide, loaded in a background thread from the server's first page on, so the page is usable at once.
    On a brand-new machine that load converts the judge's GGUF first (about 1-3 minutes on 2 cores)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="safety-preload").submit(safety.preload)


def safety_ready() -> None:
    """Wait (with a spinner) until the safety models are loaded: every call to ``safety`` comes after this,
    so no message is screened by a half-loaded model and the judge is never loaded twice."""
    loading = safety_loading()
    if not loading.done():
        with st.spinner("loading the safety classifiers and the judge LLM that screens what they cannot decide "
                        "(the first start on a machine converts the judge: about 1-3 minutes) ..."):
            loading.result()
    loading.result()  # raises here, on the page, if the load failed


@st.cache_resource
def rating_store() -> ratings.RatingStore:
    return ratings.RatingStore(os.environ.get("LORA_COMPARE_RATINGS_DB", ratings.DEFAULT_DB))


def engine_available(name: str) -> bool:
    try:
        engine.check_engine(name)
    except engine.EngineError:
        return False
    return True


def default_engine(engines: list[str], picked: list[serving.Choice]) -> str:
    """llama.cpp when it is installed and both picked models are GGUF presets (it reads the shipped file
    as it is: no conversion before the first reply), else torch."""
    def gguf(choice: serving.Choice) -> bool:
        try:
            return models.resolve(choice.model).get("source") == "gguf"
        except models.ModelError:
            return False

    return "llama.cpp" if "llama.cpp" in engines and picked and all(map(gguf, picked)) else "torch"


def choices() -> list[serving.Choice]:
    return serving.available_choices(MODELS, BASES)


def split_rows(split: str) -> list[dict]:
    path = DATA / f"{split}.jsonl"
    return read_jsonl(path) if path.exists() else []


def settings_panel(key: str) -> dict:
    with st.expander("Generation settings"):
        c1, c2, c3, c4, c5 = st.columns(5)
        max_new = c1.number_input("max new tokens", 8, 512, REPLY_TOKENS["dashboard"], key=f"{key}_max")
        sample = c2.toggle("sampling", False, key=f"{key}_sample", help="off: greedy decoding")
        temp = c3.slider("temperature", 0.1, 1.5, 0.7, key=f"{key}_temp", disabled=not sample)
        top_p = c4.slider("top-p", 0.1, 1.0, 0.9, key=f"{key}_topp", disabled=not sample)
        seed = c5.number_input("seed", 0, 2**31 - 1, 0, key=f"{key}_seed")
    return {"max_new_tokens": int(max_new), "do_sample": bool(sample), "temperature": float(temp),
            "top_p": float(top_p), "seed": int(seed)}


def draw_reply(box, text: str, truncated_to: int | None = None) -> None:
    """Every reply the dashboard shows is drawn here, on first display and on every rerun: the output
    filter decides whether it is shown or shown as blocked (with the reason), and a prompt cut to
    fit gets its notice."""
    safety_ready()
    verdict = safety.output_check(text)
    if verdict.flag:
        box.error(f"Reply blocked by the output filter ({'; '.join(verdict.reasons)}).")
    else:
        box.markdown(text)
    if truncated_to is not None:
        st.caption(f"The conversation was longer than the prompt limit: only its last {truncated_to} "
                   "tokens were used.")


def show_reply(column, choice: serving.Choice, messages: list[dict], settings: dict, key: str):
    """Stream one side's reply into ``column`` (inside a container keyed ``key``: the browser tests
    find the reply by its CSS class ``st-key-<key>``); return (text, stats)."""
    with column:
        with st.spinner(f"loading {choice.label} on {choice.engine} ..."):
            try:
                entry = model_pool().get(choice)
            except (engine.EngineError, ExportError, models.ModelError, serving.ChoiceError) as err:
                st.error(f"{choice.label} cannot run on {choice.engine}: {err}")
                return "", None
        box = st.container(key=key).empty()
        stats = serving.StreamStats()
        text = box.write_stream(serving.stream_reply(entry, messages, stats, **settings))
        text = text if isinstance(text, str) else "".join(map(str, text))
        draw_reply(box, text, stats.prompt_tokens if stats.truncated else None)
        top, bottom = st.columns(3), st.columns(3)
        top[0].metric("latency", f"{stats.latency_s:.2f} s")
        top[1].metric("first token", f"{stats.ttft_s:.2f} s" if stats.ttft_s is not None else "–")
        top[2].metric("tokens/s", f"{stats.tokens_per_s:.1f}")
        bottom[0].metric("new tokens", stats.new_tokens)
        bottom[1].metric("words", stats.words)
        return text, stats


# --------------------------------------------------------------------------- pages


def compare_page():
    st.header("Compare two models")
    options = choices()
    labels = [c.label for c in options]
    if not any(c.adapter for c in options):
        st.info("No fine-tuned adapters yet: only base models are listed. Run `make pipeline` to train them.")
    a_default = next((i for i, c in enumerate(options) if c.adapter), 0)
    b_default = next((i for i, c in enumerate(options) if c.adapter and i != a_default),
                     next((i for i in range(len(options)) if i != a_default), 0))
    col_a, col_b = st.columns(2)
    pick_a = col_a.selectbox("Model A", labels, index=a_default, key="model_a")
    pick_b = col_b.selectbox("Model B", labels, index=b_default, key="model_b")
    engines = [e for e in engine.ENGINES if e == "torch" or engine_available(e)]
    picked = [options[labels.index(pick_a)], options[labels.index(pick_b)]] if options else []
    pick_engine = st.radio(
        "Engine",
        engines,
        index=engines.index(default_engine(engines, picked)),
        horizontal=True,
        key="engine",
        help="llama.cpp (the default where both models are GGUF presets): the shipped GGUF, with the adapter "
        "exported to lora.gguf (utils/export.py); it starts in a second, where torch first converts the GGUF "
        "to a safetensors cache once per machine. torch: any model, the weights the evaluation uses. Both "
        "sides use the same engine.",
    )
    side = {"A": dataclasses.replace(options[labels.index(pick_a)], engine=pick_engine),
            "B": dataclasses.replace(options[labels.index(pick_b)], engine=pick_engine)}

    rows_val = split_rows("validation")
    use_val = st.toggle("Prompt from the held-out data", key="use_val", disabled=not rows_val,
                        help=None if rows_val else f"no processed data in {DATA}: run notebooks/01_data_prep.ipynb")
    if not rows_val:
        st.caption(f"Validation prompts unavailable: no processed data in {DATA} (run `make pipeline`).")
    reference = None
    if use_val and rows_val:
        split = st.radio("split", ["validation", "test"], horizontal=True, key="val_split")
        rows = split_rows(split)
        c1, c2 = st.columns([1, 3])
        if c1.button("random prompt", key="val_random"):
            st.session_state["val_index"] = random.randrange(len(rows))
        index = c2.number_input("index", 0, len(rows) - 1, st.session_state.get("val_index", 0), key="val_index")
        row = rows[int(index)]
        history, prompt, reference = chat.split_prompt(row)
        st.text_area("Prompt", prompt, disabled=True, key="val_prompt_view")
    else:
        examples = st.columns(len(EXAMPLE_PROMPTS))
        for column, (category, example) in zip(examples, EXAMPLE_PROMPTS.items()):
            if column.button(category, key=f"example_{category}", help=example, use_container_width=True):
                st.session_state["prompt"] = example
        st.session_state.setdefault("prompt", FIRST_PROMPT)
        prompt = st.text_area("Prompt", key="prompt", placeholder="Ask both models something ...")
        history = None

    conversation = st.toggle("Conversation mode (each side keeps its own history)", key="conversation")
    if JUDGE.lower() != "none":
        st.toggle("Grade both replies with the judge (loads it on first use)", key="grade")
    settings = settings_panel("cmp")
    if st.button("Generate", type="primary", key="generate"):
        if not prompt.strip():
            st.warning("The prompt is empty: type something first.")
            return
        safety_ready()
        if safety.crisis_flag(prompt):
            st.warning(safety.HELP_NOTICE)
        outputs = {}
        columns = dict(zip("AB", st.columns(2)))
        for name, choice in side.items():
            past = st.session_state.setdefault(f"history_{name}", []) if conversation else []
            messages = history if history is not None else past + [{"role": "user", "content": prompt}]
            columns[name].subheader(f"{name}: {choice.label}")
            text, stats = show_reply(columns[name], choice, messages, settings, key=f"reply_{name}")
            outputs[name] = text
            if conversation and history is None:
                past += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
            if safety.crisis_flag(text):
                columns[name].warning(safety.HELP_NOTICE)
        if reference is not None:
            st.subheader("Reference answer")
            st.write(reference)
        if st.session_state.get("grade") or reference is not None:
            texts = [outputs["A"], outputs["B"]]
            graded = (grade_pair(prompt, texts, reference) if st.session_state.get("grade") else None) or \
                metrics.Scorer(embedder()).score([prompt] * 2, texts, [reference] * 2 if reference else None)
            table = {"model": [side["A"].label, side["B"].label]}
            for key, label in (("overall", "overall /5"), ("relevance", "relevance /5"), ("coherence", "coherence /5"),
                               ("correct_calibrated", "true and safe (judge's P)"), ("words", "words"),
                               ("rouge_l", "ROUGE-L"), ("similarity", "similarity to reference")):
                if all(key in g for g in graded):
                    table[label] = [g[key] for g in graded]
            st.dataframe(pd.DataFrame(table), hide_index=True)
    if conversation and st.button("Clear conversation", key="clear"):
        st.session_state["history_A"], st.session_state["history_B"] = [], []


def arena_page():
    st.header("Blind arena")
    st.caption("Two models answer; names are hidden and sides shuffled until you vote.")
    options = choices()
    if len(options) < 2:
        st.info("The arena needs at least two models.")
        return
    prompt = st.text_area("Prompt", key="arena_prompt")
    settings = settings_panel("arena")
    if st.button("Get two answers", type="primary", key="arena_generate") and prompt.strip():
        pool = [c for c in options if c.adapter] or options
        pair = random.sample(pool if len(pool) >= 2 else options, 2)
        cols = st.columns(2)
        outs, cuts = [], []
        for name, choice, col in zip("AB", pair, cols):
            col.subheader(f"Model {name}")
            text, stats = show_reply(col, choice, [{"role": "user", "content": prompt}], settings,
                                     key=f"arena_reply_{name}")
            outs.append(text)
            cuts.append(stats.prompt_tokens if stats is not None and stats.truncated else None)
        st.session_state["arena"] = {"prompt": prompt, "pair": [c.label for c in pair], "outputs": outs,
                                     "truncated_to": cuts, "settings": settings, "voted": False}
        if any(safety.crisis_flag(t) for t in [prompt] + outs):
            st.warning(safety.HELP_NOTICE)
    duel = st.session_state.get("arena")
    if duel and not duel["voted"]:
        if "arena" in st.session_state and not st.session_state.get("arena_generate"):
            c = st.columns(2)
            cuts = duel.get("truncated_to") or [None, None]
            for name, text, cut, col in zip("AB", duel["outputs"], cuts, c):
                col.subheader(f"Model {name}")
                with col:
                    draw_reply(st.container(key=f"arena_reply_{name}").empty(), text, cut)
        rate = st.checkbox("Also rate each answer (1-5)", key="arena_rate")
        r = {}
        if rate:
            c = st.columns(4)
            r = {"coherence_a": c[0].slider("A coherence", 1, 5, 3), "relevance_a": c[1].slider("A relevance", 1, 5, 3),
                 "coherence_b": c[2].slider("B coherence", 1, 5, 3), "relevance_b": c[3].slider("B relevance", 1, 5, 3)}
        buttons = st.columns(4)
        for label, vote, col in zip(["A is better", "B is better", "Tie", "Both bad"], ratings.VOTES, buttons):
            if col.button(label, key=f"vote_{vote}"):
                graded = grade_pair(duel["prompt"], duel["outputs"])
                auto = (
                    {f"{m}_{s}": g[m] for s, g in zip("ab", graded) for m in ("coherence", "relevance")}
                    if graded
                    else {}
                )
                rating_store().add_vote(duel["prompt"], duel["pair"][0], duel["pair"][1], duel["outputs"][0],
                                        duel["outputs"][1], vote, duel["settings"], r, auto)
                duel["voted"] = True
                st.success(f"Recorded. A was **{duel['pair'][0]}**, B was **{duel['pair'][1]}**.")
    leaderboard()


def leaderboard():
    votes = rating_store().votes()
    st.subheader(f"Leaderboard ({len(votes)} votes)")
    if not votes:
        st.caption("No votes yet.")
        return
    wr, arena = ratings.win_rates(votes), ratings.arena_ratings(votes)
    rated = arena["models"]
    bracket = lambda lo_hi: f"[{lo_hi[0]:.0f}, {lo_hi[1]:.0f}]"  # noqa: E731
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "model": m,
                    "games": s["games"],
                    "win rate": round(s["win_rate"], 3),
                    "95% CI": metrics.interval_text(s, keys=(None, "low", "high")),
                    "Bradley-Terry (Elo scale)": f"{rated[m]['rating']:.0f} {bracket(rated[m]['interval'])}",
                    "length-controlled": f"{rated[m]['controlled']:.0f} {bracket(rated[m]['controlled_interval'])}",
                }
                for m, s in sorted(wr.items(), key=lambda kv: -rated[kv[0]]["rating"])
            ]
        ),
        hide_index=True,
    )
    if arena["length_coef"] is not None:
        st.caption(f"Length-controlled: the Bradley-Terry fit with the replies' normalised length difference as a "
                   f"covariate (style control, as Chatbot Arena does); its coefficient here is "
                   f"{arena['length_coef']:+.2f} "
                   f"({'longer' if arena['length_coef'] > 0 else 'shorter'} replies tend to win). "
                   "Intervals: 95% bootstrap over votes.")
    st.caption(
        "Human calibration, the judge's grades vs your 1-5 ratings of the same replies (Spearman, 95% interval): "
        + ratings.agreement_text(ratings.agreement(votes))
    )


def reports_page():
    st.header("Reports")
    runs = sorted((p for p in REPORTS.iterdir() if (p / "metrics.json").exists() and not p.is_symlink()),
                  reverse=True) if REPORTS.exists() else []
    if not runs:
        st.info(f"No reports in {REPORTS} yet: run `make pipeline`.")
        return
    latest = (REPORTS / "latest").resolve() if (REPORTS / "latest").exists() else runs[0]
    names = [p.name for p in runs]
    pick = st.selectbox("Run", names, index=names.index(latest.name) if latest.name in names else 0, key="run_pick")
    run = REPORTS / pick
    m = json.loads((run / "metrics.json").read_text())
    if "latency" in m:
        st.subheader("Latency")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "model · variant": k,
                        "Avg (s)": round(v["avg_s"], 3),
                        "Median (s)": round(v["median_s"], 3),
                        "95% CI": metrics.interval_text(v, 3, keys=(None, "ci_low", "ci_high")),
                        "n": v["n"],
                        "of roofline": share_text(v.get("roofline_fraction")),
                    }
                    for k, v in m["latency"].items()
                ]
            ),
            hide_index=True,
        )
    if "response" in m:
        st.subheader("Response quality")

        ci = metrics.interval_text

        for sentence in m.get("verdicts", []):
            st.markdown(f"- {sentence}")
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "model": k,
                        "Overall /5": ci(v.get("overall")),
                        "Relevance /5": ci(v.get("relevance")),
                        "Coherence /5": ci(v.get("coherence")),
                        "Avg Len (words)": ci(v["avg_len_words"], 1),
                        "n": v["avg_len_words"]["n"],
                    }
                    for k, v in m["response"].items()
                ]
            ),
            hide_index=True,
        )
    if m.get("trainable_params"):
        st.subheader("Trainable parameters")
        st.dataframe(pd.DataFrame([{"model": k, "trainable": v["trainable"], "total": v["total"], "%": v["percent"]}
                                   for k, v in m["trainable_params"].items()]), hide_index=True)
    figures = sorted((run / "figures").glob("*.png"))
    for fig in figures:
        st.image(str(fig), caption=fig.stem)
    samples = run / "samples.jsonl"
    if samples.exists():
        st.subheader("Sample outputs")
        st.dataframe(pd.DataFrame([json.loads(x) for x in samples.read_text().splitlines()]).drop(columns="id"))
        st.caption("crisis_flag: the prompt or a reply mentions self-harm or a crisis (utils/safety/).")
    if (run / "report.html").exists():
        st.download_button("Download report.html", (run / "report.html").read_bytes(), file_name=f"report-{pick}.html")


def main():
    st.set_page_config(page_title="LoRA model comparison", layout="wide")
    st.caption(safety.RESEARCH_NOTE)
    page = st.sidebar.radio("Page", ["Compare", "Blind arena", "Reports"], key="page")
    if page != "Reports":
        safety_loading()  # starts loading in the background; the page does not wait for it
    {"Compare": compare_page, "Blind arena": arena_page, "Reports": reports_page}[page]()


main()

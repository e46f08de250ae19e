# Two commands do all the set-up: `make pipeline` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
KERNEL := lora-compare
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv pipeline lint safety safety-fit validate cold-start test test-fast lab app serve dpo benchmark sweep tracker strip clean

venv: $(STAMP)

# torch first, pinned: 2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a CUDA build.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (lora-compare)" >/dev/null
	touch $(STAMP)

pipeline: $(STAMP)
	$(PY) -m utils.pipeline $(ARGS)

# Lint (ruff, settings in pyproject.toml) and the notebooks' generated parameters cells.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m utils.params --check

# The safety classifiers' fast paths are fitted once per machine (about a minute) and cached; their
# second stages (rule and LLM probe) ship fitted in data/safety_fit/. `make safety-fit` fits those again
# after a change to the safety data or the code that fits them (the judge reads every train text:
# about 30 minutes on 2 AVX2 cores) and writes data/safety_fit/ (commit it; a test checks it is current).
safety: $(STAMP)
	$(PY) -m utils.safety fit

safety-fit: $(STAMP)
	$(PY) -m utils.safety fit --ship

# The judge's validity study (the whole ladder, with and without the category rubric lines; about 30-60
# minutes on 2 cores cold, seconds when the judge's grades are kept): run it when the judge changes.
# JSON into reports/validity/; `make test` checks the ladder's hard pairs only.
validate: $(STAMP)
	mkdir -p reports/validity
	$(PY) -m utils.validity --pairwise --out reports/validity/validity_ladder.json
	$(PY) -m utils.validity --notes --out reports/validity/validity_ladder_notes.json

test: lint safety
	$(PY) -m pytest --durations=25 $(ARGS)

# How long a brand-new machine waits: a fresh clone of HEAD (no .venv) with empty caches runs make test's
# phases, then make app until a headless browser sees both replies to a first prompt (about 45 min on 2 cores);
# figures, with the CPU, into reports/benchmarks/cold_start.json.
cold-start: $(STAMP)
	$(eval WORK := $(shell mktemp -d))
	$(PY) -m utils.coldstart test --workdir $(WORK)
	$(PY) -m utils.coldstart app --workdir $(WORK)

test-fast: lint
	$(PY) -m pytest -m "not slow" $(ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# The dashboard on http://127.0.0.1:8501 (settings in .streamlit/config.toml)
app: safety
	$(VENV)/bin/streamlit run streamlit_app.py $(ARGS)

# An OpenAI-compatible server for one model on 127.0.0.1 (llama.cpp engine): a preset name serves its
# fine-tuned adapter when one is trained (ADAPTER=none: the base; ADAPTER=<folder under models/>: that one).
MODEL ?= smollm2-135m
PORT ?= 8000
serve: $(STAMP)
	$(PY) -m utils.openai_server --model $(MODEL) --port $(PORT) $(if $(ADAPTER),--adapter $(ADAPTER),)

# Preference tuning of one model's SFT adapter: pairs from the blind arena's votes (and, with fewer than
# min_votes, the judge's verdicts on two sampled replies to training prompts), then DPO (TRL) into
# models/<name>-dpo; `make pipeline ARGS="--preference"` does it per model and judges it beside base and SFT.
dpo: $(STAMP)
	$(PY) -m utils.dpo --model $(MODEL) $(ARGS)

# Training throughput (this repo's recipe vs the tutorial recipe, fp32 vs 8-bit; about 7 minutes), then
# decode on torch vs llama.cpp with token agreement (about 8 minutes); JSON under reports/benchmarks/
benchmark: $(STAMP)
	$(PY) -m utils.benchmark train $(ARGS)
	$(PY) -m utils.benchmark decode

# The PEFT sweep (configs/sweep.yaml: LoRA ranks and targets, DoRA, QLoRA, IA3, prefix, prompt, full
# fine-tuning) into reports/sweep/; a rerun continues the same study. The small CI grid:
# python -m utils.sweep --quick --out reports/sweep-quick (its own study, "<study>-quick").
sweep: $(STAMP)
	$(PY) -m utils.sweep --out reports/sweep $(ARGS)

# TensorBoard on http://127.0.0.1:6006: the Trainer's logs of every run (pipeline and sweep trials)
tracker: $(STAMP)
	$(VENV)/bin/tensorboard --logdir_spec pipeline:models,sweep:reports/sweep/trials --host 127.0.0.1 --port 6006

# Strip outputs from the notebooks in git (cell tags such as `parameters` are kept).
strip: $(STAMP)
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

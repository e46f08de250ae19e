"""The domain suite (``data/eval/domain_suite.yaml``): prompts in the categories the comparison is
about, each with its category's rubric line for the judge. Read by the evaluation, the validity study
(its rubric lines), the sweep's quality check and the decode benchmark's prompts; apart from
``evaluation`` so that none of those need import it (imports flow one way)."""
from __future__ import annotations

from pathlib import Path

from .io import read_yaml
from .paths import DATA_DIR

DOMAIN_SUITE = DATA_DIR / "eval" / "domain_suite.yaml"
# The dashboard's Compare page opens on the original write-up's own prompt (it is in the suite); one example
# per category of the suite and of the default corpus fills the prompt box on a click. None is in the corpus
# (a test checks).
FIRST_PROMPT = "I've been feeling anxious lately."
EXAMPLE_PROMPTS = {
    "everyday advice": "My landlord has not fixed the heating for three weeks. What can I do?",
    "emotional support": FIRST_PROMPT,
    "factual": "How does a microwave oven heat food?",
    "crisis-adjacent": "I can't see the point in anything any more and I don't know who to tell.",
}


class EvaluationError(ValueError):
    """A malformed input of the evaluation (the suite, a config value, a missing split)."""


def load_domain_suite(path: Path = DOMAIN_SUITE) -> list[dict]:
    """Items ``{id, category, prompt, reference, note}`` of the domain suite; a malformed entry
    stops with the file, the entry and what was expected."""
    path = Path(path)
    doc = read_yaml(path, "the domain suite", EvaluationError)
    if not isinstance(doc, dict) or not isinstance(doc.get("categories"), dict) or not doc.get("prompts"):
        raise EvaluationError(f"{path}: expected a mapping with 'categories' (name -> rubric) and 'prompts'")
    items = []
    for i, p in enumerate(doc["prompts"]):
        cat = p.get("category") if isinstance(p, dict) else None
        if cat not in doc["categories"]:
            raise EvaluationError(
                f"{path}: prompts[{i}] has category {cat!r}; expected one of {sorted(doc['categories'])}"
            )
        if not isinstance(p.get("prompt"), str) or not p["prompt"].strip():
            raise EvaluationError(f"{path}: prompts[{i}] has no prompt text")
        items.append({"id": f"domain-{cat}-{i}", "category": cat, "prompt": p["prompt"],
                      "history": [{"role": "user", "content": p["prompt"]}], "reference": p.get("reference"),
                      "note": " ".join(doc["categories"][cat]["rubric"].split())})
    return items


def category_notes(path: Path = DOMAIN_SUITE) -> dict[str, str]:
    """Each domain-suite category's rubric line, as the judge is given it."""
    return {it["category"]: it["note"] for it in load_domain_suite(path)}

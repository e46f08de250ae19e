"""Facts about a training run, read from its run record (``run.json``): which PEFT method, in words,
and the precision of the base weights. Kept apart from ``training`` so that the cards and the plots,
which only read run records, need not import the trainer (imports flow one way: training -> cards)."""
from __future__ import annotations

PEFT_METHODS = ("lora", "dora", "ia3", "prefix", "prompt", "full")
PROMPT_LEARNING = ("prefix", "prompt")
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "prefix": "prefix tuning", "prompt": "prompt tuning",
                "full": "full fine-tuning"}


def method_text(run: dict) -> str:
    """What was trained, in words: "LoRA r=8 on q_proj, v_proj", "prompt tuning (16 virtual tokens)"."""
    method, lora = run.get("peft_method", "lora"), run["lora"]
    name = METHOD_NAMES[method]
    if method in ("lora", "dora"):
        if run.get("load_in_4bit"):
            name = f"QLoRA ({name} on 4-bit NF4 weights)"
        scaling = ", rsLoRA" if lora.get("rslora") else ""
        return f"{name} r={lora['r']} alpha={lora['alpha']}{scaling} on {', '.join(lora['target_modules'])}"
    if method == "ia3":
        return f"IA3 on {', '.join(lora['target_modules'] or ['PEFT default modules'])}"
    if method in PROMPT_LEARNING:
        return f"{name} ({run['config']['num_virtual_tokens']} virtual tokens)"
    return name


def base_precision(run: dict) -> str:
    return "4-bit NF4" if run.get("load_in_4bit") else "8-bit" if run["load_in_8bit"] else "full-precision"

"""How long a reply may be, per purpose: the one place every default reply length comes from.

A caller that knows its purpose passes ``REPLY_TOKENS[purpose]``; the generation functions default to
the purpose they mostly serve (batched generation: evaluation; streaming: the dashboard). The pipeline
config and the sweep's YAML may still set their own value; these are only the defaults.
"""
from __future__ import annotations

REPLY_TOKENS = {
    "dashboard": 96,   # the Compare page's and the arena's starting value (the settings panel can change it)
    "evaluation": 64,  # notebook 03: each model's replies to the domain suite and the test split (the default
    # corpus's replies run to about 70 words, ~90 tokens: in its default run this cap cut about half of the
    # fine-tuned replies, at about 42 words; 128 keeps them whole at about twice the judge's time)
    "sweep": 48,       # the sweep's quality check per trial (configs/sweep.yaml: quality.max_new_tokens)
}
# The sweep's check that a learned prefix or prompt changes the output at all: a few tokens say it.
APPLIED_CHECK_TOKENS = 16

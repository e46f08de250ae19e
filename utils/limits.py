"""How long a reply may be, per purpose: the one place every default reply length comes from.

A caller that knows its purpose passes ``REPLY_TOKENS[purpose]``; the generation functions default to
the purpose they mostly serve (batched generation: evaluation; streaming: the dashboard). The pipeline
config and the sweep's YAML may still set their own value; these are only the defaults.
"""
from __future__ import annotations

REPLY_TOKENS = {
    "dashboard": 96,   # the Compare page's and the arena's starting value (the settings panel can change it)
    "evaluation": 128,  # notebook 03: each model's replies to the domain suite and the test split (the default
    # corpus's replies run to about 70 words, 90-110 tokens: a cap of 64 cut most of them mid-sentence)
    "sweep": 48,       # the sweep's quality check per trial (configs/sweep.yaml: quality.max_new_tokens)
}
# The sweep's check that a learned prefix or prompt changes the output at all: a few tokens say it.
APPLIED_CHECK_TOKENS = 16

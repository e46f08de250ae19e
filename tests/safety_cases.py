"""What several of the safety tests (tests/unit/test_safety_*.py) share: toy rows a classifier fits in
seconds, and the recorded evaluation the held-out counts are pinned to."""
import json
from pathlib import Path

TOY = ([f"the {w} was lovely today" for w in ("cake", "walk", "film", "party", "concert", "garden")] * 3,
       [f"the {w} was awful today" for w in ("cake", "walk", "film", "party", "concert", "garden")] * 3)

# The figures of the fit the tests use: reports/example/safety.json (test_safety_study.py says how closely
# a fit must match them)
EXAMPLE = json.loads((Path(__file__).parents[1] / "reports" / "example" / "safety.json").read_text())

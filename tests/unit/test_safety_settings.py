"""Safety, its settings (configs/safety.yaml, read by utils/safety/settings.py and utils/safety_screen.py):
read with the types the fits' keys are computed from, and a value of another type refused by name."""
import pytest

from utils import safety, safety_screen
from utils.safety import settings


def test_the_settings_have_the_types_the_keys_are_computed_from():
    for grid in (settings.HI_GRID, settings.LO_GRID, settings.SCREEN_GRID, settings.BUDGETS, safety.PROBE["c_grid"]):
        assert isinstance(grid, tuple) and grid and all(type(x) is float for x in grid)
    assert type(settings.MAX_FP_CV) is float and type(settings.LANGUAGE_DOUBT) is float
    assert all(type(x) is int for x in (settings.NESTED_FOLDS, settings.CHUNK_CHARS, settings.MAX_SCREENED_PIECES,
                                        settings.LANGUAGE_CHARS, settings.TRADE_RATIO, safety.PROBE["folds"]))
    assert list(safety.PROBE) == ["depth", "c_grid", "folds", "reads"]  # the order is part of the stage key
    assert safety.PROBE is safety_screen.PROBE is settings.PROBE


def test_a_setting_of_another_type_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "_SETTINGS", {"budget": {"max_fp_cv": 1, "budgets": []}})
    with pytest.raises(ValueError, match=r"safety.yaml: budget.max_fp_cv should be a float; got 1"):
        settings._value("budget", "max_fp_cv", float)
    with pytest.raises(ValueError, match=r"budget.budgets should be a non-empty list of floats; got \[\]"):
        settings._value("budget", "budgets", float, many=True)
    config = tmp_path / "safety.yaml"
    config.write_text("probe: {c_grid: [1.0], depth: 0.7, folds: 5, reads: here}\n")
    with pytest.raises(ValueError, match=r"probe should hold depth \(a float\), c_grid .* in that order"):
        safety_screen._probe(config)
    config.write_text("probe: {depth: 0.7, c_grid: [1], folds: 5, reads: here}\n")
    with pytest.raises(ValueError, match="c_grid"):
        safety_screen._probe(config)

"""The README's measured paragraph is written between its markers, from the figures of one run."""

from __future__ import annotations

import pytest

import bundle_helpers  # noqa: F401  (puts tools/ on the path)
from readme_numbers import END, START, paragraph, replace_measured

SCRATCH = {"seconds": 197.0, "step_seconds": {"training": 161.0, "evaluation": 14.0, "inference": 13.0},
           "ap_0.1": 0.956, "map": 0.772, "froc": 0.923}
MAE = {"seconds": 280.0, "step_seconds": {"pretraining": 50.0, "training": 170.0}, "ap_0.1": 0.97, "map": 0.8,
       "froc": 0.95}


def test_paragraph_states_the_figures_date_and_machine():
    text = paragraph(SCRATCH, MAE, (1200.0, "380 passed in 1200.00s"), "x86_64 with 2 CPU cores", "2026-12-06")
    for expected in ("2026-12-06", "x86_64 with 2 CPU cores", "3 min 17 s", "training 161 s", "AP@0.1 0.956",
                     "mAP 0.772", "FROC 0.923", "4 min 40 s", "50 s pre-training", "20 min 0 s", "380 passed"):
        assert expected in text, expected


def test_only_the_text_between_the_markers_changes():
    readme = f"before\n{START}\nold figures\n{END}\nafter\n"
    assert replace_measured(readme, "new figures") == f"before\n{START}\nnew figures\n{END}\nafter\n"
    with pytest.raises(SystemExit, match="markers"):
        replace_measured("no markers here", "new figures")

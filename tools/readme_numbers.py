"""Measure the README's quickstart and test-suite figures in one run on this machine and write them into README.md.

    python tools/readme_numbers.py [--work_dir readme_run] [--suite] [--dry_run]

Runs the quickstart (`tools/quickstart.py`) from scratch and with `--init mae`, and with `--suite` the README's test
command, then replaces the text between the markers `<!-- measured -->` and `<!-- /measured -->` in README.md by
one paragraph with the figures, the date and the machine. The numbers are whatever this run measured: run it on a
quiet machine (nothing else running) for figures worth publishing.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time

import fire

from quickstart import REPO_ROOT, run_quickstart

README = os.path.join(REPO_ROOT, "README.md")
START, END = "<!-- measured -->", "<!-- /measured -->"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60))} s"


def _suite() -> tuple[float, str]:
    """Wall time and pytest's summary line of the README's test command."""
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=REPO_ROOT, capture_output=True, text=True)
    summary = [line for line in result.stdout.splitlines() if " passed" in line or " failed" in line]
    if result.returncode != 0:
        raise SystemExit(f"the test suite failed; nothing written:\n{result.stdout[-3000:]}")
    return time.time() - start, re.sub(r"=+", "", summary[-1]).strip() if summary else ""


def paragraph(scratch: dict, mae: dict, suite: tuple[float, str] | None, machine: str, date: str) -> str:
    steps = scratch["step_seconds"]
    text = (f"Measured on {date} on {machine}, with the dependencies already installed: the first command's "
            f"quickstart took {_minutes(scratch['seconds'])} (training {steps['training']:.0f} s, evaluation "
            f"{steps['evaluation']:.0f} s, inference {steps['inference']:.0f} s) and printed AP@0.1 "
            f"{scratch['ap_0.1']:.3f}, mAP {scratch['map']:.3f}, FROC {scratch['froc']:.3f}; `--init mae` took "
            f"{_minutes(mae['seconds'])} ({mae['step_seconds']['pretraining']:.0f} s pre-training, "
            f"{mae['step_seconds']['training']:.0f} s fine-tuning) and printed AP@0.1 {mae['ap_0.1']:.3f}, mAP "
            f"{mae['map']:.3f}, FROC {mae['froc']:.3f}.")
    if suite is not None:
        text += f" The test command took {_minutes(suite[0])} ({suite[1]})."
    return text + " (`python tools/readme_numbers.py --suite` measures and rewrites these figures.)"


def replace_measured(readme: str, text: str) -> str:
    """README text with the paragraph between the markers replaced; an error when the markers are missing."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"{README}: no {START} ... {END} markers to write between")
    return pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme)


def main(work_dir: str = "readme_run", suite: bool = False, dry_run: bool = False) -> str:
    if os.path.isdir(work_dir) and os.listdir(work_dir):
        # a quickstart resumes from the checkpoints it finds there, and a resumed run times nothing
        raise SystemExit(f"work_dir {work_dir} is not empty: give a new or empty folder so that every run starts from "
                         "scratch")
    scratch = run_quickstart(os.path.join(work_dir, "scratch"))
    mae = run_quickstart(os.path.join(work_dir, "mae"), init="mae")
    suite_figures = _suite() if suite else None
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = f"{platform.machine()} with {os.cpu_count()} CPU cores ({platform.system()}), {gpu}"
    text = paragraph(scratch, mae, suite_figures, machine, datetime.date.today().isoformat())
    if not dry_run:
        with open(README) as f:
            updated = replace_measured(f.read(), text)
        with open(README, "w") as f:
            f.write(updated)
    print(text)
    return text


if __name__ == "__main__":
    fire.Fire(main)

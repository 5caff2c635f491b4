"""The few-demo multitask experiment's wiring (benchmarks/few_demo_multitask.py --quick): every phase
runs through the project's stages and flows, writes its result, and a second run resumes from them.
Nothing here is about success: the quick mode trains for a few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "few_demo_multitask.py"


def run(work: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GR2_PROGRESS": "0"}
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(work), *flags], env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.timeout(1800)  # two runs of a whole pipeline: minutes on a quiet machine, many more on a loaded one
def test_the_quick_experiment_runs_every_phase_and_a_rerun_redoes_none(tmp_path):
    first = run(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "few_demo_multitask.json").read_text())

    # the action-free video reached pre-training as clips captioned with the tasks' instructions
    captions = result["video_lake"]["tokenized_clips_by_caption"]
    assert captions.get("reach the goal position", 0) >= 1 and captions.get("close the drawer", 0) >= 1
    assert captions.get("slide the window open", 0) >= 1  # a task only the video shows
    assert result["ingest"]["accepted"] == 4  # one demo and one held-out episode of each task

    assert set(result["table"]) == {"scratch / 1 demos", "pretrained / 1 demos", "cnn / 1 demos"}
    for name, run_ in result["runs"].items():
        assert set(run_["closed_loop"]) == {"reach-v3", "drawer-close-v3"}, name
        assert all(len(episodes) == 1 and 1 <= episodes[0]["steps"] <= 8 for episodes in run_["closed_loop"].values())
        if run_["arm"] != "cnn":
            assert 0.0 <= run_["video"]["token_accuracy"] <= 1.0 and run_["video"]["heldout_samples"] > 0
            assert Path(run_["video"]["png"]).stat().st_size > 0
    # each policy's closed loop is a phase of its own; the phases add up to what a cold run costs
    assert sum(name.startswith("closed-loop-") for name in result["phase_seconds"]) == 3
    assert result["phase_minutes_total"] == round(sum(result["phase_seconds"].values()) / 60, 1) > 0
    pretrained = result["runs"]["pretrained/1/0"]["train"]
    assert pretrained["run_id"] != result["runs"]["scratch/1/0"]["train"]["run_id"]

    second = run(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert " ..." not in second.stdout  # every phase was read back, none run again

    # a lost fine-tuning cache (a new machine) with --keep-results: the results already written are kept,
    # nothing is trained again, and the table still counts every run
    second_result = json.loads((tmp_path / "few_demo_multitask.json").read_text())
    for directory in tmp_path.glob("finetune-*"):
        directory.rename(tmp_path / f"lost-{directory.name}")
    third = run(tmp_path, "--keep-results")
    assert third.returncode == 0, third.stderr[-3000:]
    assert " ..." not in third.stdout
    kept = json.loads((tmp_path / "few_demo_multitask.json").read_text())
    assert kept["runs"] == second_result["runs"] and kept["table"] == second_result["table"]
    assert kept["missing_runs"] == []

"""The CI recipe in docs/ci/: a GitHub Actions workflow whose drbench step runs here, as GitHub would run it, against
a throwaway git repository holding drbench's sources at three commits (processes, worktrees and all)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from throwaway import SOURCES, git, throwaway_repository

RECIPE = Path(__file__).resolve().parent.parent / "docs" / "ci" / "drbench-continuous.yml"

TINY_SUITE = """\
name: tiny
fixed: {model: mobilenetv1, width: 0.25, input_size: 16, num_classes: 10, op: conv}
metrics:
  macs: {}
  params: {}
  latency: {budget_s: 0.05, warmup: 1, min_blocks: 3}
"""


def recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


def drbench_step(workflow: dict) -> dict:
    [step] = [step for job in workflow["jobs"].values() for step in job["steps"] if "drbench " in step.get("run", "")]
    return step


def substitute(text: str, expressions: dict[str, str]) -> str:
    """GitHub's ``${{ ... }}`` expressions replaced; an expression this test does not know fails it."""
    return re.sub(r"\$\{\{\s*(.*?)\s*\}\}", lambda match: expressions[match.group(1)], text)


def test_the_recipe_runs_on_pull_requests_with_both_commits_in_the_clone():
    workflow = recipe()
    assert "pull_request" in workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as true
    [job] = workflow["jobs"].values()
    checkout = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    step = drbench_step(workflow)
    assert "$GITHUB_STEP_SUMMARY" in step["run"] and "--format markdown" in step["run"]


@pytest.mark.slow
def test_the_recipes_drbench_step_passes_a_comment_and_fails_doubled_conv_work(tmp_path):
    repo = tmp_path / "repo"
    base, comment, slower = throwaway_repository(repo)
    (tmp_path / "tiny.yaml").write_text(TINY_SUITE)
    step = drbench_step(recipe())
    bin_dir = str(Path(sys.executable).parent)

    def run_step(base_sha: str, head_sha: str) -> tuple[subprocess.CompletedProcess, str]:
        summary = tmp_path / f"summary-{head_sha[:7]}.md"
        expressions = {"github.event.pull_request.base.sha": base_sha,
                       "github.event.pull_request.head.sha": head_sha}
        env = {key: substitute(str(value), expressions) for key, value in step["env"].items()}
        env.update(SUITE=str(tmp_path / "tiny.yaml"), ROUNDS="1")  # the tiniest settings
        env.update(GITHUB_STEP_SUMMARY=str(summary), PATH=bin_dir + os.pathsep + os.environ["PATH"],
                   PYTHONPATH=str(SOURCES.parent))  # the drbench under test runs the recipe
        finished = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                                   substitute(step["run"], expressions)], cwd=repo, env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=600)
        return finished, summary.read_text()

    same, summary = run_step(base, comment)
    assert same.returncode == 0, same.stderr
    assert summary.startswith(f"### drbench compare: `{base}` → `{comment}`")
    assert "0 regressed" in summary and "| macs |" in summary.replace("mobilenetv1 0.25x conv", "")

    slowed, summary = run_step(comment, slower)
    assert slowed.returncode == 1, slowed.stderr
    assert re.search(r"\| macs \| .* \| \*\*regressed\*\* \|", summary), summary
    assert "1 processes to run, 1 already stored" in slowed.stderr  # the comment commit was measured above
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(repo, "worktree", "list").count("\n") == 0  # only the checkout itself
    stored = list((repo / "results" / "tiny").glob("*.jsonl"))
    assert len(stored) == 3

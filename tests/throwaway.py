"""A throwaway git repository holding drbench's sources (the ones under test) at three commits, for the tests that
run ``drbench continuous`` for real: as they are, with a comment added, and with conv doing twice the work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import drbench

SOURCES = Path(drbench.__file__).resolve().parent
"""The drbench package under test; its parent holds the shipped suites."""

# Every conv the registry builds runs twice and both results are used, so that MACs count it too (a deterministic
# regression, whatever the machine's noise) and latency nearly doubles wherever convolutions dominate.
CONV_TWICE = '''
class _ConvTwice(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 0 * super().forward(x)
'''


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args], check=True,
                          capture_output=True, text=True).stdout.strip()


def throwaway_repository(path: Path) -> list[str]:
    """drbench's package and shipped suites committed at ``path`` three times (base, a comment, conv twice); the
    three hashes, oldest first."""
    shutil.copytree(SOURCES, path / "drbench", ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    shutil.copytree(SOURCES.parent / "suites", path / "suites")
    (path / ".gitignore").write_text("results/\nreports/\n")
    git(path.parent, "init", "-q", path.name)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "base")
    conv = path / "drbench" / "ops" / "conv.py"
    conv.write_text(conv.read_text() + "\n# a comment: the code is the same\n")
    git(path, "commit", "-q", "-am", "a comment")
    source = conv.read_text()
    conv.write_text(source.replace("\n\n@register_op", CONV_TWICE + "\n\n@register_op", 1)
                    .replace("return nn.Conv2d(", "return _ConvTwice("))
    git(path, "commit", "-q", "-am", "conv twice")
    return git(path, "rev-list", "--reverse", "HEAD").split()

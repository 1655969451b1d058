"""Every example in README.md and docs/ runs as written: the documentation cannot drift from the code.

- Each Markdown file's ```python blocks run in order, as one script, verbatim, in a fresh Python
  process whose working folder is a temporary folder (with `assets/` linked in, so paths written
  relative to the repository work as they do in a checkout).
- Each ```bash block's `attnedit ...` lines run the same way (the installed command line). Lines
  that set up a machine (the two commands at the top of the README: CI runs exactly those), start a
  server (`attnedit app`) or launch several processes (`accelerate launch`) are not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if (ROOT / "docs").is_dir() else [
    ROOT / "README.md"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = ("attnedit app", "accelerate launch")


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def commands(path: Path) -> list[str]:
    """The `attnedit ...` command lines of a file's bash blocks (continuation lines joined)."""
    out = []
    for body in blocks(path, "bash"):
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("attnedit ") and not line.startswith(NOT_RUN):
                out.append(line)
    return out


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "assets").symlink_to(ROOT / "assets")
    return work


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d, "python")], ids=lambda d: d.relative_to(ROOT).as_posix())
def test_python_examples_run_verbatim(doc, tmp_path):
    script = "\n\n".join(blocks(doc, "python"))
    work = _workdir(tmp_path)
    res = subprocess.run([sys.executable, "-c", script], cwd=work, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"{doc.name}: the Python examples failed:\n{res.stderr[-3000:]}"


@pytest.mark.parametrize("doc", [d for d in DOCS if commands(d)], ids=lambda d: d.relative_to(ROOT).as_posix())
def test_command_line_examples_run_verbatim(doc, tmp_path):
    work = _workdir(tmp_path)
    for line in commands(doc):
        argv = shlex.split(line)
        res = subprocess.run([sys.executable, "-m", "attnedit", *argv[1:]], cwd=work, env=_env(),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{doc.name}: `{line}` failed:\n{res.stderr[-3000:]}"


def test_docs_link_only_inside_the_repository():
    """Users never see ../shared or other folders outside the checkout."""
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text, f"{doc.name} points outside the repository"
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (doc.parent / target).resolve().is_relative_to(ROOT), f"{doc.name}: {target} is outside"
            assert (doc.parent / target).exists(), f"{doc.name}: the link {target} leads nowhere"

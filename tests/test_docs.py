"""Every example in README.md and docs/ runs as written: the documentation cannot drift from the code.

- Each Markdown file's ```python blocks run in order, as one script, verbatim, in a temporary folder
  (with `assets/` linked in, so paths written relative to the repository work as in a checkout).
- Each ```bash block's `attnedit ...` lines run the same way, through the command line's `main`.
  Lines that set up a machine (the two commands at the top of the README: CI runs exactly those),
  start a server (`attnedit app`) or launch several processes (`accelerate launch`) are not run here.

All files run in one worker process, one after the other, each in its own folder and namespace: a
fresh process per example paid ~5 s of imports each (the pages' own work takes 1-4 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = ("attnedit app", "accelerate launch")

WORKER = r'''
import contextlib, io, json, os, shlex, sys, tempfile, traceback
from pathlib import Path

jobs = json.loads(sys.stdin.read())
root = Path(sys.argv[1])
results = {}
for job in jobs:
    work = Path(tempfile.mkdtemp(prefix="attnedit-docs-"))
    (work / "assets").symlink_to(root / "assets")
    os.chdir(work)
    errors = []
    if job["python"]:
        try:
            exec(compile(job["python"], job["name"], "exec"), {"__name__": "__main__"})
        except BaseException:
            errors.append("python blocks:\n" + traceback.format_exc()[-3000:])
    from attnedit.cli import main
    for line in job["commands"]:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(shlex.split(line)[1:])
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:
            code, err = 1, io.StringIO(traceback.format_exc())
        if code:
            errors.append(f"`{line}` exited with {code}:\n{err.getvalue()[-3000:]}")
    results[job["name"]] = errors
print("ATTNEDIT-DOCS " + json.dumps(results))
'''


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def commands(path: Path) -> list[str]:
    """The `attnedit ...` command lines of a file's bash blocks (continuation lines joined)."""
    out = []
    for body in blocks(path, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("attnedit ") and not line.startswith(NOT_RUN):
                out.append(line)
    return out


def _name(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


RUNNABLE = [d for d in DOCS if blocks(d, "python") or commands(d)]


@pytest.fixture(scope="module")
def outcomes() -> dict[str, list[str]]:
    """Run every documentation example once, in one worker process; doc name -> its errors."""
    jobs = [{"name": _name(d), "python": "\n\n".join(blocks(d, "python")), "commands": commands(d)} for d in RUNNABLE]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", WORKER, str(ROOT)], input=json.dumps(jobs), env=env,
                         capture_output=True, text=True, timeout=1200)
    found = [line for line in res.stdout.splitlines() if line.startswith("ATTNEDIT-DOCS ")]
    assert found, f"the documentation worker died:\n{res.stderr[-3000:]}"
    return json.loads(found[-1][len("ATTNEDIT-DOCS "):])


@pytest.mark.parametrize("doc", RUNNABLE, ids=_name)
def test_examples_run_verbatim(doc, outcomes):
    errors = outcomes[_name(doc)]
    assert not errors, f"{_name(doc)}:\n" + "\n\n".join(errors)


def test_every_method_page_has_a_runnable_example():
    pages = sorted((ROOT / "docs" / "methods").glob("*.md"))
    assert len(pages) >= 10
    for page in pages:
        assert blocks(page, "python"), f"{page.name} has no Python example"


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

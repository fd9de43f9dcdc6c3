"""The README for a first-time user: its quick starts run as written, its links resolve.

The two quick starts are the fenced blocks after ``<!-- quickstart: byom -->`` and
``<!-- quickstart: byod -->``; each runs with ``bash -e`` in a temporary folder that looks
like the repository root where the snippet needs it (``device_runners/``,
``models/own-csv/recipe.toml``), with ``edgetl`` and ``python`` resolved to this interpreter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_snippet

README = ROOT / "README.md"
MAX_README_LINES = 250
MAX_SNIPPET_LINES = 15
#: Pages linked from README.md / docs that other branches add (docs/coverage.md: make coverage;
#: docs/bundle-format.md: make docs). Checked once they exist; drop an entry when it lands.
PENDING: set[str] = set()  # pages other branches write; none pending

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def quickstart(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- quickstart: {name} -->\n```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no ```bash block after <!-- quickstart: {name} -->"
    return m.group(1)


def md_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


# ------------------------------------------------------------------------------ static

@pytest.mark.unit
def test_readme_is_short_and_its_quick_starts_fit():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it ≤ {MAX_README_LINES}"
    for name in ("byom", "byod"):
        lines = quickstart(name).strip().splitlines()
        assert len(lines) <= MAX_SNIPPET_LINES, f"quick start {name}: {len(lines)} lines"


@pytest.mark.unit
def test_byod_quick_start_is_the_own_data_page_s():
    page = (ROOT / "docs" / "own-data.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", page, re.S).group(1)
    # the same block, so tests/test_own_data.py's run of it covers the README's too
    assert quickstart("byod") == block, "README's byod quick start differs from docs/own-data.md"


@pytest.mark.unit
def test_every_relative_link_resolves():
    bad = []
    for md in md_files():
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # links, not code
        for m in LINK.finditer(text):
            target = m.group(1) or m.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (md.parent / file).resolve() if file else md
            rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                if rel not in PENDING:
                    bad.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{md.relative_to(ROOT)}: {target} (no heading #{anchor})")
    assert not bad, "broken links:\n" + "\n".join(bad)


@pytest.mark.unit
def test_every_docs_page_is_linked_from_the_readme_and_says_what_it_is():
    readme = README.read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        rel = page.relative_to(ROOT).as_posix()
        assert f"]({rel}" in readme, f"README.md does not link {rel}"
        if page.parent.name == "bench":  # copies of `edgetl bench` output, as written
            continue
        first = page.read_text().splitlines()
        assert first[0].startswith("# ") and first[1] == "" and first[2].strip(), \
            f"{rel}: start with a title and a one-line summary"


@pytest.mark.unit
def test_no_stale_mentions():
    for md in md_files():
        text = md.read_text()
        for stale in ("edgetl/pi.py", "edgetl.pi ", "python -m edgetl.pi"):
            assert stale not in text, f"{md.relative_to(ROOT)} mentions {stale}"


# ------------------------------------------------------------------------------ the snippets

def test_byom_quick_start_runs(tmp_path):
    """Write a model, export it (ONNX fp32), check it, make device data, adapt on it."""
    (tmp_path / "device_runners").symlink_to(ROOT / "device_runners")
    p = run_snippet(quickstart("byom"), tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    m = json.loads((tmp_path / "my-model/bundle/manifest.json").read_text())
    assert (m["target"], m["precision"], m["labels"]) == ("onnx", "fp32", ["cat", "dog", "bird"])
    report = json.loads((tmp_path / "my-model/state/report.json").read_text())
    assert (tmp_path / "my-model/state/head.npz").exists(), report


def test_no_file_holds_an_unresolved_merge():
    """A merge conflict committed by mistake (it happened once, in docs/bundle.md)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    marker = re.compile(r"^(<{7} |>{7} )", re.M)
    bad = [f for f in files if f.endswith((".md", ".py", ".ts", ".toml", ".mjs", ".html"))
           and (ROOT / f).is_file() and marker.search((ROOT / f).read_text(errors="replace"))]
    assert not bad, f"unresolved merge markers in {bad}"

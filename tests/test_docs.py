"""The repository stands alone: its documents link only to files inside it, and nothing points
at the design texts of the project's shared workspace, which a clone does not have (issue 13)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {".git", "build", "node_modules", "__pycache__"}
TEXT_SUFFIXES = {".md", ".py", ".cc", ".h", ".sh", ".toml", ".cfg", ".txt"}
LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown [text](target)
OUTSIDE = "shared" + "/design"  # spelled in two parts so that this file does not match itself


def repo_files(suffixes: set[str]) -> list[Path]:
    """The repository's own files with these suffixes (no VCS, build or egg-info folders)."""
    return sorted(
        p
        for p in ROOT.rglob("*")
        if p.suffix in suffixes
        and p.is_file()
        and not any(part in SKIPPED or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
    )


def test_docs_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in ("docs/variants.md", "docs/ops.md", "docs/architecture.md"):
        assert (ROOT / doc).is_file(), doc
        assert f"]({doc}" in readme, f"README.md does not link {doc}"


def test_markdown_links_resolve_inside_the_repo():
    bad = []
    for md in repo_files({".md"}):
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same file
            dest = (md.parent / target.split("#", 1)[0]).resolve()
            if not dest.exists() or ROOT not in dest.parents:
                bad.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not bad, bad


def test_nothing_points_at_the_shared_design_texts():
    hits = [
        str(p.relative_to(ROOT))
        for p in repo_files(TEXT_SUFFIXES)
        if OUTSIDE in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not hits, hits

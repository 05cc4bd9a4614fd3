"""The documentation links nothing outside the repository, and every link it has works."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "CONTRIBUTING.md",
        REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_links_stay_inside_the_repository() -> None:
    bad = []
    for doc in DOCS:
        text = doc.read_text()
        for target in LINK.findall(text):
            path = target.split("#", 1)[0]
            if re.match(r"[a-z]+:", target):
                bad.append(f"{doc.name}: {target} (outside the repository)")
            elif path and not (doc.parent / path).resolve().is_relative_to(REPO):
                bad.append(f"{doc.name}: {target} (outside the repository)")
            elif path and not (doc.parent / path).exists():
                bad.append(f"{doc.name}: {target} (does not exist)")
        # a path outside the tree, written out instead of linked
        bad += [f"{doc.name}: mentions {m}" for m in re.findall(r"\.\./shared/\S+", text)]
    assert not bad, bad
    assert len(DOCS) > 5 and all(d.exists() for d in DOCS)

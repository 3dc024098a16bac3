"""The documentation a newcomer reads: a short README, and no link that leads nowhere."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(REPO.glob("bundles/*/docs/*.md"))]


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the detail belongs in docs/"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, "\n".join(broken)


def test_readme_names_the_test_command_that_ci_runs():
    assert "make test" in (REPO / "README.md").read_text()
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_every_bundle_doc_has_the_model_zoo_headings_in_order():
    order = ["Description", "Data", "I/O formats", "Scores", "Commands", "Known limits", "References", "License"]
    for doc in sorted(REPO.glob("bundles/*/docs/README.md")):
        headings = [line[3:].strip() for line in doc.read_text().splitlines() if line.startswith("## ")]
        assert headings == order, f"{doc.relative_to(REPO)}: {headings}"

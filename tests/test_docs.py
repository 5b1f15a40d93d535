"""The documentation: the science notes the code cites live in the repository, and every citation resolves; the
documentation site (mkdocs.yml, docs/) reaches every page, and the docs speak about the lab, not its history.
Cheap: reads files only, never builds the site (`mkdocs build --strict` does that)."""

import fnmatch
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_docs_science_reference_in_the_code_names_a_section():
    notes = (ROOT / "docs" / "science.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[ .]", notes, flags=re.M))
    cited = {}
    for path in (ROOT / "lab").rglob("*.py"):
        text = path.read_text()
        assert "SCIENCE.md" not in text, f"{path} cites a file outside the repository"
        for sec in re.findall(r"docs/science\.md §(\d+(?:\.\d+)?)", text):
            cited.setdefault(sec, []).append(path.name)
    assert len(cited) >= 5  # the tasks, the measures and the clamps cite their sections
    missing = {s: files for s, files in cited.items() if s not in sections}
    assert not missing, f"sections cited but absent from docs/science.md: {missing}"


# the history of how things came about: work sessions and issue references ("issue #12", "#12's table")
HISTORY = re.compile(r"session|\bissues?\s*#\s*\d*|#\d+'s", re.IGNORECASE)


def _nav_files(node) -> list[str]:
    """Every file a mkdocs nav names (entries are "file", {"Title": "file"} or {"Section": [entries]})."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def _excluded(rel: str, patterns: str | None) -> bool:
    """Whether docs/rel matches one of mkdocs' gitignore-style patterns (exclude_docs, not_in_nav)."""
    for pattern in (patterns or "").splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        anchored = pattern.startswith("/")
        pattern = pattern.lstrip("/")
        if pattern.endswith("/"):
            pattern += "*"
        candidates = [rel] if anchored else [rel, *("/".join(rel.split("/")[i:]) for i in range(1, rel.count("/") + 1))]
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            return True
    return False


def test_every_page_in_nav_and_no_history():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config.get("docs_dir", "docs") == "docs"
    nav = set(_nav_files(config["nav"]))
    problems = []

    for page in sorted(DOCS.rglob("*.md")):
        rel = page.relative_to(DOCS).as_posix()
        excluded = _excluded(rel, config.get("exclude_docs")) or _excluded(rel, config.get("not_in_nav"))
        if rel not in nav and not excluded:
            problems.append(f"docs/{rel}: not in mkdocs.yml's nav (add it, or exclude it explicitly)")
    for entry in sorted(nav):
        if entry.endswith(".md") and not (DOCS / entry).is_file():
            problems.append(f"mkdocs.yml nav names {entry}, which docs/ does not have")

    for text_file in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for number, line in enumerate(text_file.read_text(encoding="utf-8").splitlines(), 1):
            for match in HISTORY.finditer(line):
                where = f"{text_file.relative_to(ROOT)}:{number}"
                problems.append(f"{where}: {match.group(0)!r} (history, not the lab): {line.strip()[:120]}")

    assert not problems, "\n".join(problems)

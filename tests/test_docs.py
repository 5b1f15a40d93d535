"""The science notes the code cites live in the repository, and every citation resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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

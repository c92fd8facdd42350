"""Documents the code cites live in this repository: every ``docs/<file>.md, "Section"`` (or
``("Section")``) cited in a docstring or comment names a file in ``docs/`` with that heading."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/([\w.-]+\.md)`*,?\s*\(?\"([^\"]+)\"")


def test_every_cited_section_exists():
    cited = set()
    for path in ROOT.glob("ds_moe_replicate/**/*.py"):
        for doc, section in CITE.findall(path.read_text(encoding="utf-8")):
            cited.add((doc, section))
    assert ("design.md", "Slot layout") in cited  # the pattern still finds the citations
    for doc, section in sorted(cited):
        text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
        assert re.search(rf"^#+ {re.escape(section)}$", text, re.M), (doc, section)

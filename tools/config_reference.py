"""Write docs/configuration.md: every config key with its type, default and meaning, generated
from megalign/config/sections.py (tests/test_config.py fails when the file is out of date).

    python tools/config_reference.py
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the library, also from a fresh clone without an install

from megalign.config.reference import reference_markdown  # noqa: E402

if __name__ == "__main__":
    target = REPO / "docs" / "configuration.md"
    target.write_text(reference_markdown(), encoding="utf-8")
    print(f"wrote {target.relative_to(REPO)}")

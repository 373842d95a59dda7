"""Write docs/configuration.md from mproxy/config/ (run from anywhere)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mproxy.config import docs_markdown  # noqa: E402


def main() -> None:
    target = ROOT / "docs" / "configuration.md"
    target.write_text(docs_markdown(), encoding="utf-8")
    print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

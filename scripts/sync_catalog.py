"""Write the catalog table (``ppo-guard rules --markdown``) into README.md in place: run after editing the catalog."""

from __future__ import annotations

from pathlib import Path

from lightning_ppo_guard.cli import catalog_markdown

HEADER = "| code | symbol | severity | checklist step | what it means | fix |"


def main() -> None:
    path = Path(__file__).resolve().parent.parent / "README.md"
    text = path.read_text()
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    path.write_text(text[:start] + catalog_markdown() + text[end:])


if __name__ == "__main__":
    main()

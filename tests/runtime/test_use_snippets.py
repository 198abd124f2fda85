"""The README's and the model card's Use snippets, taken from their text and run in a fresh process (so the
snippet's own `import hlwq` is what registers the quantizer): each must load the model our loader builds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = "path/or/ORG/repo"
CHECK = (
    "import torch\n"
    "from pipeline.runtime import load_dequantized\n"
    "ids = torch.tensor([[2, 10, 11, 12, 13, 40, 41]])\n"
    "ref = load_dequantized({path!r})\n"
    "with torch.inference_mode():\n"
    "    print('SAME', torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits))\n"
)


@pytest.fixture(scope="module")
def tiny(tiny_src: Path, tiny_artifact: Path) -> tuple[Path, Path]:
    """(source BF16 checkpoint, its 5-bit artifact): the session's tiny pair (tests/conftest.py)."""
    return tiny_src, tiny_artifact


def _first_python_block(markdown: str, heading: str) -> str:
    section = markdown.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def _readme_snippet(artifact: Path) -> str:
    code = _first_python_block((ROOT / "README.md").read_text(), "## Use")
    assert PLACEHOLDER in code
    return code.replace(PLACEHOLDER, str(artifact))


def _card_snippet(artifact: Path) -> str:
    from stages.card import use_section

    return _first_python_block("\n" + "\n".join(use_section(str(artifact), "image-text-to-text")), "## Use")


@pytest.mark.parametrize("source", [_readme_snippet, _card_snippet], ids=["readme", "card"])
def test_use_snippet_loads_the_model(tiny: tuple[Path, Path], source: object) -> None:
    artifact = tiny[1]
    code = source(artifact)  # type: ignore[operator]
    assert code.startswith("import hlwq")
    proc = subprocess.run([sys.executable, "-c", code + CHECK.format(path=str(artifact))], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SAME True" in proc.stdout

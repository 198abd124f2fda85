"""The kernel library's build rules that hold without a GPU or nvcc: the name follows the source, and
HLWQ_KERNEL_SOURCE swaps in another version of it (an A/B of two kernel versions in one session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import RuntimeBackendError
from pipeline.runtime.kernels import build


def test_another_source_gets_its_own_cached_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HLWQ_KERNEL_SOURCE", raising=False)
    shipped = build.library_name()
    alt = tmp_path / "hlwq_variant.cu"
    alt.write_bytes(build.SOURCE.read_bytes() + b"\n// a variant\n")
    monkeypatch.setenv("HLWQ_KERNEL_SOURCE", str(alt))
    assert build.source() == alt
    variant = build.library_name()
    assert variant != shipped
    # Already in the cache: returned as it is, nvcc not needed.
    (tmp_path / variant).write_bytes(b"")
    assert build.build(tmp_path) == tmp_path / variant
    monkeypatch.delenv("HLWQ_KERNEL_SOURCE")
    assert build.library_name() == shipped


def test_a_missing_source_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HLWQ_KERNEL_SOURCE", str(tmp_path / "nope.cu"))
    with pytest.raises(RuntimeBackendError, match="HLWQ_KERNEL_SOURCE: no such file"):
        build.library_name()

"""Startup keys of the spool's hardening: `spool.min_free`."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferrymail.config import ConfigError, load_startup


def startup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "startup.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("given", "expected"), [
    ("0", 0), ("1048576", 1 << 20), ("'512KiB'", 512 << 10), ("'1GiB'", 1 << 30)])
def test_min_free_takes_sizes(tmp_path, given, expected):
    cfg = load_startup(startup(tmp_path, f"spool:\n  path: ./s\n  min_free: {given}\n"))
    assert cfg.spool.min_free == expected


def test_min_free_defaults_to_16_mib(tmp_path):
    assert load_startup(startup(tmp_path, "spool:\n  path: ./s\n")).spool.min_free == 16 << 20


@pytest.mark.parametrize("bad", ["-1", "'ten MiB'", "true", "[1]"])
def test_a_bad_min_free_names_file_line_and_key(tmp_path, bad):
    path = startup(tmp_path, f"spool:\n  path: ./s\n  min_free: {bad}\n")
    with pytest.raises(ConfigError) as exc:
        load_startup(path)
    errs = exc.value.errors
    assert len(errs) == 1, str(exc.value)
    assert (errs[0].file, errs[0].line, errs[0].path) == (str(path), 3, "spool.min_free")
    assert "size" in errs[0].message

"""The README stays true: its walk-through runs as written against a real server, and its configuration
table lists exactly the variables the code reads."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from app.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def _walkthrough() -> str:
    text = README.read_text()
    block = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    return block.strip().removeprefix("```bash").removesuffix("```")


@pytest.mark.skipif(shutil.which("curl") is None, reason="the walk-through is written for curl")
def test_walkthrough_runs_as_written(server: str, tmp_path: Path) -> None:
    script = _walkthrough()
    assert "BASE=http://127.0.0.1:8000" in script
    script = script.replace("BASE=http://127.0.0.1:8000", f"BASE={server}")

    out = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    statuses = sorted(line for line in lines if line.startswith(("alice: HTTP", "bob: HTTP")))
    assert [s.split()[-1] for s in statuses] in (["201", "409"], ["409", "201"])
    assert sum('"code":"insufficient_stock"' in line for line in lines) == 1
    assert sum('"status":"confirmed"' in line for line in lines) == 1
    assert sum('"status":"released"' in line for line in lines) == 1
    # the SKU's state after each step: sold out, restocked, one held, released
    states = [re.search(r'"held":(\d+),"sold":(\d+),"available":(\d+)', line) for line in lines]
    assert [m.groups() for m in states if m] == [
        ("0", "0", "1"),
        ("0", "1", "0"),
        ("0", "1", "2"),
        ("1", "1", "1"),
        ("0", "1", "2"),
    ]


def test_configuration_table_matches_settings() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", README.read_text(), re.MULTILINE))
    read_by_code = {str(field.validation_alias) for field in Settings.model_fields.values()}
    assert documented - {"TEST_REDIS_URL", "TEST_DATABASE_URL"} == read_by_code

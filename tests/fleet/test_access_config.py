"""`steer-server serve` refuses an unusable keys file before it starts anything, naming the
file, the line and what is wrong."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("content", "expected"), [
    ("admin k1\nroot k2\n", "line 2: unknown role 'root'; expected one of inference, admin"),
    ("admin\n", "line 1: expected 'ROLE KEY' or 'ROLE KEY TENANT', got 1 fields"),
    ("admin k1 team-a extra\n", "line 1: expected 'ROLE KEY' or 'ROLE KEY TENANT', got 4 fields"),
    ("admin k1\ninference k1\n", "line 2: this key is listed with two roles (admin and inference)"),
    ("admin k1 team/a\n", "line 1: bad tenant 'team/a': a tenant is 1-64 characters of A-Z a-z 0-9 . _ -"),
    ("admin k1 team-a\nadmin k1 team-b\n", "line 2: this key is listed with two tenants (team-a and team-b)"),
    ("# only a comment\n\n", "holds no keys"),
])
def test_a_bad_keys_file_stops_serve(tmp_path, content, expected):
    keys = tmp_path / "keys"
    keys.write_text(content)
    result = subprocess.run([sys.executable, "-m", "steer_server.cli", "serve", "--api-keys-file", str(keys)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(keys) in result.stderr and expected in result.stderr


def test_a_missing_keys_file_stops_serve(tmp_path):
    result = subprocess.run([sys.executable, "-m", "steer_server.cli", "serve", "--api-keys-file",
                             str(tmp_path / "absent")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cannot read the API keys file" in result.stderr

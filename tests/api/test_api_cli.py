"""`steer-server vectors ...` and `steer-server compare` against the running server."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from api_helpers import cli

from steer_server.server_process import steer_server_command

pytestmark = pytest.mark.slow


def test_help_does_not_need_a_server():
    for args in (["--help"], ["serve", "--help"], ["vectors", "--help"], ["compare", "--help"]):
        result = subprocess.run(steer_server_command(*args), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    serve_help = subprocess.run(steer_server_command("serve", "--help"), capture_output=True, text=True).stdout
    for flag in ("--model", "--store", "--steering-pad", "--max-steering-prompt-tokens", "--max-additions",
                 "--max-body-bytes"):
        assert flag in serve_help


def test_vectors_commands(server, tmp_path):
    computed = cli(server, "vectors", "compute", "cli-love-hate", "--layer", "2", "--add", "Love", "1", "--add", "Hate", "-1")
    assert "cli-love-hate" in computed.stdout and "actadd" in computed.stdout
    assert "cli-love-hate" in cli(server, "vectors", "list").stdout

    shown = cli(server, "vectors", "show", "cli-love-hate").stdout
    assert "typical token norm" in shown and "row norms" in shown

    cli(server, "vectors", "compute", "cli-calm", "--layer", "10", "--pair", "I am calm", "I am angry")
    target = tmp_path / "calm.gguf"
    exported = cli(server, "vectors", "export", "cli-calm", "-o", str(target))
    assert target.stat().st_size > 576 * 4 and str(target) in exported.stdout
    imported = cli(server, "vectors", "import", str(target), "--name", "cli-calm-back")
    assert "cli-calm-back" in imported.stdout and "gguf" in imported.stdout

    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps({"layers": {"3": [0.5] * 576}}))
    assert "cli-upload" in cli(server, "vectors", "import", str(upload), "--name", "cli-upload").stdout

    assert "deleted vector v-" in cli(server, "vectors", "delete", "cli-calm-back").stdout
    missing = cli(server, "vectors", "show", "cli-calm-back", check=False)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    bad = cli(server, "vectors", "export", "cli-love-hate", "-o", str(tmp_path / "x.gguf"), check=False)
    assert bad.returncode == 1 and "HTTP 400" in bad.stderr and "constant" in bad.stderr


def test_compare_prints_both_columns(server):
    steering = json.dumps({"additions": [{"prompt": "Love", "coeff": 8, "layer": 4},
                                         {"prompt": "Hate", "coeff": -8, "layer": 4}]})
    result = cli(server, "compare", "--prompt", "I hate you because", "--steering", steering, "--n", "2",
                 "--max-tokens", "8", "--temperature", "1", "--top-p", "0.3")
    assert "unsteered" in result.stdout and "steered" in result.stdout
    assert "Love" in result.stdout  # this strong steering makes the model say it
    refused = cli(server, "compare", "--prompt", "Hi", "--steering", '{"additions": []}', check=False)
    assert refused.returncode == 1 and "steering.additions" in refused.stderr


def test_unreachable_server_is_a_clean_error():
    result = subprocess.run(steer_server_command("vectors", "list", "--url", "http://127.0.0.1:9"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "steer-server:" in result.stderr and "Traceback" not in result.stderr


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "steer_server.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "serve" in result.stdout

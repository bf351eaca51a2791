"""benchmarks/ids-check/ids.py, the refactor check: same code gives the same hashes, a changed
hash fails the comparison."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ids-check" / "ids.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), "--limit", "2", "--suites", "steps", *args],
                          capture_output=True, text=True)


def test_ids_check_matches_itself_and_flags_a_change(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    r = run("--out", str(a))
    assert r.returncode == 0, r.stderr
    rows = json.loads(a.read_text())["rows"]
    assert set(rows) == {"vanilla:steps=48", "vanilla:steps=24", "vanilla:steps=12", "vanilla:steps=6"}
    r = run("--out", str(b), "--compare", str(a))
    assert r.returncode == 0 and "4 rows identical, 0 differ" in r.stdout
    rows["vanilla:steps=24"] = "0" * 16
    a.write_text(json.dumps({"limit": 2, "rows": rows}))
    r = run("--out", str(b), "--compare", str(a))
    assert r.returncode == 1 and "DIFFERS: vanilla:steps=24" in r.stdout

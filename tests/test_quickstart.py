"""The README's main job, examples/quickstart.sh, end to end at a smaller iteration count."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_trains_exports_and_generates_with_a_falling_loss(tmp_path):
    env = dict(os.environ, QUICKSTART_SKIP_INSTALL="1", PYTHON=sys.executable,
               QUICKSTART_ITERS="60", QUICKSTART_OUT=str(tmp_path / "run"))
    result = subprocess.run(["bash", "examples/quickstart.sh"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = [json.loads(line) for line in (tmp_path / "run/checkpoints/metrics.jsonl").read_text().splitlines()]
    train = [row["loss"] for row in rows if row["kind"] == "train"]
    assert len(train) == 6
    assert train[-1] < train[0] - 1.0, train

    hf = tmp_path / "run/hf"
    assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()
    assert (hf / "tokenizer.json").exists()
    generated = [line for line in result.stdout.splitlines() if line.startswith("'")]
    assert len(generated) == 2 and all(len(line) > 10 for line in generated), result.stdout[-2000:]

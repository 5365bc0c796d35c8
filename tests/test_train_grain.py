"""The trainer on real prepared shards: synthesize -> prepare -> train through the Grain loader -> resume."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, devices=4, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def test_train_and_resume_on_prepared_shards(tmp_path):
    _run(["-m", "data_pipeline.synthesize", f"--out={tmp_path / 'raw'}", "--clips=2", "--seconds=2", "--seed=1"])
    _run(["-m", "data_pipeline.prepare", f"--input={tmp_path / 'raw'}", f"--output={tmp_path / 'shards'}",
          "--clip-seconds=1"])
    common = ["-m", "mirage_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
              f"--config.data.source={tmp_path / 'shards'}", "--config.train.global_batch_size=4",
              "--config.shapes.latent_frames=25", "--config.shapes.audio_frames=25", "--config.model.num_layers=2",
              "--config.train.log_every=1", "--config.checkpoint.save_every=2"]
    first = _run(common + ["--config.train.steps=2"])
    # the loader's workers (data.worker_count=-1: cores - 1) are stopped when the loop ends, not at shutdown
    assert "leaked" not in first.stderr and "Exception ignored" not in first.stderr, first.stderr[-3000:]
    data_state = json.loads((tmp_path / "run" / "checkpoints" / "2" / "data" / "data_state.json").read_text())
    out = _run(common + ["--config.train.steps=3"])
    assert "resumed from checkpoint at step 2" in out.stdout + out.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3
    assert data_state.get("kind") == "grain" and data_state["step"] == 2  # the loader's global position

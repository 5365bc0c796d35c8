"""A user's mistake gets one line naming it and the exit status of README's table (`mirage_base.errors.ExitCode`),
never a traceback; a bug keeps its traceback (exit 1). The table itself is checked against the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import wave

import pytest

from mirage_base.errors import InputError
from train_cli import ROOT, run_cli


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_train_on_a_missing_data_source(tmp_path):
    r = run_cli(tmp_path / "run", **{"data.source": str(tmp_path / "nowhere"), "train.steps": 1})
    assert r.returncode == 2 and "Traceback" not in r.stdout, r.stdout[-3000:]
    assert f"DATA ERROR: {tmp_path / 'nowhere'}" in r.stdout


@pytest.mark.parametrize("args", [
    ("mirage_jax.generate", "--checkpoint={missing}", "--out={tmp}/x.mp4", "--say=hello"),
    ("mirage_jax.eval", "--checkpoint={missing}", "--data={missing}"),
    ("data_pipeline.prepare", "--input={missing}", "--output={tmp}/out"),
])
def test_missing_paths_are_one_line(tmp_path, args):
    r = _cli(*(a.format(missing=tmp_path / "nowhere", tmp=tmp_path) for a in args))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(tmp_path / "nowhere") in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, names", [
    (("mirage_jax.train", "--config=configs/tiny.py", "--workdir={tmp}/w", "--config.train.steps=abc"),
     "--config.train.steps=abc"),
    (("mirage_jax.train", "--config=configs/tiny.py", "--workdir={tmp}/w", "--config.checkpoint.async_save=maybe"),
     "--config.checkpoint.async_save=maybe"),
    (("mirage_jax.train", "--config=configs/tiny.py", "--work-dir={tmp}/w"), "work_dir"),
    (("mirage_jax.train", "--config=configs/tiny.py"), "--workdir"),
    (("mirage_jax.train", "--config=configs/nope.py", "--workdir={tmp}/w"), "configs/nope.py"),
    (("mirage_jax.describe", "--config=configs/mirage_10b.py:seconds=-4"), "seconds=-4"),
    (("mirage_jax.describe", "--config=configs/tiny.py", "--config.shapes.latent_frames=-5"),
     "--config.shapes.latent_frames=-5"),
    (("mirage_jax.eval", "--checkpoint={tmp}", "--data={tmp}", "--seeds=0"), "--seeds=0"),
    (("data_pipeline.synthesize", "--out={tmp}/raw", "--clips=0"), "--clips=0"),
    (("mirage_jax.export", "--checkpoint={tmp}", "--out={tmp}/e", "--dtype=fp16"), "--dtype"),
])
def test_bad_flags_and_config_values_are_one_line_exit_2(tmp_path, args, names):
    """Flags absl or ml_collections cannot parse, and values out of range, as a new user typed them: one line
    naming the flag, exit 2, nothing written."""
    r = _cli(*(a.format(tmp=tmp_path) for a in args))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert names in last, last
    assert not (tmp_path / "w").exists() and not (tmp_path / "raw").exists()


def test_dashed_config_override_is_accepted(tmp_path):
    r = run_cli(tmp_path / "run", extra=["--config.train.log-every=1"], **{"train.steps": 0})
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-3000:]


# ---- the exit-code table ------------------------------------------------------------------------------------

def _error_classes() -> dict[str, type]:
    """Every MirageError subclass the packages define, by name (each module defining one is imported)."""
    import ast
    import importlib

    from mirage_base.errors import MirageError

    for pkg in ("mirage_base", "data_pipeline", "mirage_jax", "tools"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text())
            if any(isinstance(n, ast.ClassDef) and n.name.endswith("Error") for n in tree.body):
                importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    out, todo = {}, [MirageError]
    while todo:
        for sub in todo.pop().__subclasses__():
            out[sub.__name__] = sub
            todo.append(sub)
    return out


def _readme_exit_table() -> dict[int, tuple[str, set[str]]]:
    text = (ROOT / "README.md").read_text().split("### Exit status", 1)[1]
    rows = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| (\d+) \| (.+?) \| (.+?) \|", line.strip())
        if m:
            rows[int(m.group(1))] = (m.group(2), set(re.findall(r"`(\w+)`", m.group(3))))
        elif rows and not line.startswith("|"):
            break
    return rows


def test_readme_exit_table_is_the_code_table():
    """README's table lists every code of `ExitCode` with its `EXIT_MEANINGS` text, and under each code exactly
    the MirageError classes that exit with it (a new class or a changed code fails here until README says so)."""
    from mirage_base.errors import EXIT_MEANINGS, ExitCode

    table = _readme_exit_table()
    assert sorted(table) == sorted(int(c) for c in ExitCode)
    for code in ExitCode:
        assert table[code][0] == EXIT_MEANINGS[code], code
    classes = _error_classes()
    assert {"SafetensorsError", "CheckpointError", "MeshConfigError", "RulesError", "LayoutError"} <= set(classes)
    for code in ExitCode:
        if code in (ExitCode.OK, ExitCode.FAILURE):
            continue  # Preempted (not an error) and "anything that is not a MirageError"
        assert table[code][1] == {n for n, c in classes.items() if c.exit_code == code}, code
    assert table[ExitCode.OK][1] == {"Preempted"} and table[ExitCode.FAILURE][1] == {"MirageError"}
    assert all(isinstance(c.exit_code, ExitCode) for c in classes.values())


def _commands() -> list[str]:
    """Every `python -m X` README names, and every bench/ module with a `__main__` block."""
    names = set(re.findall(r"python -m ([a-z_][\w.]*)", (ROOT / "README.md").read_text()))
    names |= {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")
              if p.stem != "__main__" and 'if __name__ == "__main__":' in p.read_text()}
    return sorted(names)


def test_help_exits_0_and_lists_the_flags():
    """`--help` on every command a user is told about: exit 0 and the flags listed (absl's `  --name: help`
    lines, or argparse's usage), not absl's exit 1 nor a docstring alone (aot's flags live in aot/plan.py)."""
    from concurrent.futures import ThreadPoolExecutor

    cmds = _commands()
    assert {"mirage_jax.train", "mirage_jax.aot", "bench.cpu_allreduce", "bench.multiprocess_step",
            "bench.sampling"} <= set(cmds), cmds
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(cmds, pool.map(lambda m: _cli(m, "--help"), cmds), strict=True))
    absl_line = re.compile(r"^\s+--(\[no\])?\w+: ", re.M)
    for m, r in results.items():
        assert r.returncode == 0 and "Traceback" not in r.stderr, (m, r.returncode, r.stderr[-2000:])
        assert absl_line.search(r.stdout) or (r.stdout.startswith("usage: ") and "-h, --help" in r.stdout), \
            (m, r.stdout[:2000])
    assert re.search(r"^\s+--topology: ", results["mirage_jax.aot"].stdout, re.M)
    assert "SHARDS" in results["bench.multiprocess_step"].stdout
    assert "--verbosity" not in results["mirage_jax.train"].stdout  # the command's flags, not absl's own
    full = _cli("mirage_jax.train", "--helpfull")  # every flag, the libraries' too
    assert full.returncode == 0 and "--verbosity" in full.stdout and "--workdir" in full.stdout


def test_mesh_that_does_not_fit_is_a_config_error_exit_2(tmp_path):
    r = _cli("mirage_jax.train", "--config=configs/tiny.py:fast", f"--workdir={tmp_path}/w",
             "--config.mesh.ici.fsdp=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "mesh.ici: sizes" in r.stderr.strip().splitlines()[-1]


def test_prepare_user_error_is_one_line_exit_2_and_a_bug_keeps_its_traceback(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.mp4").write_bytes(b"")
    r = _cli("data_pipeline.prepare", f"--input={tmp_path}/raw", f"--output={tmp_path}/out", "--video-encoder=nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "unknown video encoder 'nope'" in r.stderr.strip().splitlines()[-1]
    bug = ("import runpy, sys\nfrom data_pipeline import prepare\n"
           "def bug(argv):\n    raise ValueError('a bug, not a user error')\n"
           "prepare._run_from_flags = bug\n"
           f"sys.argv = ['prepare', '--input={tmp_path}/raw', '--output={tmp_path}/out']\n"
           "runpy.run_module('data_pipeline.prepare', run_name='__main__')\n")
    r = _cli_code(bug)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: a bug, not a user error" in r.stderr


@pytest.mark.parametrize("runner, workers_given, address, flag", [
    ("local", True, None, "--workers: only --runner=dask uses it"),
    ("local", False, "tcp://h:8786", "--dask-address: only --runner=dask uses it"),
    ("DataflowRunner", True, None, "--workers: only --runner=dask uses it (this run is --runner=DataflowRunner)"),
    ("dask", True, "tcp://h:8786", "--workers with --dask-address=tcp://h:8786"),
    ("dask", False, "garbage", "--dask-address=garbage: not a Dask scheduler address (missing port number"),
    ("dask", False, "http://h:22", "--dask-address=http://h:22: not a Dask scheduler address (unknown address scheme"),
    ("Dask", False, None, "--runner=Dask: no such runner; use local, dask, or a Beam runner's name"),
    # a dotted path Beam imports: no such module (ModuleNotFoundError) or not a runner (TypeError) were tracebacks
    ("foo.bar.Baz", False, None, "--runner=foo.bar.Baz: no such runner"),
    ("os.path.join", False, None, "--runner=os.path.join: no such runner"),
])
def test_prepare_refuses_dask_flags_its_runner_would_ignore(runner, workers_given, address, flag):
    from data_pipeline.prepare_flags import check_runner_flags

    with pytest.raises(InputError, match=re.escape(flag)):
        check_runner_flags(runner, workers_given, address)
    for ok in [("dask", True, None), ("dask", False, "tcp://h:8786"), ("local", False, None),
               ("DirectRunner", False, None), ("apache_beam.runners.direct.direct_runner.BundleBasedDirectRunner",
                                               False, None)]:
        check_runner_flags(*ok)


def test_prepare_ignores_a_ctrl_c_once_its_output_is_complete(tmp_path):
    """A Ctrl-C that lands after prepare's run has finished (its manifest written; the interpreter exiting, Dask's
    atexit cluster shutdown running) printed 'Exception ignored in atexit callback ... KeyboardInterrupt' after the
    summary line: the CLI ignores SIGINT once main has returned. Here the run is a stub that succeeds and the
    Ctrl-C comes from an atexit hook; without the fix the same code prints the KeyboardInterrupt."""
    code = ("import atexit, os, runpy, signal, sys, time\nfrom data_pipeline import prepare\n"
            "prepare.main = lambda argv: print('done')\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))\n"
            f"sys.argv = ['prepare', '--input={tmp_path}', '--output={tmp_path}/out']\n"
            "runpy.run_module('data_pipeline.prepare', run_name='__main__')\n")
    r = _cli_code(code)
    assert r.returncode == 0 and r.stdout.strip() == "done", (r.returncode, r.stdout, r.stderr[-3000:])
    assert "KeyboardInterrupt" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_prepare_with_a_malformed_dask_address_is_one_line_without_dasks_traceback(tmp_path):
    """A --dask-address Dask cannot parse used to reach dask.distributed's Client, whose __del__ then printed an
    'Exception ignored' traceback (and waited 10 s) after prepare's line: now refused before any Client exists."""
    (tmp_path / "raw").mkdir()
    r = _cli("data_pipeline.prepare", f"--input={tmp_path}/raw", f"--output={tmp_path}/out", "--runner=dask",
             "--dask-address=http://127.0.0.1:22")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    assert "--dask-address=http://127.0.0.1:22: not a Dask scheduler address" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_prepare_with_workers_but_no_dask_runner_is_one_line_before_any_work(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.mp4").write_bytes(b"")
    r = _cli("data_pipeline.prepare", f"--input={tmp_path}/raw", f"--output={tmp_path}/out", "--workers=4")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "--workers: only --runner=dask uses it" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_an_impossible_curation_threshold_before_any_work(tmp_path):
    """--min-visible=2 (a fraction) used to run every stage and end in 'no clips' after all the decoding: the
    threshold flags carry their ranges (as --face-every does), so absl refuses it in one line, exit 2."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.mp4").write_bytes(b"")
    r = _cli("data_pipeline.prepare", f"--input={tmp_path}/raw", f"--output={tmp_path}/out", "--curate",
             "--min-visible=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].endswith("--min_visible=2: 2.0 is not a number in the range [0.0, 1.0]")
    assert not (tmp_path / "out").exists()
    r = _cli("data_pipeline.prepare", f"--input={tmp_path}/raw", f"--output={tmp_path}/out", "--curate",
             "--min-confidence=nan")  # no bounds of its own, and nan passes absl's: the manifest got NaN
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].endswith("--min_confidence=nan: must be a finite number")
    r = _cli("data_pipeline.prepare", f"--input={tmp_path}/raw", f"--output={tmp_path}/out",
             f"--syncnet-weights={tmp_path}/w.model")  # no --curate: it used to be ignored, exit 0
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "w.model: only curation's sync stage uses it (this run has no --curate)" in r.stderr.splitlines()[-1]


def test_prepare_sources_of_different_sizes_without_size_is_one_line(tmp_path):
    import media_inputs as mi

    (tmp_path / "raw").mkdir()
    mi.write(str(tmp_path / "raw" / "a.mp4"), mi.coded_frames(5, 32, 16))
    mi.write(str(tmp_path / "raw" / "b.mp4"), mi.coded_frames(5, 16, 32))
    r = _cli("data_pipeline.prepare", f"--input={tmp_path}/raw", f"--output={tmp_path}/out")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "sources have different frame sizes (" in last and "32x16" in last and "16x32" in last, last
    assert "set --size=WxH" in last and not (tmp_path / "out" / "manifest.json").exists()


def _cli_code(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


# ---- saved configs: parsed back into RunConfig by every checkpoint reader ---------------------------------------

def _edited(tiny_run, tmp_path, edit) -> str:
    """A copy of the run whose saved config.json (`checkpoints/1/config/metadata`) `edit` changed in place."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    meta = dst / "checkpoints" / "1" / "config" / "metadata"
    cfg = json.loads(meta.read_text())
    edit(cfg)
    meta.write_text(json.dumps(cfg))
    return str(dst)


def _wav(path) -> str:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    return str(path)


@pytest.mark.parametrize("tool", ["export", pytest.param("generate", marks=pytest.mark.slow),
                                  pytest.param("eval", marks=pytest.mark.slow)])  # the same reader: one by default
def test_saved_config_missing_a_field_is_one_line_naming_it(tiny_run, tmp_path, tool):
    """Hand-edited: the saved config lost `shapes.latent_frames` (a field without a default). Every reader
    parses it through RunConfig: one line naming the saved file and the field, exit 2 (CheckpointError)."""
    work = _edited(tiny_run, tmp_path, lambda c: c["shapes"].pop("latent_frames"))
    args = {"export": ["mirage_jax.export", f"--checkpoint={work}", f"--out={tmp_path}/exp"],
            "generate": ["mirage_jax.generate", f"--checkpoint={work}", f"--out={tmp_path}/x.mp4",
                         f"--audio={_wav(tmp_path / 's.wav')}", f"--data={tmp_path}"],
            "eval": ["mirage_jax.eval", f"--checkpoint={work}", f"--data={tmp_path}"]}[tool]
    r = _cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("CHECKPOINT ERROR: ") and "shapes.latent_frames: missing" in last, last
    assert "checkpoints/1/config/metadata" in last, last
    assert not (tmp_path / "exp").exists() and not (tmp_path / "x.mp4").exists()


def test_saved_config_without_mesh_rules_loads_with_the_default_rules(tiny_run, tmp_path):
    """A config saved before `mesh.rules` existed (a KeyError traceback once): the sections and fields added
    since take their defaults, so the checkpoint loads onto a mesh with the default parameter rules."""
    from mirage_jax.checkpoint_format import read_config, resolve_step_dir
    from mirage_jax.inference import load_run
    from mirage_jax.run_config import PARAM_RULES
    from mirage_jax.sampling import generation_mesh

    work = _edited(tiny_run, tmp_path, lambda c: c["mesh"].pop("rules"))
    saved = read_config(resolve_step_dir(work))
    assert tuple(map(tuple, saved.mesh.rules["params"])) == PARAM_RULES
    run = load_run(work, mesh=generation_mesh())
    assert run.step == 1 and run.config.model == saved.model


@pytest.mark.slow  # loads the run in a subprocess
def test_a_cache_schedule_for_another_checkpoint_is_one_line(tiny_run, tmp_path):
    """eval --cache=mag with WORKDIR/cache_schedule.json calibrated for another checkpoint: exit 2, one line
    naming both checkpoints (the file's and this one)."""
    import json

    work = tmp_path / "run"
    shutil.copytree(tiny_run, work)
    sched = {"format": 1, "steps": 16, "threshold": 0.06, "max_skips": 2, "retention": 0.2, "skip": [False] * 16,
             "ratios": [1.0] * 16, "calibration": {},
             "checkpoint": {"step": 999, "weights": "params", "params_sha256": "f" * 64}}
    (work / "cache_schedule.json").write_text(json.dumps(sched))
    r = _cli("mirage_jax.eval", f"--checkpoint={work}", f"--data={tmp_path}", "--cache=mag", "--steps=16")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "calibrated for checkpoint step 999" in last and "this one, step 1 (params" in last, last


def test_calibrate_cache_then_mag_generation_and_another_checkpoints_refusal(tiny_run, prepared_shards, tmp_path):
    """`generate --calibrate_cache` writes WORKDIR/cache_schedule.json for this checkpoint and step count (no
    video); `--cache=mag` then samples with its skip mask and names the file in the sidecar; the same file for
    other weights of the run (`--ema`) is refused: one line naming both, exit 2, no video."""
    work = tmp_path / "run"
    shutil.copytree(tiny_run, work)
    speech = _wav(tmp_path / "s.wav")
    gen = ["mirage_jax.generate", f"--checkpoint={work}", f"--data={prepared_shards}", f"--audio={speech}",
           "--steps=8", "--cfg_audio=3", "--cfg_text=1.5"]
    r = _cli(*gen, f"--out={tmp_path}/cal.mp4", "--calibrate_cache")
    assert r.returncode == 0, r.stderr[-3000:]
    path = work / "cache_schedule.json"
    sched = json.loads(path.read_text())
    assert sched["steps"] == 8 and len(sched["skip"]) == 8 and sched["checkpoint"]["step"] == 1
    assert sched["checkpoint"]["weights"] == "params" and not any(sched["skip"][:2])  # retention: never the first
    assert not (tmp_path / "cal.mp4").exists()

    r = _cli(*gen, f"--out={tmp_path}/mag.mp4", "--cache=mag")
    assert r.returncode == 0, r.stderr[-3000:]
    side = json.loads((tmp_path / "mag.json").read_text())
    assert side["cache_schedule"] == str(path)
    assert side["settings"]["cache"] == "mag" and side["settings"]["skip"] == sched["skip"]
    assert (tmp_path / "mag.mp4").stat().st_size > 0

    r = _cli(*gen, f"--out={tmp_path}/ema.mp4", "--cache=mag", "--ema")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert f"--cache_schedule={path} was calibrated for checkpoint step 1 (params" in last, last
    assert "not for this one, step 1 (ema" in last, last
    assert not (tmp_path / "ema.mp4").exists()

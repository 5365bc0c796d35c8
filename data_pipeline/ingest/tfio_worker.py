"""Runs INSIDE the tensorflow-io venv (.venv-tfio, requirements-tfio.txt), never in the JAX venv.

    .venv-tfio/bin/python data_pipeline/ingest/tfio_worker.py JOBS.json

JOBS.json: {"rate": 16000, "jobs": [{"wav": in.wav, "npy": out.npy}, ...]}. For each job it decodes the
WAV with tfio.audio.AudioIOTensor, averages channels to mono, resamples to `rate` with
tfio.audio.resample, and saves float32 [samples] with numpy.save(allow_pickle=False). Only WAV and .npy
cross the process boundary: no pickle. Imports nothing from data_pipeline (it cannot: numpy<2 here).
"""

import json
import sys


def main(jobs_path: str) -> None:
    import numpy as np
    import tensorflow as tf
    import tensorflow_io as tfio

    spec = json.load(open(jobs_path))
    rate_out = int(spec["rate"])
    for job in spec["jobs"]:
        audio = tfio.audio.AudioIOTensor(job["wav"])
        x = audio.to_tensor()
        if x.dtype == tf.int16:
            x = tf.cast(x, tf.float32) / 32768.0
        else:
            x = tf.cast(x, tf.float32)
        x = tf.reduce_mean(x, axis=1, keepdims=True)
        rate_in = int(audio.rate.numpy())
        if rate_in != rate_out:
            x = tfio.audio.resample(x, rate_in=rate_in, rate_out=rate_out)
        np.save(job["npy"], x.numpy()[:, 0].astype(np.float32), allow_pickle=False)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tfio_worker.py JOBS.json")
    main(sys.argv[1])

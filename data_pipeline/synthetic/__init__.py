"""Synthetic A-roll: talking heads whose mouth follows a speech waveform (the demo's and the tests' data).

- `talking_head`: a cartoon face (identity, head motion, blinks) and its mouth opening per frame;
- `speech`: real speech (espeak-ng, varied voices) at 16 kHz and the per-frame mouth opening it implies.

`python -m data_pipeline.synthesize` (data_pipeline/synthesize.py) writes the clips with `ingest.media`.
"""

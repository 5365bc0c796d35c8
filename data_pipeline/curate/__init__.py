"""Curation of raw A-roll before ingest (`prepare --curate[=shots,faces,crop,sync,motion]`), as Beam stages.

Each stage is its own module and DoFn (`stage.CurateStage`) over one `plan.SourcePlan` per source, run in the
order of `STAGES`: `shots` (PySceneDetect cuts; clips are planned inside shots), `speaker` (`faces`: exactly one
tracked face for the whole clip, large enough), `crop` (`--crop=face`: a smoothed crop window following the
face), `sync` (SyncNet offset + confidence on the face crop, with `--syncnet-weights`), `motion` (camera pans,
near-static video). A stage only looks at clips no earlier stage dropped; every drop keeps its reason, and
`report` turns the plans into manifest.json's `curation` and a contact sheet PNG. docs/data_pipeline.md.
"""

from __future__ import annotations

STAGES = ("shots", "faces", "crop", "sync", "motion")
NEEDS = {"crop": "faces", "sync": "faces"}  # a stage that uses another's result

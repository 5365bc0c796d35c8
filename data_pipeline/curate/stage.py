"""The Beam side of curation: `StartPlan` (a source path -> its first SourcePlan: probed, cut into plain clips),
`DecodePass` (curate.decode: the one decode per source that shots, faces and motion share) and `CurateStage`
(one stage's `apply(plan, cfg)` on a SourcePlan), each wrapped by `add_stages` in
data_pipeline.ingest.isolation's `Isolated` so that it maps prepare's batches of sources (lists cut before the
pipeline, `prepare.source_batches`): no side inputs, no tagged outputs, the runner-portable subset of
data_pipeline.engine. A stage that raises on a source (an undecodable frame, no audio where it needs some, a
failed scorer) turns that source into `isolation.Failure(path, "curate:<stage>", why)`: later stages pass it
through, ingest passes it on into prepare's stream, and the manifest lists it in `sources.failed`; every other
source goes on (the one fault-isolation mechanism of prepare)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam

from data_pipeline.curate.plan import CurateConfig, SourcePlan, start_plan
from data_pipeline.ingest import isolation

Apply = Callable[[SourcePlan, CurateConfig], None]


class StartPlan(beam.DoFn):
    """path -> SourcePlan (probe + plain clip plan); `add_stages` names its failures `curate:probe`."""

    def __init__(self, root: str, clip_frames: int, min_frames: int, temporal_factor: int, seed: int,
                 target: tuple[int, int] | None):
        self.args = (root, clip_frames, min_frames, temporal_factor, seed, target)

    def process(self, path: str) -> Iterator[SourcePlan]:
        yield start_plan(path, *self.args)


class DecodePass(beam.DoFn):
    """curate.decode on each SourcePlan: the source decoded once, what shots, faces and motion measure on its
    frames left in `plan.measured`. A pass, not a stage of the report (`plan.ran` is untouched); `add_stages`
    names its failures `curate:decode`. The module is imported, and its face detector loaded, in `setup` (once
    per worker process, as CurateStage does)."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg

    def setup(self) -> None:
        from data_pipeline.curate import decode

        decode.setup()
        self.fn: Apply = decode.apply

    def process(self, plan: SourcePlan) -> Iterator[SourcePlan]:
        self.fn(plan, self.cfg)
        yield plan


class CurateStage(beam.DoFn):
    """One curation stage over SourcePlans: `module`.`attr`(plan, cfg) updates the plan in place and the stage's
    `name` joins `plan.ran` (the stages the report lists). The module is imported in `setup`, and its optional
    `setup()` (loading a model through ingest.per_worker.load_once) runs there: once per worker process, and
    nothing unpicklable travels with the pipeline."""

    def __init__(self, name: str, module: str, cfg: CurateConfig, attr: str = "apply"):
        self.name, self.module, self.cfg, self.attr = name, module, cfg, attr

    def setup(self) -> None:
        import importlib

        mod = importlib.import_module(self.module)
        self.fn: Apply = getattr(mod, self.attr)
        if hasattr(mod, "setup"):
            mod.setup()

    def process(self, plan: SourcePlan) -> Iterator[SourcePlan]:
        self.fn(plan, self.cfg)
        plan.ran.append(self.name)
        yield plan


def source_of(item: Any) -> str:
    """The source path of a batch item: a path (before StartPlan) or a SourcePlan."""
    return item if isinstance(item, str) else item.path


MODULES = {"shots": "data_pipeline.curate.shots", "faces": "data_pipeline.curate.speaker",
           "crop": "data_pipeline.curate.crop", "sync": "data_pipeline.curate.sync",
           "motion": "data_pipeline.curate.motion"}


def add_stages(batches: beam.PCollection, cfg: CurateConfig, start: StartPlan, sized: bool) -> beam.PCollection:
    """Batches of source paths -> batches of SourcePlans (or Failures): probed, decoded once (curate.decode,
    when a stage that reads frames is on: `DecodePass`), every stage `cfg` turns on (in STAGES order), then the
    contact sheet's thumbnails."""
    from data_pipeline.curate import STAGES, decode

    def isolated(fn: beam.DoFn, name: str) -> beam.ParDo:
        return beam.ParDo(isolation.Isolated(fn, f"curate:{name}", source_of))

    plans = batches | "Curate:plan" >> isolated(start, "probe")
    if decode.needed(cfg):  # one decode per source, shared by shots, faces and motion
        plans = plans | "Curate:decode" >> isolated(DecodePass(cfg), "decode")
    for name in STAGES:
        if cfg.on(name) and (name != "crop" or sized):
            plans = plans | f"Curate:{name}" >> isolated(CurateStage(name, MODULES[name], cfg), name)
    return plans | "Curate:thumbnails" >> isolated(
        CurateStage("thumbnails", "data_pipeline.curate.report", cfg, "thumbnails"), "thumbnails")

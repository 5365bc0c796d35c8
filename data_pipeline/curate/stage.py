"""The Beam side of curation: `CurateStage`, a DoFn that runs one stage's `apply(plan, cfg)` on each source's
plan, and `StartPlan`, which probes a source and makes its first plan. A stage that raises on a source (an
undecodable frame, no audio where it needs some, a failed scorer) marks the plan with
`<path>: curate:<stage>: <why>`; later stages pass it through untouched and ingest reports it in
`sources.failed` and keeps the source out, while every other source goes on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import apache_beam as beam

from data_pipeline.curate.plan import CurateConfig, SourcePlan, start_plan

log = logging.getLogger(__name__)

Apply = Callable[[SourcePlan, CurateConfig], None]


def run_stage(name: str, fn: Apply, plan: SourcePlan, cfg: CurateConfig) -> SourcePlan:
    """`fn(plan, cfg)` unless the plan already failed; an exception marks the plan failed, naming the stage."""
    if plan.error is not None:
        return plan
    try:
        fn(plan, cfg)
        plan.ran.append(name)
    except Exception as e:  # noqa: BLE001 - any failure on one source keeps that source out, named, not the run
        msg = str(e) or type(e).__name__
        plan.error = f"{plan.path}: curate:{name}: {msg.removeprefix(plan.path + ': ')}"
        log.warning("curation: %s", plan.error)
    return plan


class StartPlan(beam.DoFn):
    """path -> SourcePlan (probe + plain clip plan); an unreadable source gets an error plan (`curate:probe`)."""

    def __init__(self, root: str, clip_frames: int, min_frames: int, temporal_factor: int, seed: int,
                 target: tuple[int, int] | None):
        self.args = (root, clip_frames, min_frames, temporal_factor, seed, target)

    def process(self, path: str) -> Iterator[SourcePlan]:
        try:
            yield start_plan(path, *self.args)
        except Exception as e:  # noqa: BLE001 - see run_stage
            from data_pipeline.ingest import sources

            p = SourcePlan(path, sources.source_id(path, self.args[0]))
            msg = str(e) or type(e).__name__
            p.error = f"{path}: curate:probe: {msg.removeprefix(path + ': ')}"
            yield p


class CurateStage(beam.DoFn):
    """One curation stage over SourcePlans: `module`.`attr`(plan, cfg), the module imported in `setup` (once per
    worker, so models load there and nothing unpicklable travels with the pipeline)."""

    def __init__(self, name: str, module: str, cfg: CurateConfig, attr: str = "apply"):
        self.name, self.module, self.cfg, self.attr = name, module, cfg, attr

    def setup(self) -> None:
        import importlib

        self.fn: Apply = getattr(importlib.import_module(self.module), self.attr)

    def process(self, plan: SourcePlan) -> Iterator[SourcePlan]:
        yield run_stage(self.name, self.fn, plan, self.cfg)


MODULES = {"shots": "data_pipeline.curate.shots", "faces": "data_pipeline.curate.speaker",
           "crop": "data_pipeline.curate.crop", "sync": "data_pipeline.curate.sync",
           "motion": "data_pipeline.curate.motion"}


def add_stages(paths: beam.PCollection, cfg: CurateConfig, start: StartPlan, sized: bool) -> beam.PCollection:
    """paths -> SourcePlans after every stage `cfg` turns on (in STAGES order), then the contact sheet's
    thumbnails."""
    from data_pipeline.curate import STAGES

    plans = paths | "Curate:plan" >> beam.ParDo(start)
    for name in STAGES:
        if cfg.on(name) and (name != "crop" or sized):
            plans = plans | f"Curate:{name}" >> beam.ParDo(CurateStage(name, MODULES[name], cfg))
    return plans | "Curate:thumbnails" >> beam.ParDo(
        CurateStage("thumbnails", "data_pipeline.curate.report", cfg, "thumbnails"))

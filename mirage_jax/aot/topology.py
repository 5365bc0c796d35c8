"""TPU slices for scale planning: Cloud names (`v5p-256`) and libtpu topology names (`v5p:4x4x8`) resolved to a
chip generation (`mirage_jax.aot.chips.CHIPS`) and chip count, and the slice's abstract devices from libtpu
(`jax.experimental.topologies`), over which `mirage_jax.aot.plan` compiles the train step without the pod.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from mirage_base.errors import MirageError
from mirage_jax.aot.chips import CHIPS, ChipSpec

CLOUD_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}

# Standard slice shapes by chip count (Cloud's accelerator types); any `gen:AxBxC` is accepted as well.
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 8192: "16x16x32"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


class TopologyError(MirageError, ValueError):
    """`--topology` names no known TPU slice, or libtpu's description disagrees with it."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A resolved TPU slice: the name asked for, libtpu's topology name, chip spec and chip count."""

    requested: str
    name: str  # e.g. "v5p:4x4x8"
    chip: ChipSpec
    chips: int


def parse_topology(text: str) -> Topology:
    """`v5p-256` (Cloud accelerator type) or `v5p:4x4x8` (libtpu topology name) -> Topology.

    Cloud names count TensorCores on v4/v5p (2 per chip) and chips on v5e/v6e, so v5p-256 is 128 chips.
    """
    raw = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)[:](\d+(?:x\d+)+)", raw)
    if m:
        gen, shape = CLOUD_ALIASES.get(m.group(1), m.group(1)), m.group(2)
        if gen not in CHIPS:
            raise TopologyError(f"--topology={text}: unknown TPU generation {m.group(1)!r}; known: {sorted(CHIPS)}")
        chip = CHIPS[gen]
        chips = math.prod(int(d) for d in shape.split("x"))
        return Topology(text, f"{gen}:{shape}", chip, chips)
    m = re.fullmatch(r"([a-z0-9]+?)-(\d+)", raw)
    if not m:
        raise TopologyError(f"--topology={text}: expected a Cloud name such as v5p-256 / v6e-256 or a libtpu "
                            "topology such as v5p:4x4x8 / v6e:16x16")
    gen = CLOUD_ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise TopologyError(f"--topology={text}: unknown TPU generation {m.group(1)!r}; known: {sorted(CHIPS)}")
    chip, units = CHIPS[gen], int(m.group(2))
    if units % chip.cloud_units_per_chip:
        raise TopologyError(f"--topology={text}: {gen} names count {chip.cloud_units_per_chip} TensorCores per "
                            f"chip, so the number must be a multiple of {chip.cloud_units_per_chip}")
    chips = units // chip.cloud_units_per_chip
    table = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
    if chips not in table:
        raise TopologyError(f"--topology={text}: no standard {gen} slice of {chips} chips; known chip counts "
                            f"{sorted(table)}, or give the shape, e.g. {gen}:{next(iter(table.values()))}")
    return Topology(text, f"{gen}:{table[chips]}", chip, chips)


LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"  # libtpu's one-process-per-host lock (ALLOW_MULTIPLE_LIBTPU_LOAD=1 skips it)


def topology_devices(topo: Topology) -> list[Any]:
    """The slice's abstract devices from libtpu; raises with an install hint when libtpu is missing."""
    from jax.experimental import topologies

    try:
        extra = {"chip_config_name": topo.chip.chip_config} if topo.chip.chip_config else {}
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, **extra)
    except Exception as e:  # noqa: BLE001 - libtpu raises several types; all mean "cannot describe"
        if "lockfile" in str(e):  # another process has libtpu loaded (an aot compile, a test): not an install issue
            raise TopologyError(
                f"--topology={topo.requested}: libtpu is loaded by another process on this host (it holds "
                f"{LIBTPU_LOCKFILE}: `lsof {LIBTPU_LOCKFILE}` names it); rerun once it has ended, or set "
                "ALLOW_MULTIPLE_LIBTPU_LOAD=1 on a host that runs no TPU job (aot only compiles)") from e
        raise TopologyError(f"--topology={topo.requested}: libtpu could not describe {topo.name!r} ({e}); "
                            "install the pinned libtpu with `pip install -r requirements-tpu.txt`") from e
    devices = list(desc.devices)
    if len(devices) % topo.chips:
        raise TopologyError(f"--topology={topo.requested}: libtpu gives {len(devices)} devices for {topo.chips} "
                            "chips; expected a whole number of devices per chip")
    return devices

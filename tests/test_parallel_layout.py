"""Mesh construction, logical rules and the pre-compile layout checks (no compilation)."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mirage_jax.parallel import checks
from mirage_jax.parallel import mesh as mesh_lib
from mirage_jax.parallel import rules as rules_lib
from mirage_jax.run_config import ACTIVATION_RULES, PARAM_RULES, MeshConfig
from mirage_jax.train import data as data_lib


def mesh_cfg(**ici):
    base = dict(data=1, fsdp=-1, sequence=1, tensor=1)
    base.update(ici)
    cfg = MeshConfig(ici=base, dcn=dict(data=-1, fsdp=1, sequence=1, tensor=1))
    cfg.validate()
    return cfg


def test_rest_axis_takes_the_remaining_devices():
    m = mesh_lib.build_mesh(mesh_cfg(sequence=2, tensor=2))
    assert dict(m.shape) == {"data": 1, "fsdp": 2, "sequence": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


@pytest.mark.parametrize("ici, match", [
    (dict(fsdp=3, data=-1), r"mesh.ici: the fixed sizes .* multiply to 3, which does not divide the 8"),
    (dict(fsdp=2, data=2), r"mesh.ici: sizes .* multiply to 4 but there are 8"),
    (dict(fsdp=-1, data=-1), r"mesh.ici: at most one axis may be -1"),
    (dict(pipeline=2), r"mesh.ici: unknown axis \['pipeline'\]"),
    (dict(tensor=0), r"mesh.ici.tensor=0"),
])
def test_mesh_that_does_not_divide_the_devices_is_refused(ici, match):
    with pytest.raises(mesh_lib.MeshConfigError, match=match):
        mesh_lib.build_mesh(mesh_cfg(**ici))


def test_heads_not_divisible_by_tensor_axis():
    m = mesh_lib.build_mesh(mesh_cfg(tensor=8))
    with pytest.raises(checks.LayoutError, match=r"model.num_heads=4 is not divisible by the 8 devices"):
        checks.check_layout(m, ACTIVATION_RULES, num_heads=4, global_batch=8, grad_accum=1)


def test_batch_not_divisible_by_batch_axes():
    m = mesh_lib.build_mesh(mesh_cfg())
    with pytest.raises(checks.LayoutError, match=r"train.global_batch_size=12 .* multiple of 8"):
        checks.check_layout(m, ACTIVATION_RULES, num_heads=4, global_batch=12, grad_accum=1)
    with pytest.raises(checks.LayoutError, match=r"micro-batch of 4 samples .* multiple of 16"):
        checks.check_layout(m, ACTIVATION_RULES, num_heads=4, global_batch=8, grad_accum=2)
    with pytest.raises(checks.LayoutError, match=r"not divisible by train.grad_accum=3"):
        checks.check_layout(m, ACTIVATION_RULES, num_heads=4, global_batch=8, grad_accum=3)


def test_rule_naming_a_missing_mesh_axis_is_refused():
    m = mesh_lib.build_mesh(mesh_cfg())
    with pytest.raises(rules_lib.RulesError, match=r"mesh.rules.params: rule 'embed' -> 'model' names no mesh axis"):
        rules_lib.normalize_rules(MeshConfig(rules=dict(params=(("embed", "model"),), activations=())), "params", m)


def test_param_spec_resolution_and_fallback():
    sizes = {"data": 1, "fsdp": 2, "sequence": 2, "tensor": 2}
    rules = rules_lib.normalize_rules(MeshConfig(), "params")
    assert rules == PARAM_RULES
    spec, fb = rules_lib.resolve_spec(("layers", "embed", "mlp"), (3, 64, 170), rules, sizes)
    assert spec == P(None, "fsdp", "tensor") and not fb
    spec, fb = rules_lib.resolve_spec(("layers", "embed", "mlp"), (3, 32, 85), rules, sizes)
    assert spec == P(None, "fsdp", None) and fb  # 85 hidden units: not divisible, replicated
    with pytest.raises(rules_lib.RulesError, match=r"no rule for logical axis 'experts'"):
        rules_lib.resolve_spec(("experts",), (4,), rules, sizes)


def test_each_process_feeds_its_own_batch_rows():
    m = mesh_lib.build_mesh(mesh_cfg(data=2, sequence=2))
    rows = data_lib.process_rows(m, ("data", "fsdp"), 8)
    assert (rows.start, rows.stop, rows.index, rows.count) == (0, 8, 0, 1)  # one process holds all rows

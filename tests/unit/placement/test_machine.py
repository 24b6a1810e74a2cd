from __future__ import annotations

import json
from pathlib import Path

import pytest

from pd_runtime.errors import ConfigError
from pd_runtime.placement import MachineDescription, load_machine
from pd_runtime.placement.machine import format_cpulist, parse_cpulist, pci_affinity
from pd_runtime.platform import Platform
from tests.unit.placement.helpers import MACHINES, machine


def test_cpulist_round_trip() -> None:
    cpus = parse_cpulist("0-3,8, 10-11")
    assert cpus == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpulist(cpus) == "0-3,8,10-11"
    assert format_cpulist((5,)) == "5"
    assert format_cpulist(()) == ""


def test_the_h200_description_loads_with_its_topology() -> None:
    m = machine("h200x8-2numa-4ib")
    assert [g.index for g in m.gpus] == list(range(8))
    assert m.cores_of(1)[:2] == (56, 57) and len(m.cores_of(1)) == 112
    assert m.has_nvlink and m.nvlinked(0, 7) is True
    assert [p.ucx_name for p in m.rdma or []] == ["mlx5_0:1", "mlx5_1:1", "mlx5_2:1", "mlx5_3:1"]
    # GPU 0 shares its PCIe switch with mlx5_0 (3 path components), nothing with mlx5_1.
    gpu0 = m.gpu(0).pci_path
    assert pci_affinity(gpu0, (m.rdma or [])[0].pci_path) == 3
    assert pci_affinity(gpu0, (m.rdma or [])[1].pci_path) == 0
    assert m.to_platform() == Platform("cuda", 8, m.cpu_cores)


def test_l40s_has_no_nvlink_and_no_rdma_and_cpu_only_has_no_gpu() -> None:
    l40s = machine("l40sx2")
    assert not l40s.has_nvlink and l40s.nvlinked(0, 1) is False and l40s.rdma == []
    cpu = machine("cpu-only")
    assert cpu.to_platform() == Platform("cpu", 0, (0, 1))


def test_yaml_and_json_round_trip(tmp_path: Path) -> None:
    original = machine("h200x8-2numa-4ib")
    (tmp_path / "m.yaml").write_text(original.to_yaml())
    (tmp_path / "m.json").write_text(json.dumps(original.model_dump(mode="json")))
    assert load_machine(tmp_path / "m.yaml") == original
    assert load_machine(tmp_path / "m.json") == original


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpus: [{index: 0}, {index: 0}]", "duplicate index"),
        ("gpus: [{index: 0, nvlink_peers: [3]}]", r"gpus.0.nvlink_peers: no GPU \[3\]"),
        ("gpus: [{index: 0, memory_gib: -1}]", "gpus.0.memory_gib"),
        ("rdma: [{name: mlx5_0, link_layer: Token-Ring}]", "rdma.0.link_layer"),
        ("- just a list", "must be a mapping"),
    ],
)
def test_bad_descriptions_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_machine(path)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_machine(tmp_path / "nope.yaml")


def test_every_fixture_loads() -> None:
    names = sorted(p.stem for p in MACHINES.glob("*.yaml"))
    assert names == ["cpu-only", "h200x8-2numa-4ib", "l40sx2"]
    assert all(isinstance(machine(n), MachineDescription) for n in names)

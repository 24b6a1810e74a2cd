"""Discovery against a stand-in NVML and a fake sysfs tree (no GPU, no driver needed)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pd_runtime.placement import WorkerRequest, discover_machine, place_workers
from pd_runtime.placement.discover import normalize_bus_id

# Two GPUs behind one PCIe switch with an InfiniBand NIC, on NUMA node 1, NVLinked to each other.
SWITCH = "pci0000:80/0000:80:01.0/0000:81:00.0"
GPU_PATHS = {0: f"{SWITCH}/0000:82:00.0/0000:83:00.0", 1: f"{SWITCH}/0000:82:01.0/0000:84:00.0"}
NIC_NEAR = f"{SWITCH}/0000:82:02.0/0000:85:00.0"
NIC_FAR = "pci0000:00/0000:00:03.0/0000:05:00.0"


@dataclass
class _Pci:
    busId: str  # NVML's own field name


@dataclass
class _Memory:
    total: int


class FakeNVML:
    """Stand-in for the ``pynvml`` module: the calls discovery makes, with NVML's names."""

    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0

    def __init__(self, names: list[str], nvlink: bool = True, fail_init: bool = False) -> None:
        self.names, self.nvlink, self.fail_init = names, nvlink, fail_init
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.names[h].encode()  # older bindings return bytes

    def nvmlDeviceGetPciInfo(self, h: int) -> _Pci:
        return _Pci(f"00000000:{GPU_PATHS[h].rsplit(':', 2)[-2]}:00.0".upper())

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _Memory:
        return _Memory(48 * 1024**3)

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        assert index == self.NVML_P2P_CAPS_INDEX_NVLINK
        return self.NVML_P2P_STATUS_OK if self.nvlink else 5  # 5: NVML_P2P_STATUS_NOT_SUPPORTED


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _device(sysfs: Path, pci_path: str, numa: int) -> Path:
    real = sysfs / "devices" / pci_path
    _write(real / "numa_node", f"{numa}\n")
    return real


def fake_sysfs(root: Path) -> Path:
    sysfs = root / "sys"
    for index, path in GPU_PATHS.items():
        real = _device(sysfs, path, 1)
        link = sysfs / "bus/pci/devices" / path.rsplit("/", 1)[-1]
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(real)
        assert index in (0, 1)
    for name, path, numa, state, layer in [
        ("mlx5_0", NIC_FAR, 0, "4: ACTIVE", "InfiniBand"),
        ("mlx5_1", NIC_NEAR, 1, "4: ACTIVE", "InfiniBand"),
        ("mlx5_2", NIC_NEAR.replace("85", "86"), 1, "1: DOWN", "Ethernet"),
    ]:
        real = _device(sysfs, path, numa)
        ib = sysfs / "class/infiniband" / name
        _write(ib / "ports/1/state", state + "\n")
        _write(ib / "ports/1/link_layer", layer + "\n")
        (ib / "device").symlink_to(real)
    _write(sysfs / "devices/system/node/node0/cpulist", "0-3\n")
    _write(sysfs / "devices/system/node/node1/cpulist", "4-7\n")
    return sysfs


def test_discovery_reads_gpus_nvlink_numa_and_rdma(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "gdrdrv").touch()
    nvml = FakeNVML(["NVIDIA L40S", "NVIDIA L40S"])
    m = discover_machine(nvml=nvml, sysfs=sysfs, dev=tmp_path / "dev", allowed_cpus={0, 1, 4, 5})
    assert nvml.shutdowns == 1
    assert [(g.index, g.name, g.memory_gib, g.numa_node) for g in m.gpus] == [
        (0, "NVIDIA L40S", 48.0, 1),
        (1, "NVIDIA L40S", 48.0, 1),
    ]
    assert m.gpus[0].pci_bus_id == "0000:83:00.0" and m.gpus[0].pci_path == GPU_PATHS[0]
    assert m.gpus[0].nvlink_peers == [1] and m.gpus[1].nvlink_peers == [0]
    # Only the cores this process may use; NUMA nodes as the kernel lists them.
    assert [(n.id, n.cpus) for n in m.numa_nodes] == [(0, [0, 1]), (1, [4, 5])]
    ports = {p.name: p for p in m.rdma or []}
    assert (ports["mlx5_1"].state, ports["mlx5_1"].numa_node) == ("ACTIVE", 1)
    assert ports["mlx5_1"].pci_path == NIC_NEAR
    assert not ports["mlx5_2"].active and ports["mlx5_2"].kind == "RoCE"
    assert m.gdrcopy

    # What was discovered places: a TP=2 worker on both GPUs, the NIC behind their switch.
    [placed] = place_workers([WorkerRequest("decode-0", "decode", 2)], m, device="cuda")
    assert placed.gpus == (0, 1) and placed.numa_node == 1 and placed.cpu_cores == (4, 5)
    assert placed.transport.net_devices == "mlx5_1:1" and placed.transport.gdr_copy


def test_no_driver_means_no_gpu_and_no_sysfs_means_one_node(tmp_path: Path) -> None:
    m = discover_machine(
        nvml=FakeNVML(["x"], fail_init=True), sysfs=tmp_path, dev=tmp_path, allowed_cpus={0, 1}
    )
    assert m.gpus == [] and m.rdma == [] and not m.gdrcopy
    assert [(n.id, n.cpus) for n in m.numa_nodes] == [(0, [0, 1])]


def test_gpus_without_nvlink_have_no_peers(tmp_path: Path) -> None:
    m = discover_machine(
        nvml=FakeNVML(["a", "b"], nvlink=False), sysfs=fake_sysfs(tmp_path), dev=tmp_path
    )
    assert [g.nvlink_peers for g in m.gpus] == [[], []] and not m.has_nvlink


def test_normalize_bus_id() -> None:
    assert normalize_bus_id(b"00000000:1A:00.0") == "0000:1a:00.0"
    assert normalize_bus_id("0001:C1:00.0") == "0001:c1:00.0"


def test_this_machine_is_described_without_a_gpu_driver() -> None:
    m = discover_machine()
    assert m.cpu_cores == tuple(sorted(os.sched_getaffinity(0)))


def test_the_stand_in_uses_real_nvml_names() -> None:
    import pynvml  # nvidia-ml-py, in the dev extra

    for name in [n for n in vars(FakeNVML) if n.startswith("nvml") or n.startswith("NVML_")]:
        assert hasattr(pynvml, name), name
    assert pynvml.NVML_P2P_CAPS_INDEX_NVLINK == FakeNVML.NVML_P2P_CAPS_INDEX_NVLINK
    assert pynvml.NVML_P2P_STATUS_OK == FakeNVML.NVML_P2P_STATUS_OK

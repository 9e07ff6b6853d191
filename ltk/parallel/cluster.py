"""What a cluster can do, in the few numbers the scaling simulator (ltk/parallel/simulator.py) needs.

A cluster is `nodes` identical nodes of `devices_per_node` devices. Each device computes at
`peak_flops` (dense matmul rate in the training dtype) and holds `memory_bytes`. Devices talk
over two kinds of link, each an alpha-beta (Hockney) link: a message of n bytes takes
α + n/β.

    intra-node   NVLink / NVSwitch: every device reaches every other device of its node at
                 β_intra bytes/s in each direction, after a per-message latency α_intra.
    inter-node   one network adapter (InfiniBand NIC) per device, β_inter bytes/s in each
                 direction, latency α_inter. A group of g devices per node crossing nodes
                 therefore has g NICs per node to share its traffic (rail-optimized
                 fabric, as DGX SuperPODs are built).

Bandwidths are per direction: a ring step sends n/p bytes and receives n/p bytes at the same
time on a full-duplex link, so the ring formulas use the one-direction rate.

Latencies: NCCL's own cost model (NVIDIA/nccl src/graph/tuning.cc, `hwLat`) charges roughly
0.5-3.4 µs per ring step over NVLink and 2.7-9.6 µs per step over the network, by protocol
(LL / LL128 / Simple), plus a fixed 6-8 µs per call; the presets take 1 µs and 5 µs per step.
They matter only for small messages (at 300 GB/s a 1 µs latency is the time of 300 kB).

Presets are node types: `load_cluster("dgx-a100", world=64)` gives as many nodes as the run
needs. A JSON file describes a real cluster and is taken as written:

    {"name": "my-cluster", "devices_per_node": 8, "nodes": 16, "peak_flops": 989.4e12,
     "memory_bytes": 85899345920, "intra_node_bandwidth": 450e9, "intra_node_latency": 1e-6,
     "inter_node_bandwidth": 50e9, "inter_node_latency": 5e-6}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

GiB = 2**30


@dataclass(frozen=True)
class Cluster:
    name: str
    devices_per_node: int
    nodes: int
    peak_flops: float  # per device, dense, in the training dtype (FLOP/s)
    memory_bytes: float  # per device
    intra_node_bandwidth: float  # bytes/s per device, one direction (NVLink)
    intra_node_latency: float  # s per message
    inter_node_bandwidth: float  # bytes/s per device, one direction (one NIC per device)
    inter_node_latency: float  # s per message

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "name":
                if not isinstance(v, str) or not v:
                    raise ValueError(f"cluster.name must be a non-empty string, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"cluster {self.name!r}: {f.name} must be a finite number, got {v!r}")
            if f.name in ("devices_per_node", "nodes") and (not float(v).is_integer() or v < 1):
                raise ValueError(f"cluster {self.name!r}: {f.name} must be a positive integer, got {v!r}")
            if f.name.endswith("latency") and v < 0:
                raise ValueError(f"cluster {self.name!r}: {f.name} must be >= 0, got {v}")
            if not f.name.endswith("latency") and v <= 0:
                raise ValueError(f"cluster {self.name!r}: {f.name} must be > 0, got {v}")
        object.__setattr__(self, "devices_per_node", int(self.devices_per_node))
        object.__setattr__(self, "nodes", int(self.nodes))

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes

    def scaled(self, world: int) -> "Cluster":
        """The same node type with at least enough nodes for `world` devices."""
        return replace(self, nodes=max(self.nodes, math.ceil(world / self.devices_per_node)))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


REQUIRED = tuple(f.name for f in fields(Cluster) if f.name != "name")


# == presets: node types, with the datasheet behind every number ============================
def dgx_a100(nodes: int = 1) -> Cluster:
    """NVIDIA DGX A100 (DGX A100 datasheet / user guide): 8 x A100 SXM4 80GB.
    A100 datasheet: BF16 tensor core 312 TFLOP/s dense (624 with sparsity); 80 GB HBM2e
    (81,920 MiB). Third-generation NVLink: 12 links x 50 GB/s = 600 GB/s per GPU in total,
    300 GB/s each direction, all-to-all through NVSwitch. Compute fabric: 8 single-port
    ConnectX-6 HDR InfiniBand adapters, 200 Gb/s = 25 GB/s per GPU each direction."""
    return Cluster("dgx-a100", 8, nodes, 312e12, 80 * GiB, 300e9, 1e-6, 200e9 / 8, 5e-6)


def dgx_h100(nodes: int = 1) -> Cluster:
    """NVIDIA DGX H100 (DGX H100 datasheet): 8 x H100 SXM5 80GB.
    H100 datasheet: BF16 1,979 TFLOP/s with sparsity = 989.4 dense; 80 GB HBM3. Fourth-
    generation NVLink: 18 links, 900 GB/s per GPU in total, 450 GB/s each direction, through
    NVSwitch. Compute fabric: 8 ConnectX-7 adapters, 400 Gb/s = 50 GB/s per GPU each direction."""
    return Cluster("dgx-h100", 8, nodes, 989.4e12, 80 * GiB, 450e9, 1e-6, 400e9 / 8, 5e-6)


def h200_node(nodes: int = 1) -> Cluster:
    """An HGX / DGX H200 node (H200 datasheet, DGX H200 datasheet): 8 x H200 SXM 141GB.
    Same Hopper compute as the H100 SXM (989.4 TFLOP/s BF16 dense) with 141 GB of HBM3e at
    4.8 TB/s; NVLink 900 GB/s per GPU in total (450 each direction); 8 ConnectX-7 400 Gb/s."""
    return Cluster("h200-node", 8, nodes, 989.4e12, 141 * GiB, 450e9, 1e-6, 400e9 / 8, 5e-6)


def cpu_gloo(processes: int = 2) -> Cluster:
    """`processes` gloo processes on one host (how the tests here run). No datasheet applies:
    a CPU's rate depends on model, clock, vector units and how many processes share it, and
    gloo sends through the loopback TCP stack. These are order-of-magnitude placeholders
    (one AVX2 core, 2 FMA units x 8 fp32 lanes x 2 FLOPs x ~3 GHz ~ 1e11 FLOP/s peak; gloo
    ~1 GB/s and ~50 µs per message); `simulator.measure_calibration` measures the real ones
    and `simulator.calibrated_cluster` puts them in."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB
        ram = 16 * GiB
    return Cluster("cpu-gloo", processes, 1, 1e11, ram / processes, 1e9, 5e-5, 1e9, 5e-5)


PRESETS = {"dgx-a100": dgx_a100, "dgx-h100": dgx_h100, "h200-node": h200_node, "cpu-gloo": cpu_gloo}


def cluster_from_dict(d: dict, default_name: str = "cluster") -> Cluster:
    """A Cluster from a dict with every field of REQUIRED (and optionally `name`); names what
    is missing or unknown."""
    if not isinstance(d, dict):
        raise ValueError(f"a cluster description must be a JSON object, got {type(d).__name__}")
    known = {"name", *REQUIRED}
    unknown = sorted(set(d) - known)
    missing = [k for k in REQUIRED if k not in d]
    if unknown:
        raise ValueError(f"cluster {d.get('name', default_name)!r}: unknown field(s) {unknown}; "
                         f"the fields are {sorted(known)}")
    if missing:
        raise ValueError(f"cluster {d.get('name', default_name)!r}: missing field(s) {missing}")
    return Cluster(**{"name": default_name, **d})


def load_cluster(spec: "str | Path | Cluster", world: int | None = None) -> Cluster:
    """A preset name (scaled to `world` devices), a path to a JSON description (taken as
    written: too few devices for `world` is an error), or a Cluster (returned as is)."""
    if isinstance(spec, Cluster):
        c = spec
    elif str(spec) in PRESETS:
        c = PRESETS[str(spec)]()
        if str(spec) == "cpu-gloo" and world:
            c = cpu_gloo(world)
        return c.scaled(world) if world else c
    else:
        path = Path(spec)
        if path.suffix != ".json" and not path.exists():
            raise ValueError(f"unknown cluster {str(spec)!r}: give a preset ({', '.join(PRESETS)}) or a .json file")
        if not path.is_file():
            raise FileNotFoundError(f"cluster description {str(path)!r} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cluster description {str(path)!r} is not valid JSON: {e}") from None
        c = cluster_from_dict(d, default_name=path.stem)
    if world is not None and world > c.devices:
        raise ValueError(f"cluster {c.name!r} has {c.devices} devices ({c.nodes} x {c.devices_per_node}); "
                         f"the run asks for {world}")
    return c

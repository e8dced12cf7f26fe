"""Hardware catalog: accelerators, local devices and links, each figure with its source.

Units are decimal, as in the paper: GB = 1e9 B, GB/s = 1e9 B/s, TFLOPS = 1e12 FLOP/s. Compute is
*dense* (no 2:4 sparsity) tensor-core peak with FP32 accumulation where the vendor gives both.
Link bandwidth is per GPU, per direction (what one GPU can push while receiving as much).

Extend or override with a TOML file (`--hardware FILE.toml`):

    [device.my-gpu]                 [link.my-ib]
    memory_gb = 96                  bandwidth_gbs = 50
    bandwidth_gbs = 4000            latency_us = 3.0
    bf16_tflops = 148
    fp8_tflops = 296
    kind = "gpu"                    # gpu | local | cpu
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from moeco.errors import ConfigError


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # "gpu" (discrete accelerator), "local" (unified-memory SoC), "cpu" (DRAM server)
    memory_gb: float
    bandwidth_gbs: float  # HBM / DRAM bandwidth
    bf16_tflops: float
    fp8_tflops: float | None  # None: no FP8 tensor cores
    source: str = ""
    intra_link: str = "pcie5-x16"  # the scale-up link between GPUs of one node


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_gbs: float  # nominal, per direction per GPU
    achievable_gbs: float | None = None  # what EP all-to-all reaches in practice, when known
    latency_us: float | None = None  # 64 B end-to-end, same leaf (ISCA Table 5)
    latency_cross_leaf_us: float | None = None
    source: str = ""


DEVICES: dict[str, Device] = {d.name: d for d in (
    # -- data-centre GPUs ---------------------------------------------------------------------
    # H800 SXM: H100 SXM compute and HBM; NVLink cut to 400 GB/s bidirectional (ISCA §4.1).
    # 989 TFLOPS BF16 dense is also what ISCA Table 4's MFU implies (432 / 0.4373 = 987.9).
    Device("H800", "gpu", 80, 3350, 989, 1979, "NVIDIA H100 SXM datasheet; ISCA §4.1, Table 4", "nvlink-h800"),
    # H100 SXM5 80GB: 3.35 TB/s HBM3, 989 / 1979 TFLOPS dense (datasheet lists 2x with sparsity).
    Device("H100", "gpu", 80, 3350, 989, 1979, "NVIDIA H100 datasheet", "nvlink-h100"),
    # H200 SXM: 141 GB HBM3e at 4.8 TB/s, same compute as H100.
    Device("H200", "gpu", 141, 4800, 989, 1979, "NVIDIA H200 datasheet", "nvlink-h100"),
    # H20: 96 GB HBM3 at 4.0 TB/s, 148 BF16 / 296 FP8 dense TFLOPS (export-compliant Hopper).
    Device("H20", "gpu", 96, 4000, 148, 296, "NVIDIA H20 product brief (press copies)", "nvlink-h100"),
    # A100 SXM 80GB: 2,039 GB/s HBM2e, 312 BF16 dense, no FP8.
    Device("A100", "gpu", 80, 2039, 312, None, "NVIDIA A100 datasheet", "nvlink-a100"),
    # B200 (HGX/DGX B200): 180 GB HBM3e per GPU (1,440 GB per 8), 8 TB/s, 2.25 PF BF16 / 4.5 PF FP8 dense.
    Device("B200", "gpu", 180, 8000, 2250, 4500, "NVIDIA DGX B200 datasheet (dense = half of sparse)", "nvlink-b200"),
    # GB200 NVL72: 13.4 TB HBM3e / 72 = 186 GB, 8 TB/s; 180 PF BF16 and 360 PF FP8 dense per rack / 72.
    Device("GB200", "gpu", 186, 8000, 2500, 5000, "NVIDIA GB200 NVL72 spec page (rack figures / 72)", "nvl72"),
    # L40S: 48 GB GDDR6 at 864 GB/s, 362 BF16 / 733 FP8 dense TFLOPS; PCIe only.
    Device("L40S", "gpu", 48, 864, 362, 733, "NVIDIA L40S datasheet (dense = half of sparse)"),
    # MI300X: 192 GB HBM3 at 5.3 TB/s, 1,307 BF16 / 2,615 FP8 dense TFLOPS; Infinity Fabric 64 GB/s/link x7.
    Device("MI300X", "gpu", 192, 5300, 1307, 2615, "AMD Instinct MI300X datasheet", "infinity-fabric-mi300x"),
    # -- workstation GPUs ---------------------------------------------------------------------
    # RTX 4090: 24 GB GDDR6X at 1,008 GB/s; 165 BF16 / 330 FP8 dense with FP32 accumulate (Ada whitepaper).
    Device("RTX4090", "gpu", 24, 1008, 165, 330, "NVIDIA Ada Lovelace whitepaper, appendix table"),
    # RTX 5090: 32 GB GDDR7 at 1,792 GB/s; ~209 BF16 / ~419 FP8 dense with FP32 accumulate.
    Device("RTX5090", "gpu", 32, 1792, 209, 419, "NVIDIA RTX Blackwell whitepaper (approx.)"),
    # -- local devices (unified memory) ---------------------------------------------------------
    # Ryzen AI Max+ 395: 256-bit LPDDR5X-8000 = 256 GB/s, up to 128 GB; Radeon 8060S ~59 FP16 TFLOPS.
    Device("Ryzen-AI-Max-395", "local", 128, 256, 59, None, "AMD product page; facts §5 (256 GB/s) [S]"),
    # Apple M4 Pro: 273 GB/s, up to 64 GB; M4 Max: 546 GB/s, up to 128 GB; GPU FP16 ~9 / ~18 TFLOPS.
    Device("M4-Pro", "local", 64, 273, 9, None, "Apple M4 Pro announcement; facts §5 [S]"),
    Device("M4-Max", "local", 128, 546, 18, None, "Apple M4 Max announcement; facts §5 [S]"),
    # DGX Spark (GB10): 128 GB LPDDR5x at 273 GB/s; 1 PF FP4 sparse -> ~250 FP8 / ~125 BF16 dense (approx.).
    Device("DGX-Spark", "local", 128, 273, 125, 250, "NVIDIA DGX Spark spec page (derived, approx.)"),
    # -- CPU server -----------------------------------------------------------------------------
    # 2 x Xeon Gold 6454S, 16 channels DDR5-4800 = 614 GB/s (the KTransformers box, facts §5);
    # 768 GB DRAM; AMX BF16 ~ 2 x 32 cores x 2.2 GHz x 1024 FLOP/cycle ~ 144 TFLOPS theoretical.
    Device("Xeon-DDR5-2S", "cpu", 768, 614, 144, None, "Intel ark (DDR5-4800, 8 ch/socket); facts §5"),
)}

LINKS: dict[str, Link] = {l.name: l for l in (
    # 400 Gb/s CX7 InfiniBand = 50 GB/s; ~40 GB/s effective for small messages (ISCA §4.3);
    # latency 2.8 / 3.7 us same / cross leaf (ISCA Table 5).
    Link("ib-400g", 50, 40, 2.8, 3.7, "ISCA §2.3.2, §4.3, Table 5"),
    Link("roce-400g", 50, 40, 3.6, 5.6, "ISCA Table 5; 400 GbE"),
    # H800 NVLink: 400 GB/s bidirectional = 200 per direction, ~160 achievable (ISCA §4.3, TR §3.2.2).
    Link("nvlink-h800", 200, 160, 3.33, None, "ISCA §4.1, §4.3, Table 5; TR §3.2.2"),
    # H100/H200 NVLink 4: 900 GB/s bidirectional = 450 per direction.
    Link("nvlink-h100", 450, None, 3.33, None, "NVIDIA H100 datasheet; latency ISCA Table 5 (H800)"),
    Link("nvlink-a100", 300, None, None, None, "NVIDIA A100 datasheet (600 GB/s bidirectional)"),
    # B200 / GB200 NVLink 5: 1.8 TB/s bidirectional = 900 per direction; NVL72 spans 72 GPUs.
    Link("nvlink-b200", 900, None, None, None, "NVIDIA B200 datasheet (1.8 TB/s bidirectional)"),
    Link("nvl72", 900, None, None, None, "ISCA §2.3.2 (900 GB/s unidirectional across 72 GPUs)"),
    Link("infinity-fabric-mi300x", 448, None, None, None, "AMD MI300X datasheet: 7 links x 64 GB/s"),
    # PCIe 5.0 x16: 32 GT/s x 16 lanes, 128b/130b ~ 63 GB/s per direction.
    Link("pcie5-x16", 63, None, None, None, "PCI-SIG PCIe 5.0 spec"),
)}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _lookup(table: dict, name: str, what: str):
    wanted = _key(name)
    for key, value in table.items():
        if _key(key) == wanted:
            return value
    raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(table)} (or add it with --hardware FILE.toml)")


def get_device(name: str, catalog: dict | None = None) -> Device:
    return _lookup((catalog or {}).get("devices", DEVICES), name, "device")


def get_link(name: str, catalog: dict | None = None) -> Link:
    return _lookup((catalog or {}).get("links", LINKS), name, "link")


def load_catalog(path: str | Path | None = None) -> dict:
    """The shipped catalog, extended/overridden by a TOML file: {'devices': {...}, 'links': {...}}."""
    devices, links = dict(DEVICES), dict(LINKS)
    if path is None:
        return {"devices": devices, "links": links}
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"hardware file {str(p)!r} does not exist; pass a TOML file with [device.NAME] tables")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{str(p)!r} is not valid TOML ({exc})") from None
    for name, values in (data.get("device") or {}).items():
        devices[name] = _build(Device, name, values, devices, ("memory_gb", "bandwidth_gbs", "bf16_tflops"),
                               dict(kind="gpu", fp8_tflops=None, source=str(p)))
    for name, values in (data.get("link") or {}).items():
        links[name] = _build(Link, name, values, links, ("bandwidth_gbs",), dict(source=str(p)))
    unknown = sorted(set(data) - {"device", "link"})
    if unknown:
        raise ConfigError(f"{str(p)!r}: unknown table [{unknown[0]}]; use [device.NAME] or [link.NAME]")
    return {"devices": devices, "links": links}


def _build(cls, name: str, values: dict, existing: dict, required: tuple, defaults: dict):
    fields = set(cls.__dataclass_fields__) - {"name"}
    if not isinstance(values, dict):
        raise ConfigError(f"hardware entry {name!r} must be a table of fields")
    bad = sorted(set(values) - fields)
    if bad:
        raise ConfigError(f"hardware entry {name!r}: unknown field {bad[0]!r}; fields are {', '.join(sorted(fields))}")
    for key, value in values.items():
        if key.endswith(("_gb", "_gbs", "_tflops", "_us")) and (not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"hardware entry {name!r}: {key} = {value!r} must be a positive number")
    base = next((v for k, v in existing.items() if _key(k) == _key(name)), None)
    if base is not None:
        return replace(base, **values)
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"hardware entry {name!r}: field {missing[0]!r} is missing")
    return cls(name=name, **{**defaults, **values})


def parse_cluster(spec: str, catalog: dict | None = None) -> tuple[int, int, Device]:
    """'4x8xH800' -> (4 nodes, 8 GPUs per node, H800); 'NxG' defaults to H800."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*(?:[xX]\s*(\S+))?\s*", spec or "")
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ConfigError(f"cluster {spec!r} is invalid: write NODESxGPUS[xGPU], e.g. 4x8xH800")
    return int(match[1]), int(match[2]), get_device(match[3] or "H800", catalog)

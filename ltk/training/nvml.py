"""GPU counters sampled in a background thread through NVML (nvidia-ml-py's `pynvml`):
per-GPU utilization, memory used, power and SM clock every 10 ms - 1 s, the numbers
nvidia-smi shows, recorded over a whole run (`ltk train --profile` writes profile/nvml.json).

Utilization is NVML's "percent of the sample period during which a kernel ran": a GPU at
100% can still be far from its peak FLOP/s (one small kernel at a time counts as busy), so it
is read beside MFU, never instead of it. Where NVML cannot start (no GPU, no driver, no
pynvml) the sampler says "NVML unavailable: <reason>" and the run carries on.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

QUANTITIES = ("util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz")


class NVMLUnavailable(RuntimeError):
    """NVML cannot be used here; the message says why."""


class NVMLBackend:
    """The NVIDIA Management Library through `pynvml` (the nvidia-ml-py package), imported
    lazily. The sampler's backend protocol, which a test can replace with a fake:

        open(devices) -> [(index, name), ...]   raise NVMLUnavailable(reason) when it cannot
        read(index)   -> {quantity: value or None for each of QUANTITIES}
        close()

    Indices are NVML's, which enumerate every GPU of the machine in PCI order whatever
    CUDA_VISIBLE_DEVICES says (CUDA's own numbering may differ)."""

    def __init__(self):
        self._nvml: Any = None
        self._handles: dict[int, Any] = {}

    def open(self, devices: Sequence[int] | None) -> list[tuple[int, str]]:
        try:
            import pynvml
        except ImportError as e:
            raise NVMLUnavailable(f"the nvidia-ml-py package is not installed ({e})") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NVMLUnavailable(f"nvmlInit failed: {e}") from None
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                raise NVMLUnavailable("no NVIDIA GPU found")
            wanted = list(range(count)) if devices is None else list(devices)
            bad = [i for i in wanted if not 0 <= i < count]
            if bad:
                raise ValueError(f"devices {bad} out of range: NVML sees {count} GPU(s), indices 0..{count - 1}")
            out = []
            for i in wanted:
                self._handles[i] = h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                out.append((i, name.decode() if isinstance(name, bytes) else str(name)))
            return out
        except pynvml.NVMLError as e:
            self.close()
            raise NVMLUnavailable(f"{type(e).__name__}: {e}") from None
        except (NVMLUnavailable, ValueError):
            self.close()
            raise

    def read(self, index: int) -> dict[str, float | None]:
        nv, h = self._nvml, self._handles[index]

        def get(fn: Callable[[], float]) -> float | None:
            try:
                return fn()
            except nv.NVMLError:  # e.g. power readings not supported on this board
                return None

        return {
            "util_pct": get(lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu)),
            "mem_used_bytes": get(lambda: float(nv.nvmlDeviceGetMemoryInfo(h).used)),
            "power_w": get(lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),  # NVML reports milliwatts
            "sm_clock_mhz": get(lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))),
        }

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml, self._handles = None, {}


class NVMLSampler:
    """Samples every GPU's utilization (% of NVML's last sample period in which a kernel ran),
    memory used (bytes, the whole device's, not just this process's), board power (W) and SM
    clock (MHz) every `interval_s` seconds in a daemon thread, until stopped.

        with NVMLSampler(0.05) as s:      # or s.start() ... s.stop()
            train()
        s.summary()                       # per device: mean and max of each quantity
        s.write("nvml.json")

    Where NVML cannot run (no package, no driver, no GPU) it never raises: `.available` is
    False, `.reason` says "NVML unavailable: <why>", and start/stop do nothing. Ticks follow a
    fixed schedule (t0 + k·interval), so a slow read delays one sample, not all later ones; a
    tick that is missed entirely is skipped. NVML's own counters update at their own rate
    (utilization over a 1/6 s to 1 s window depending on the GPU), so sampling faster than
    ~20 ms mostly repeats values.
    """

    def __init__(self, interval_s: float = 0.05, devices: Sequence[int] | None = None, backend: Any = None):
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)):
            raise TypeError(f"interval_s must be a number of seconds, got {type(interval_s).__name__}")
        if not 0.01 <= interval_s <= 1.0:
            raise ValueError(f"interval_s must be between 0.01 and 1.0 seconds (10 ms to 1 s), got {interval_s}")
        if devices is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in devices):
            raise TypeError(f"devices must be a sequence of GPU indices (ints) or None, got {devices!r}")
        self.interval_s = float(interval_s)
        self.devices = None if devices is None else list(devices)
        self._backend = backend if backend is not None else NVMLBackend()
        self.samples: list[dict[str, Any]] = []  # one record per device per tick
        self.names: dict[int, str] = {}
        self.available, self.reason = False, ""
        self.ticks, self.start_unix = 0, None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0 = 0.0

    def start(self) -> "NVMLSampler":
        if self._thread is not None:
            raise RuntimeError("this NVMLSampler is already running; make a new one for another window")
        try:
            self.names = dict(self._backend.open(self.devices))
        except NVMLUnavailable as e:
            self.available, self.reason = False, f"NVML unavailable: {e}"
            return self
        except ValueError:
            raise
        except Exception as e:  # a driver/library mismatch and the like: report, never stop the run
            self.available, self.reason = False, f"NVML unavailable: {type(e).__name__}: {e}"
            return self
        self.available, self.reason = True, ""
        self.start_unix, self._t0 = time.time(), time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        next_t = self._t0
        try:
            while True:
                now = time.perf_counter()
                if self._stop.wait(max(0.0, next_t - now)):
                    break
                t = time.perf_counter() - self._t0
                for i in self.names:
                    self.samples.append({"t": t, "device": i, **self._backend.read(i)})
                self.ticks += 1
                next_t += self.interval_s
                if time.perf_counter() > next_t + self.interval_s:  # fell more than a tick behind
                    next_t = time.perf_counter() + self.interval_s
        except Exception as e:  # a GPU lost mid-run: keep what was sampled, say why it stopped
            self.reason = f"NVML sampling stopped: {type(e).__name__}: {e}"

    def stop(self) -> "NVMLSampler":
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._backend.close()
        return self

    def __enter__(self) -> "NVMLSampler":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def summary(self) -> dict[str, Any]:
        """{available, reason | devices, sample_count (ticks), interval_s, achieved_interval_s}; per
        device the mean and max of each quantity over the ticks where it could be read."""
        out: dict[str, Any] = {"available": self.available, "interval_s": self.interval_s}
        if self.reason:
            out["reason"] = self.reason
        if not self.available:
            return out
        times = sorted({s["t"] for s in self.samples})
        out["sample_count"] = len(times)  # ticks; each reads every device
        out["achieved_interval_s"] = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        devices = {}
        for i, name in self.names.items():
            rows = [s for s in self.samples if s["device"] == i]
            d: dict[str, Any] = {"name": name}
            for q in QUANTITIES:
                vals = [r[q] for r in rows if r.get(q) is not None]
                d[q] = {"mean": sum(vals) / len(vals), "max": max(vals)} if vals else None
            devices[str(i)] = d
        out["devices"] = devices
        return out

    def write(self, path: str | Path) -> Path:
        """JSON: the summary, the wall-clock start (to line the samples up with a trace) and
        every sample (t in seconds from the start)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.summary(), "start_unix": self.start_unix, "samples": self.samples}))
        return path

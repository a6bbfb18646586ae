"""Board power during a measurement, where the board exposes it (Jetson power monitors).

Jetsons carry INA3221 monitors: JetPack 4/5 expose ``in_power*_input`` (milliwatts) under
``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/``; JetPack 6 exposes the same chips through
hwmon (``/sys/class/hwmon/hwmon*/`` with ``name`` ina3221, ``curr*_input`` in mA and
``in*_input`` in mV per rail). A background thread samples every rail; elsewhere the reading
is "not available".
"""

from __future__ import annotations

import glob
import threading
from pathlib import Path

IIO_PATTERN = "/sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input"
HWMON_PATTERN = "/sys/class/hwmon/hwmon*"


def _read_int(path) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _iio_rails() -> dict:
    """rail label -> function returning milliwatts (JetPack 4/5)."""
    rails = {}
    for path in sorted(glob.glob(IIO_PATTERN)):
        label = Path(path).name.replace("in_power", "rail").replace("_input", "")
        name_file = Path(path).with_name(
            Path(path).name.replace("power", "rail_name").replace("_input", "")
        )
        if name_file.is_file():
            label = name_file.read_text().strip()
        rails[label] = lambda p=path: _read_int(p)
    return rails


def _hwmon_rails() -> dict:
    """rail label -> function returning milliwatts (JetPack 6: volts x amps per channel)."""
    rails = {}
    for folder in sorted(glob.glob(HWMON_PATTERN)):
        folder = Path(folder)
        name = (
            (folder / "name").read_text().strip() if (folder / "name").is_file() else ""
        )
        if "ina3221" not in name:
            continue
        for current in sorted(folder.glob("curr*_input")):
            channel = current.name[len("curr") : -len("_input")]
            voltage = folder / f"in{channel}_input"
            if not voltage.is_file():
                continue
            label_file = folder / f"in{channel}_label"
            label = (
                label_file.read_text().strip()
                if label_file.is_file()
                else f"rail{channel}"
            )

            def read(c=current, v=voltage):
                amps, volts = _read_int(c), _read_int(v)
                return None if amps is None or volts is None else amps * volts // 1000

            rails[label] = read
    return rails


def power_rails() -> dict:
    return _iio_rails() or _hwmon_rails()


class PowerSampler:
    """Samples every rail every ``interval`` seconds between ``start()`` and ``stop()``."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.rails = power_rails()
        self.samples = {label: [] for label in self.rails}
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            for label, read in self.rails.items():
                value = read()
                if value is not None:
                    self.samples[label].append(value)
            self._stop.wait(self.interval)

    def start(self):
        if self.rails:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if not self.rails:
            return {
                "power": "not available: no INA3221 power monitor (Jetson) on this machine"
            }
        return {
            "power_mw": {
                label: {"mean": sum(v) / len(v), "max": max(v), "samples": len(v)}
                for label, v in self.samples.items()
                if v
            }
        }

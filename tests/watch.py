"""What the fault tests share: a corpus of the bundled photos, the keys a dataset holds, and a
watcher that reads every visible output file while a run goes on (test_faults, test_soak)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from mils_pipeline.io.shards import write_shard

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")


def write_corpus(source: Path, photos: dict[str, bytes], shards: int, per_shard: int) -> list[str]:
    keys = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s}-{i}"
            samples.append((key, {"jpg": photos[NAMES[(s * per_shard + i) % len(NAMES)]]}))
            keys.append(key)
        write_shard(str(source / f"s{s}.tar"), samples)
    return keys


class VisibleFilesWatcher(threading.Thread):
    """Reads every visible output file over and over while a run goes on: any file a reader can
    see must parse whole."""

    def __init__(self, output: Path) -> None:
        super().__init__(daemon=True)
        self.output = output
        self.problems: list[str] = []
        self.reads = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for path in list(self.output.glob("data/*.parquet")) + list(self.output.glob("quarantine/*.parquet")):
                try:
                    pq.read_table(path)
                    self.reads += 1
                except FileNotFoundError:
                    continue
                except Exception as exc:  # noqa: BLE001 - every kind of unreadable file is a finding
                    self.problems.append(f"{path.name}: {exc}")
            for path in self.output.glob("_manifests/*.json"):
                try:
                    json.loads(path.read_text())
                except FileNotFoundError:
                    continue
                except ValueError as exc:
                    self.problems.append(f"{path.name}: {exc}")
            time.sleep(0.05)


def dataset_keys(output: str | Path, fs=None) -> list[str]:
    if fs is None:
        return pq.read_table(Path(output) / "data").column("key").to_pylist()
    import pyarrow.dataset as ds

    return ds.dataset(str(output), filesystem=fs, format="parquet").to_table(columns=["key"]).column("key").to_pylist()

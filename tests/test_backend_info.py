"""backend_info(), WEIGHTSYNC_BACKEND, and importing without side effects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import weightsync
from weightsync.errors import BackendUnavailableError


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120, check=False)


def test_backend_info_names_active_backend_and_reasons(monkeypatch):
    monkeypatch.delenv("WEIGHTSYNC_BACKEND", raising=False)
    info = weightsync.backend_info()
    assert set(info["devices"]) == {"cpu", "cuda"}
    cpu = info["devices"]["cpu"]
    if info["extension"]["loaded"]:
        assert cpu["active"] == "native"
        assert info["extension"]["host_copier"]["max_threads"] >= 1
    else:
        assert cpu["active"] == "torch"
        assert cpu["unavailable"]["native"].startswith("extension ")
    assert "cupy" in info["devices"]["cpu"]["unavailable"]
    assert info["runtime"]["torch"] == torch.__version__
    json.dumps(info)  # plain data, printable by a CLI


def test_forcing_the_torch_backend(monkeypatch):
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "torch")
    info = weightsync.backend_info()
    assert info["forced"] == "torch"
    assert info["devices"]["cpu"]["active"] == "torch"
    assert info["devices"]["cuda"]["active"] == "torch"


def test_bad_backend_name_is_reported_and_raised(monkeypatch):
    monkeypatch.setenv("WEIGHTSYNC_BACKEND", "fastest")
    info = weightsync.backend_info()
    assert "choose one of native, cupy, torch" in info["devices"]["cpu"]["error"]
    with pytest.raises(BackendUnavailableError, match="WEIGHTSYNC_BACKEND='fastest'"):
        weightsync.ops.batched_copy_([torch.zeros(1)], [torch.ones(1)])


def test_forcing_native_when_disabled_says_why():
    code = (
        "import torch, weightsync\n"
        "from weightsync.errors import BackendUnavailableError\n"
        "try:\n"
        "    weightsync.ops.batched_copy_([torch.zeros(1)], [torch.ones(1)])\n"
        "except BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    out = run_python(code, WEIGHTSYNC_BACKEND="native", WEIGHTSYNC_DISABLE_EXTENSION="1")
    assert out.returncode == 0, out.stderr
    assert "ERR WEIGHTSYNC_BACKEND=native cannot run cpu ops: extension disabled by " \
           "WEIGHTSYNC_DISABLE_EXTENSION" in out.stdout


def test_disabled_extension_falls_back_to_torch_and_says_so():
    code = (
        "import torch, weightsync\n"
        "a=[torch.zeros(3)]; weightsync.ops.batched_copy_(a, [torch.ones(3)])\n"
        "info = weightsync.backend_info()\n"
        "print(info['devices']['cpu']['active'], '|', info['devices']['cpu']['unavailable']['native'], '|', bool(a[0].all()))\n"
    )
    out = run_python(code, WEIGHTSYNC_DISABLE_EXTENSION="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("torch | extension disabled by WEIGHTSYNC_DISABLE_EXTENSION | True")


def test_import_and_cpu_work_never_initialise_cuda():
    code = (
        "import torch, weightsync\n"
        "weightsync.backend_info()\n"
        "weightsync.ops.batched_copy_([torch.zeros(2)], [torch.ones(2)])\n"
        "print(torch.cuda.is_initialized())\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_library_is_explained():
    out = run_python("import weightsync, json; print(json.dumps(weightsync.backend_info()['extension']))",
                     WEIGHTSYNC_EXTENSION_PATH="/nonexistent/_C.so")
    assert out.returncode == 0, out.stderr
    ext = json.loads(out.stdout)
    assert ext["loaded"] is False and "failed to load /nonexistent/_C.so" in ext["reason"]

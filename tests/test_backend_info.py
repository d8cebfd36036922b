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
        assert info["extension"]["host_copier"]["span_loop"] in {"avx512", "avx", "memcpy"}
    else:
        assert cpu["active"] == "torch"
        assert cpu["unavailable"]["native"].startswith("extension ")
    assert "cupy" in info["devices"]["cpu"]["unavailable"]
    assert info["runtime"]["torch"] == torch.__version__
    json.dumps(info)  # plain data, printable by a CLI


@pytest.fixture(scope="module")
def extension_loaded() -> None:
    """Skips a test that needs the compiled extension where it is not loaded."""
    if not weightsync.backend_info()["extension"]["loaded"]:
        pytest.skip("the extension is not loaded")


@pytest.fixture(scope="module")
def best_span_loop(extension_loaded: None) -> str:
    """The best span loop this CPU has, as an unforced process picks it."""
    proc = run_python("import weightsync; print(weightsync.backend_info()['extension']"
                      "['host_copier']['span_loop'])", WEIGHTSYNC_SPAN_LOOP="")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("loop", ["memcpy", "avx", "avx512"])
def test_forced_span_loop_is_reported_and_copies_exactly(loop, best_span_loop):
    """WEIGHTSYNC_SPAN_LOOP picks the small-span loop when the CPU has it (else the best it
    has), backend_info says which, and a plan over odd-sized tensors is bit-exact with it."""
    code = (
        "import json, torch, weightsync\n"
        "from weightsync.engine import CopyPlan\n"
        "g = torch.Generator().manual_seed(0)\n"
        "sizes = [1, 7, 8, 15, 16, 17, 63, 64, 65, 255, 1023, 1024, 4097, 20000, 70000]\n"
        "src = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]\n"
        "dst = [torch.zeros(n, dtype=torch.uint8) for n in sizes]\n"
        "CopyPlan(dst, src).run()\n"
        "print(json.dumps({'loop': weightsync.backend_info()['extension']['host_copier']['span_loop'],"
        " 'exact': all(torch.equal(d, s) for d, s in zip(dst, src))}))\n"
    )
    proc = run_python(code, WEIGHTSYNC_SPAN_LOOP=loop, WEIGHTSYNC_BACKEND="native")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["exact"]
    order = ["memcpy", "avx", "avx512"]
    expected = loop if order.index(loop) <= order.index(best_span_loop) else best_span_loop
    assert out["loop"] == expected


@pytest.mark.parametrize("helpers", ["auto", "own", "torch"])
def test_forced_helpers_are_reported_and_copy_exactly(helpers, extension_loaded):
    """WEIGHTSYNC_HELPERS picks whose threads help the host copier (its own pool, torch's
    intra-op threads, or auto), backend_info says which, and threaded plans and checks stay
    bit-exact with each, right after torch's own parallel work too (where auto switches)."""
    code = (
        "import json, torch, weightsync\n"
        "from weightsync.engine import CopyPlan\n"
        "torch.set_num_threads(2)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "sizes = [4096] * 600 + [1 << 20, 3, 70000]\n"
        "exact = True\n"
        "big = torch.zeros(1 << 22); other = torch.ones(1 << 22)\n"
        "for round in range(30):\n"
        "    big.copy_(other)  # torch's workers spin after this\n"
        "    src = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]\n"
        "    dst = [torch.zeros(n, dtype=torch.uint8) for n in sizes]\n"
        "    plan = CopyPlan(dst, src)\n"
        "    for _ in range(3):\n"
        "        plan.run()\n"
        "        exact = exact and all(torch.equal(d, s) for d, s in zip(dst, src))\n"
        "        for s in src: s.add_(1)\n"
        "print(json.dumps({'helpers': weightsync.backend_info()['extension']['host_copier']"
        "['helpers'], 'exact': exact}))\n"
    )
    proc = run_python(code, WEIGHTSYNC_HELPERS=helpers, WEIGHTSYNC_BACKEND="native",
                      WEIGHTSYNC_NUM_THREADS="2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"helpers": helpers, "exact": True}


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

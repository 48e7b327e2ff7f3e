"""The GPU path on a real GPU (issue #19); skipped where torch cannot use CUDA.

Run with ``python -m pytest -q -m gpu tests/test_gpu.py`` on a machine with one GPU, or through
``python benchmarks/gpu_smoke.py``, which also prints the throughputs. Each test checks behaviour with exact
expectations; the numbers they print (``GPU-RATE`` lines) are for the smoke script.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ENV = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "STAMPRAY_PROGRESS": "0"}


def cli(*args, timeout=1200) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "stampray", *args], capture_output=True, text=True, env=ENV,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    tno, radio = str(root / "tno"), str(root / "radio")
    cli("synth", "-n", "20000", "--out", tno)
    cli("synth", "--kind", "radio", "-n", "4000", "--out", radio)
    return root, tno, radio


def test_resnet50_trains_two_epochs_with_amp_on_one_gpu_and_the_cpu_evaluates_it(tables):
    root, tno, _ = tables
    t0 = time.time()
    out = cli("train", "--model", "resnet50", "--data", tno, "--out", str(root / "runs"), "--epochs", "2",
              "--use-gpu", "--workers", "1", "--batch-size", "512")
    wall = time.time() - t0
    summary = json.load(open(root / "runs" / "resnet50" / "summary.json"))
    m = summary["metrics"]
    assert m["epochs_done"] == 2 and m["test_acc"] > 0.8, out.stdout[-2000:]
    print(f"GPU-RATE train resnet50 {m['stamps_per_s']:.0f} images/s ({wall:.0f} s wall)")
    # Every tensor the GPU run wrote loads on the CPU; the CPU evaluates the checkpoint.
    bundle = torch.load(summary["best"], map_location="cpu", weights_only=True)
    assert all(v.device.type == "cpu" for v in bundle["state_dict"].values())
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    score = subprocess.run([sys.executable, "-m", "stampray", "score", "--model", summary["best"], "--data", tno,
                            "--out", str(root / "cpu-scores")], capture_output=True, text=True, env=env, timeout=1200)
    assert score.returncode == 0, score.stderr[-2000:]
    rep = subprocess.run([sys.executable, "-m", "stampray", "evaluate", "--scores", str(root / "cpu-scores"),
                          "--out", str(root / "cpu-report")], capture_output=True, text=True, env=env, timeout=600)
    assert rep.returncode == 0, rep.stderr[-2000:]
    report = json.load(open(root / "cpu-report" / "report.json"))
    assert abs(next(iter(report["results"].values()))["accuracy"] - m["test_acc"]) < 0.02


def test_a_killed_gpu_run_resumes_on_the_gpu(tables):
    root, tno, _ = tables
    args = [sys.executable, "-m", "stampray", "train", "--model", "cnn", "--data", tno, "--out",
            str(root / "resume"), "--epochs", "4", "--use-gpu", "--workers", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not glob.glob(str(root / "resume" / "cnn" / "epoch-0002")):
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert glob.glob(str(root / "resume" / "cnn" / "epoch-0002"))
    out = cli(*args[3:])
    summary = json.load(open(root / "resume" / "cnn" / "summary.json"))
    assert summary["metrics"]["epochs_done"] == 4 and summary["metrics"]["resumed_from"], out.stdout[-2000:]


@pytest.mark.parametrize("model", ["cnn", "resnet50"])
def test_score_and_occlude_use_gpu_on_radio_stamps(tables, model):
    root, _, radio = tables
    from stampray import checkpoint as ck
    from stampray.models import create_model

    ckpt = str(root / f"{model}-radio.pt")
    torch.manual_seed(0)
    ck.save(ck.make_bundle(create_model(model, 1, 64, 4), class_names=("a", "b", "c", "d"),
                           preprocess="course_scaled"), ckpt)
    out = cli("score", "--model", ckpt, "--data", radio, "--out", str(root / f"scores-{model}"), "--use-gpu")
    doc = json.load(open(root / f"scores-{model}" / "_manifest.json"))
    assert doc["num_rows"] == 4000 and doc["set_aside"] == 0
    rate = [line for line in out.stdout.splitlines() if "stamps/s" in line][-1]
    print(f"GPU-RATE score {model} 64x64: {rate.rsplit(';', 1)[-1].strip()}")
    cli("occlude", "--model", ckpt, "--data", radio, "--out", str(root / f"maps-{model}"), "--use-gpu",
        "--limit", "4", "--stride", "4")
    from stampray.occlusion import read_maps

    maps = read_maps(str(root / f"maps-{model}"))
    assert maps.num_rows == 4 and all(m is not None for m in maps.column("heatmap").to_pylist())


def test_checkpoint_tensors_written_on_the_gpu_are_on_the_cpu(tables):
    root, tno, _ = tables
    code = textwrap.dedent(f"""
        import glob, torch
        paths = glob.glob({str(root)!r} + "/runs/resnet50/epoch-*/model.pt")
        b = torch.load(sorted(paths)[-1], map_location="cpu", weights_only=True)
        def walk(o):
            if isinstance(o, torch.Tensor): yield o.device.type
            elif isinstance(o, dict):
                for v in o.values(): yield from walk(v)
            elif isinstance(o, (list, tuple)):
                for v in o: yield from walk(v)
        print(sorted(set(walk(b))), "scaler" in b)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.stdout.strip() == "['cpu'] True", out.stderr

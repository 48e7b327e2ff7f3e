"""Compiled model packages (stampray.aot): built once per node, loaded by every later replica, never the wrong
model's code, and every failure falls back to torch.compile."""

import fcntl
import os
import sys
import time

import numpy as np
import pytest


def _cnn(seed=0, features=False):
    import torch

    from stampray.models import create_model
    from stampray.notebook import Outputs

    torch.manual_seed(seed)
    return Outputs(create_model("cnn", 1, 21, 2).eval(), features).to(memory_format=torch.channels_last)


def test_a_package_is_named_by_the_weights_the_shape_and_the_graph(monkeypatch):
    """The same model and shape give the same name; another weight, shape, output set or thread count give
    another (a package is native code for one graph, one shape and one thread count)."""
    import torch

    from stampray.aot import package_key

    a = package_key(_cnn(0), (8, 1, 21, 21), "features=False")
    assert a == package_key(_cnn(0), (8, 1, 21, 21), "features=False")
    other = _cnn(0)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # one weight moved
    names = {package_key(other, (8, 1, 21, 21), "features=False"), package_key(_cnn(0), (16, 1, 21, 21),
             "features=False"), package_key(_cnn(0, True), (8, 1, 21, 21), "features=True")}
    saved = torch.get_num_threads()
    torch.set_num_threads(saved + 1)
    try:
        names.add(package_key(_cnn(0), (8, 1, 21, 21), "features=False"))
    finally:
        torch.set_num_threads(saved)
    assert a not in names and len(names) == 4


def test_packages_off_or_a_build_under_way_mean_torch_compile(tmp_path, monkeypatch):
    """``STAMPRAY_COMPILE_CACHE=off``: no package. A build lock held (another replica on the node is building
    it): no package and no wait; nothing is built or written by this replica."""
    from stampray import aot

    monkeypatch.setenv(aot.CACHE_ENV, "off")
    assert aot.cache_dir() is None
    assert aot.forward_for(_cnn(), (8, 1, 21, 21)) == (None, "off")

    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))
    model = _cnn()
    lock = tmp_path / (aot.PREFIX + aot.package_key(model, (8, 1, 21, 21)) + aot.SUFFIX + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        t = time.time()
        assert aot.forward_for(model, (8, 1, 21, 21)) == (None, "another replica is building it")
        assert time.time() - t < 5
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == [lock.name]


def test_a_replica_not_allowed_to_build_only_loads():
    """``may_build=False`` (a job too short for a build to land): a missing package is neither built nor locked."""
    import tempfile

    from stampray import aot

    with tempfile.TemporaryDirectory() as d:
        os.environ[aot.CACHE_ENV] = d
        try:
            assert aot.forward_for(_cnn(), (8, 1, 21, 21), may_build=False) == (None, "not built")
            assert os.listdir(d) == []
        finally:
            os.environ[aot.CACHE_ENV] = "off"


def test_a_job_builds_packages_only_when_the_build_can_land():
    """One replica builds while the others score: only in a pool of two or more, and only when each of the
    others has PACKAGE_BUILD_FORWARDS forwards meanwhile (750,000: about 30 s of one CPU replica here)."""
    from stampray.inference import build_packages

    assert [build_packages(n, 2) for n in (None, 0, 749_999, 750_000, 1_000_000)] == [False, False, False, True, True]
    assert build_packages(10**9, 1) is False  # a lone replica: the whole job would wait for the build
    assert build_packages(1_499_999, 3) is False and build_packages(1_500_000, 3) is True


def test_a_damaged_package_is_set_aside_and_compile_takes_over(tmp_path, monkeypatch, caplog):
    """A package that does not load (a truncated file) gives no forward, a warning naming it, and is
    removed, so that the next replica builds a sound one."""
    from stampray import aot

    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))
    model = _cnn()
    path = tmp_path / (aot.PREFIX + aot.package_key(model, (8, 1, 21, 21)) + aot.SUFFIX)
    path.write_bytes(b"PK\x03\x04 not a package")
    with caplog.at_level("WARNING", logger="stampray.aot"):
        assert aot.forward_for(model, (8, 1, 21, 21)) == (None, "unusable")
    assert f"compiled package {path} is unusable (" in caplog.text and "; removed; using torch.compile" in caplog.text
    assert not path.exists() and not (tmp_path / (path.name + aot.FAILED)).exists()  # rebuilt by the next one


def test_a_package_that_answers_otherwise_than_the_model_is_removed(tmp_path, monkeypatch, caplog):
    """A package under the model's name whose outputs are not the model's (a stale or foreign file) is
    caught by the check on load, removed, and the replica compiles; the packaged forward refuses inputs
    of another shape, dtype or layout (its code does not check them)."""
    import torch

    from stampray import aot

    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))
    model = _cnn()
    path = tmp_path / (aot.PREFIX + aot.package_key(model, (8, 1, 21, 21)) + aot.SUFFIX)
    path.write_bytes(b"a package of another model")
    right = {"fn": lambda x: tuple(model(x))}
    monkeypatch.setattr(aot, "_package_runner", lambda p: (lambda x: right["fn"](x)))
    good, how = aot.forward_for(model, (8, 1, 21, 21))
    assert how == "loaded" and path.exists()
    x = torch.randn(8, 1, 21, 21)
    for bad in (x.contiguous(memory_format=torch.channels_last)[:4], x.double().contiguous(
            memory_format=torch.channels_last), torch.randn(8, 21, 21, 2).permute(0, 3, 1, 2)):
        with pytest.raises(ValueError, match="takes channels-last float32 CPU input of shape"):
            good(bad)
    right["fn"] = lambda x: (model(x)[0] + 0.01,)
    with caplog.at_level("WARNING", logger="stampray.aot"):
        assert aot.forward_for(model, (8, 1, 21, 21)) == (None, "unusable")
    assert "its outputs differ from the model's own" in caplog.text and not path.exists()
    path.write_bytes(b"x")
    right["fn"] = lambda x: (model(x)[0], model(x)[0])  # another set of outputs (features asked or not)
    assert aot.forward_for(model, (8, 1, 21, 21)) == (None, "unusable")


def test_a_change_to_the_models_code_names_another_package(tmp_path, monkeypatch):
    """Same class name, layers and weights, another ``forward``: another package (a package is the traced
    code, not just the weights)."""
    import importlib.util

    import torch

    from stampray.aot import package_key

    keys = []
    for i, body in enumerate(("return self.conv(x)", "return self.conv(x) * 2")):
        (tmp_path / f"v{i}").mkdir()
        src = tmp_path / f"v{i}" / "stampnet.py"
        src.write_text("import torch\n\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                       "        super().__init__()\n        self.conv = torch.nn.Conv2d(1, 2, 3)\n\n"
                       f"    def forward(self, x):\n        {body}\n")
        spec = importlib.util.spec_from_file_location("stampnet", src)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "stampnet", mod)  # as an imported model module is
        spec.loader.exec_module(mod)
        torch.manual_seed(0)
        keys.append(package_key(mod.Net(), (8, 1, 21, 21)))
    assert keys[0] != keys[1]


def test_the_cache_must_be_this_users_own_directory(tmp_path, monkeypatch, caplog):
    """Packages are native code: a cache directory others can write, or a relative one (no home), means
    no packages."""
    from stampray import aot

    mine = tmp_path / "mine"
    monkeypatch.setenv(aot.CACHE_ENV, str(mine))
    assert aot.cache_dir() == str(mine) and (mine.stat().st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(aot.CACHE_ENV, str(shared))
    with caplog.at_level("WARNING", logger="stampray.aot"):
        assert aot.cache_dir() is None
    assert (f"compiled-model cache {shared} is not a directory of this user's that only this user can write"
            in caplog.text)
    monkeypatch.setenv(aot.CACHE_ENV, "relative/cache")
    monkeypatch.chdir(tmp_path)
    assert aot.cache_dir() is None and not (tmp_path / "relative").exists()


def test_a_failed_build_is_noted_and_not_tried_again_for_a_day(tmp_path, monkeypatch, caplog):
    """A build that fails (no C++ compiler on the node, an op export cannot take) gives no package, a
    warning, and a note beside the package's name; the next replicas skip the build (and its time) until the
    note is a day old."""
    from stampray import aot

    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))
    calls = []

    def broken(module, shape, path):
        calls.append(shape)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(aot, "build", broken)
    model = _cnn()
    with caplog.at_level("WARNING", logger="stampray.aot"):
        assert aot.forward_for(model, (8, 1, 21, 21)) == (None, "build failed")
    assert "no compiled package (RuntimeError: no compiler here); using torch.compile" in caplog.text
    note = tmp_path / (aot.PREFIX + aot.package_key(model, (8, 1, 21, 21)) + aot.SUFFIX + aot.FAILED)
    assert note.read_text() == "no compiled package (RuntimeError: no compiler here)\n"
    assert aot.forward_for(model, (8, 1, 21, 21)) == (None, "its build failed recently")
    assert calls == [(8, 1, 21, 21)]
    old = time.time() - aot.RETRY_S - 1
    os.utime(note, (old, old))
    assert aot.forward_for(model, (8, 1, 21, 21)) == (None, "build failed")
    assert len(calls) == 2


def test_prune_keeps_the_most_recently_used_and_touches_only_its_own_files(tmp_path):
    from stampray import aot

    now = time.time()
    ours = []
    for i in range(4):
        p = tmp_path / f"{aot.PREFIX}{i}{aot.SUFFIX}"
        p.write_bytes(b"x")
        (tmp_path / (p.name + ".lock")).write_bytes(b"")
        os.utime(p, (now - 100 * i, now - 100 * i))  # 0 is the most recent
        ours.append(p)
    stale_tmp = tmp_path / f"{aot.PREFIX}9{aot.SUFFIX}.123.tmp{aot.SUFFIX}"
    fresh_tmp = tmp_path / f"{aot.PREFIX}8{aot.SUFFIX}.124.tmp{aot.SUFFIX}"
    for p, age in ((stale_tmp, 7200), (fresh_tmp, 10)):
        p.write_bytes(b"x")
        os.utime(p, (now - age, now - age))
    (tmp_path / "notes.pt2").write_bytes(b"a user's file")
    gone = aot.prune(str(tmp_path), keep=2)
    assert sorted(gone) == sorted(str(p) for p in ours[2:])
    assert sorted(os.listdir(tmp_path)) == sorted(
        [p.name for p in ours[:2]] + [p.name + ".lock" for p in ours[:2]] + [fresh_tmp.name, "notes.pt2"])


@pytest.mark.slow
def test_the_first_replica_builds_the_package_and_later_ones_load_it(tmp_path, monkeypatch, make_checkpoint):
    """With packages on, a compiling replica allowed to build builds its package once (``package built``),
    a second one (not allowed to build) loads it (``package loaded``), and both give the uncompiled model's
    probabilities, with features too and with --tta (the package's shape is K x rows)."""
    from stampray import aot
    from stampray.inference import ModelActor

    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path / "cache"))
    ckpt = open(make_checkpoint(tmp_path / "m.pt"), "rb").read()
    x = np.random.default_rng(0).normal(size=(21, 1, 21, 21)).astype(np.float32)
    eager = ModelActor(ckpt, compile=False, chunk=8, tta=2, features=True)
    first = ModelActor(ckpt, compile=True, chunk=8, tta=2, features=True, build_package=True)
    assert first.compiled_how == "package built"
    packages = [f for f in os.listdir(tmp_path / "cache") if f.endswith(aot.SUFFIX)]
    assert len(packages) == 1
    inode = os.stat(tmp_path / "cache" / packages[0]).st_ino
    runs, real = [], ModelActor._run
    monkeypatch.setattr(ModelActor, "_run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    second = ModelActor(ckpt, compile=True, chunk=8, tta=2, features=True)
    assert second.compiled_how == "package loaded" and second.compiled
    assert runs == []  # no second warm-up: loading ran the package once at its shape (aot._checked)
    assert [f for f in os.listdir(tmp_path / "cache") if f.endswith(aot.SUFFIX)] == packages
    assert os.stat(tmp_path / "cache" / packages[0]).st_ino == inode  # read, not rewritten
    want = eager.passes(x)
    for actor in (first, second):
        got = actor.passes(x)
        np.testing.assert_allclose(got.probs, want.probs, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.std, want.std, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.features, want.features, rtol=1e-4, atol=1e-5)


def test_occlusion_replicas_ask_for_the_package_scoring_builds(tmp_path, monkeypatch, make_checkpoint):
    """On CPUs a default occlusion job of 21x21 stamps compiles for scoring's shape with scoring's tag, so the
    package a scoring job built on the node (the same module, shape and tag: the same name) is the one its
    replicas load, and the reverse."""
    import torch

    from stampray import aot
    from stampray.occlusion import Occluder, occlusion_forward
    from stampray.score import Scorer

    asked = []
    monkeypatch.setattr(aot, "forward_for", lambda module, shape, tag="", may_build=True: asked.append(
        (aot.package_key(module, shape, tag), tuple(shape), tag)) or (None, "off"))
    monkeypatch.setattr(torch, "compile", lambda model, **k: model)  # the warm-up only: nothing to compile here
    ckpt = open(make_checkpoint(tmp_path / "m.pt"), "rb").read()
    Scorer(ckpt, str(tmp_path / "s"), [], (0.7, 0.15, 0.15), "cnn@x", compile=True)
    pairs, _ = occlusion_forward(21 * 21, 17 * 17)
    Occluder(ckpt, str(tmp_path / "o"), 5, 1, [], None, compile=True, chunk=pairs, occlude_chunk=pairs)
    assert len(asked) == 2 and asked[0] == asked[1] and asked[0][1:] == ((4096, 1, 21, 21), "features=False")

"""The one wheel fetcher: pinned wheels downloaded once into the cache folder, clear errors naming the command."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvpress_aqua.util import fetch

ENV = "KVPRESS_AQUA_CACHE"


def _wheel(path, name="demo_pkg-1.0-py3-none-any.whl"):
    path.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path / name, "w") as zf:
        zf.writestr("demo_pkg/data.txt", "hello")
    return path / name


def test_a_cached_wheel_is_returned_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("pip ran for a cached wheel"))
    cached = _wheel(tmp_path / "wheels")
    _wheel(tmp_path / "wheels", "demo_pkg-1.01-py3-none-any.whl")  # another version is not this one
    assert fetch.fetch_wheel("Demo-Pkg==1.0", what="the demo") == cached  # names compare as PEP 503 says


def test_download_once_into_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    calls = []

    def pip(command, **kwargs):
        calls.append(command)
        _wheel(Path(command[command.index("-d") + 1]))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", pip)
    first = fetch.fetch_wheel("demo-pkg==1.0", what="the demo")
    assert first == tmp_path / "wheels" / "demo_pkg-1.0-py3-none-any.whl" and first.is_file()
    assert fetch.fetch_wheel("demo-pkg==1.0", what="the demo") == first
    assert len(calls) == 1
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and "install" not in calls[0]
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [first.name]  # no download folder left


def test_errors_name_the_command_to_run_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    folder = tmp_path / "wheels"
    by_hand = f"{sys.executable} -m pip download --no-deps demo-pkg==1.0 -d {folder}"
    with pytest.raises(FileNotFoundError) as err:
        fetch.fetch_wheel("demo-pkg==1.0", what="the demo", download=False, hint="or use something else")
    assert by_hand in str(err.value) and "downloading is off" in str(err.value)
    assert str(err.value).endswith("; or use something else")

    def fail(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", fail)
    with pytest.raises(FileNotFoundError) as err:
        fetch.fetch_wheel("demo-pkg==1.0", what="the demo")
    assert "could not download the demo (demo-pkg==1.0)" in str(err.value)
    assert "No matching distribution" in str(err.value) and by_hand in str(err.value)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("bad", ["demo-pkg", "demo-pkg>=1.0", "==1.0", "demo-pkg=="])
def test_only_exact_pins(bad):
    with pytest.raises(ValueError, match="name==version"):
        fetch.fetch_wheel(bad, what="the demo", download=False)

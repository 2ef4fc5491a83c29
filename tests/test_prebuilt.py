"""bench/prebuilt.py: a carried extension is used only when it fits the machine, and a
failed install leaves diffmem/ as it was."""
import json

import pytest

import bench.prebuilt as prebuilt

# Stands in for diffmem/_native.py in a scratch tree: the "extension" loads when its bytes say so.
FAKE_NATIVE = """
import pathlib
AVAILABLE = pathlib.Path(__file__).with_name("_C.abi3.so").read_bytes() == b"loads"
def built_with_cuda():
    return True
"""


def _tree(tmp_path, installed=None):
    root = tmp_path / "tree"
    (root / "csrc" / "knn").mkdir(parents=True)
    (root / "csrc" / "knn" / "knn.h").write_text("// header\n")
    (root / "setup.py").write_text("# build\n")
    (root / "diffmem").mkdir()
    (root / "diffmem" / "__init__.py").write_text("")
    (root / "diffmem" / "_native.py").write_text(FAKE_NATIVE)
    if installed is not None:
        (root / "diffmem" / prebuilt.LIBRARY).write_bytes(installed)
    return root


def _carried(tmp_path, root, library=b"loads", torch="2.11.0+cu130", digest=None):
    src = tmp_path / "carried"
    src.mkdir(exist_ok=True)
    (src / prebuilt.LIBRARY).write_bytes(library)
    stamp = {"torch": torch, "sources_sha256": digest or prebuilt.sources_digest(root)}
    (src / prebuilt.STAMP).write_text(json.dumps(stamp))
    return src


def _diffmem_files(root):
    return {p.name: p.read_bytes() for p in (root / "diffmem").iterdir() if p.suffix != ".py" and p.is_file()}


def test_the_digest_follows_every_source_file_and_setup_py(tmp_path):
    root = _tree(tmp_path)
    first = prebuilt.sources_digest(root)
    assert prebuilt.sources_digest(root) == first
    (root / "csrc" / "knn" / "knn.h").write_text("// header, edited\n")
    second = prebuilt.sources_digest(root)
    assert second != first
    (root / "setup.py").write_text("# build, edited\n")
    third = prebuilt.sources_digest(root)
    assert third not in (first, second)
    (root / "csrc" / "knn" / "new.cu").write_text("")
    fourth = prebuilt.sources_digest(root)
    assert fourth != third
    (root / "diffmem" / "unrelated.py").write_text("x = 1\n")  # not built from: no change
    assert prebuilt.sources_digest(root) == fourth


def test_a_fitting_build_is_installed_and_loads(tmp_path):
    root = _tree(tmp_path, installed=b"old build")
    src = _carried(tmp_path, root)
    message = prebuilt.install(src, root, torch_version="2.11.0+cu130")
    assert "installed" in message
    assert _diffmem_files(root) == {prebuilt.LIBRARY: b"loads"}  # no backup or temporary left


@pytest.mark.parametrize("problem, match", [
    ("torch", "built for torch 2.11.0\\+cu130, this machine has 2.12.0"),
    ("sources", "other sources"),
    ("missing", "no prebuilt extension"),
    ("does not load", "does not load with its CUDA kernels"),
])
def test_an_unfitting_build_is_refused_and_diffmem_is_left_as_it_was(tmp_path, problem, match):
    root = _tree(tmp_path, installed=b"old build")
    src = _carried(tmp_path, root, library=b"broken" if problem == "does not load" else b"loads",
                   digest="0" * 64 if problem == "sources" else None)
    if problem == "missing":
        (src / prebuilt.STAMP).unlink()
    version = "2.12.0" if problem == "torch" else "2.11.0+cu130"
    with pytest.raises(ValueError, match=match):
        prebuilt.install(src, root, torch_version=version)
    assert _diffmem_files(root) == {prebuilt.LIBRARY: b"old build"}


def test_a_failed_install_into_a_tree_without_a_build_leaves_none(tmp_path):
    root = _tree(tmp_path)
    src = _carried(tmp_path, root, library=b"broken")
    with pytest.raises(ValueError, match="does not load"):
        prebuilt.install(src, root, torch_version="2.11.0+cu130")
    assert _diffmem_files(root) == {}


def test_the_cli_says_why_and_exits_1(tmp_path, capsys):
    assert prebuilt.main(["install", "--dir", str(tmp_path / "nothing")]) == 1
    assert "prebuilt: no prebuilt extension in" in capsys.readouterr().err

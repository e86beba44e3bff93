"""replacing_directory / replacing_file: the target is either the previous version or the complete new one, never a
mix, and nothing of a failed write stays behind (with and without the one-step exchange of renameat2)."""
import os
import stat

import pytest

from lit_lowrank import atomic
from lit_lowrank.atomic import foreign_files, partial_siblings, replacing_directory, replacing_file


@pytest.fixture(params=["exchange", "two renames"])
def swap(request, monkeypatch):
    """Run each test with the atomic exchange and with the fallback for systems without renameat2."""
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def write(folder, **files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def listing(folder):
    return {path.relative_to(folder).as_posix(): path.read_text() for path in folder.rglob("*") if path.is_file()}


def test_the_folder_is_replaced_as_a_whole(tmp_path, swap):
    target = tmp_path / "export"
    with replacing_directory(target) as staging:
        write(staging, **{"model.safetensors.index.json": "old", "model-1.safetensors": "old", "sub/a": "old"})
    with replacing_directory(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".export.partial-")
        assert list(staging.iterdir()) == []
        write(staging, **{"model.safetensors": "new"})
    assert listing(target) == {"model.safetensors": "new"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]


def test_a_failed_write_leaves_the_previous_folder(tmp_path, swap):
    target = tmp_path / "export"
    with replacing_directory(target) as staging:
        write(staging, a="old")
    with pytest.raises(OSError, match="disk full"):
        with replacing_directory(target) as staging:
            write(staging, a="half")
            raise OSError("disk full")
    assert listing(target) == {"a": "old"} and partial_siblings(target) == []


def test_a_failed_first_write_leaves_no_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with replacing_directory(tmp_path / "export") as staging:
            write(staging, a="half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_failed_second_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "export"
    with replacing_directory(target) as staging:
        write(staging, a="old")
    real_replace = os.replace

    def failing_replace(source, destination):
        if os.path.basename(source).startswith(".export.partial-") and "-old-" not in os.path.basename(source):
            raise OSError("rename failed")
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        with replacing_directory(target) as staging:
            write(staging, a="new")
    assert listing(target) == {"a": "old"} and partial_siblings(target) == []


def test_the_leftover_of_a_killed_write_is_removed_by_the_next_one(tmp_path, swap):
    target = tmp_path / "export"
    with replacing_directory(target) as staging:
        write(staging, a="old")
    killed = tmp_path / ".export.partial-abc123"  # what a kill during the write leaves
    write(killed, a="half")
    assert partial_siblings(target) == [killed]
    with replacing_directory(target) as staging:
        write(staging, a="new")
    assert listing(target) == {"a": "new"} and partial_siblings(target) == []


def test_the_new_folder_has_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with replacing_directory(tmp_path / "export") as staging:
            write(staging, a="x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o755  # mkdtemp alone gives 0o700


def test_a_file_or_the_working_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file.*HINT"):
        with replacing_directory(tmp_path / "a_file"):
            pass
    (tmp_path / "here" / "inner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here" / "inner")
    for target in (tmp_path / "here", tmp_path / "here" / "inner"):
        with pytest.raises(ValueError, match="working directory.*HINT"):
            with replacing_directory(target):
                pass
    assert (tmp_path / "here" / "inner").is_dir()


def test_replacing_file(tmp_path):
    target = tmp_path / "last.ckpt"
    with replacing_file(target) as partial:
        partial.write_bytes(b"old")
    with pytest.raises(OSError):
        with replacing_file(target) as partial:
            partial.write_bytes(b"ha")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    with replacing_file(target) as partial:
        partial.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_foreign_files(tmp_path):
    write(tmp_path, **{"config.json": "{}", "sub/notes.txt": "mine"})
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    assert foreign_files(tmp_path, ours=["config.json"]) == ["link", "sub/notes.txt"]
    assert foreign_files(tmp_path, ours=["config.json", "link", "sub/notes.txt"]) == []
    assert foreign_files(tmp_path / "missing") == []


def test_the_exchange_swaps_two_folders_in_one_step(tmp_path):
    write(tmp_path / "a", x="in a")
    write(tmp_path / "b", y="in b")
    if not atomic._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system: the two-rename path is used")
    assert listing(tmp_path / "a") == {"y": "in b"} and listing(tmp_path / "b") == {"x": "in a"}

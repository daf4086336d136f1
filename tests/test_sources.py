"""expand_sources: folders, globs, list files, stdin, usage errors, duplicates."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from segcli.data.sources import IMAGE_EXTENSIONS, InputItem, expand_sources
from segcli.errors import UsageError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _names(items: list[InputItem]) -> list[str]:
    return [item.file_name for item in items]


def test_folder_is_recursive_sorted_and_filtered(tmp_path):
    root = tmp_path / "photos"
    _touch(root, "b.jpg", "a.PNG", "sub/z.tif", "sub/deeper/c.webp", "A/x.jpeg", "notes.txt", "data.json")
    _touch(root, ".hidden.jpg", ".cache/thumb.jpg", "sub/.git/y.png", "noext")
    items = expand_sources([str(root)])
    assert _names(items) == ["A/x.jpeg", "a.PNG", "b.jpg", "sub/deeper/c.webp", "sub/z.tif"]
    assert all(item.path == root / item.file_name for item in items)


def test_extensions_are_the_documented_ones():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def test_folder_follows_file_symlinks_and_survives_loops(tmp_path):
    root = tmp_path / "root"
    _touch(root, "a.jpg", "sub/b.jpg")
    _touch(tmp_path, "outside/real.png")
    os.symlink(tmp_path / "outside" / "real.png", root / "linked.png")
    os.symlink(root, root / "sub" / "loop")  # a folder containing itself
    os.symlink(root / "sub" / "loop2", root / "sub" / "loop2")  # a link to itself
    os.symlink(tmp_path / "nowhere.jpg", root / "broken.jpg")
    items = expand_sources([str(root)])
    assert _names(items) == ["a.jpg", "linked.png", "sub/b.jpg"]


def test_folder_follows_symlinked_folders(tmp_path):
    _touch(tmp_path, "disk2/shots/x.jpg")
    _touch(tmp_path, "root/a.jpg")
    os.symlink(tmp_path / "disk2" / "shots", tmp_path / "root" / "more")
    assert _names(expand_sources([str(tmp_path / "root")])) == ["a.jpg", "more/x.jpg"]


def test_real_folder(tmp_path):
    folder = DATA / "coco_tiny" / "images" / "val2017"
    if not folder.is_dir():
        pytest.skip(f"real data not found: {folder}")
    items = expand_sources([str(folder)])
    assert _names(items) == sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".jpg")


def test_glob_with_double_star(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path, "set/a.png", "set/x/b.png", "set/x/y/c.png", "set/x/d.jpg", "set/.h/e.png")
    (tmp_path / "set" / "dir.png").mkdir()  # a folder matching the pattern is not a file
    items = expand_sources(["set/**/*.png"])
    assert _names(items) == ["a.png", "x/b.png", "x/y/c.png"]
    assert items[1].path == Path("set/x/b.png")


def test_glob_relative_to_leading_literal_folder(tmp_path):
    _touch(tmp_path, "a/b1/1.jpg", "a/b2/2.jpg", "a/c/3.jpg")
    items = expand_sources([str(tmp_path / "a" / "b?" / "*.jpg")])
    assert _names(items) == ["b1/1.jpg", "b2/2.jpg"]


def test_existing_file_with_glob_characters_is_a_file(tmp_path):
    _touch(tmp_path, "scan[1].png")
    items = expand_sources([str(tmp_path / "scan[1].png")])
    assert items == [InputItem(tmp_path / "scan[1].png", str(tmp_path / "scan[1].png"))]


def test_txt_list_relative_to_its_folder(tmp_path, monkeypatch):
    _touch(tmp_path, "lists/imgs/a.jpg", "elsewhere/b.jpg")
    (tmp_path / "lists" / "todo.txt").write_text(
        "# images to do\n\nimgs/a.jpg\r\n  \n" f"{tmp_path / 'elsewhere' / 'b.jpg'}\n" "imgs/vanished.jpg\n"
    )
    monkeypatch.chdir(tmp_path / "elsewhere")  # the current folder must not matter
    items = expand_sources([str(tmp_path / "lists" / "todo.txt")])
    assert _names(items) == ["imgs/a.jpg", str(tmp_path / "elsewhere" / "b.jpg"), "imgs/vanished.jpg"]
    assert items[0].path == tmp_path / "lists" / "imgs" / "a.jpg"
    assert items[2].path == tmp_path / "lists" / "imgs" / "vanished.jpg"  # kept: decoder reports it


def test_stdin_paths_relative_to_current_folder(tmp_path, monkeypatch):
    _touch(tmp_path, "a.jpg", "sub/b.png")
    monkeypatch.chdir(tmp_path)
    items = expand_sources(["-"], stdin=io.StringIO("a.jpg\n# skip\nsub/b.png\nmissing.jpg\n"))
    assert _names(items) == ["a.jpg", "sub/b.png", "missing.jpg"]
    assert [item.path.exists() for item in items] == [True, True, False]


def test_plain_file_of_any_extension_is_taken_as_given(tmp_path, monkeypatch):
    _touch(tmp_path, "weird.dat")
    monkeypatch.chdir(tmp_path)
    assert expand_sources(["./weird.dat"]) == [InputItem(Path("weird.dat"), "./weird.dat")]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("photos/", "SOURCE 'photos/' does not exist"),
        ("", "SOURCE '' does not exist"),
        ("a/*.png", "glob 'a/*.png' matched no files"),
    ],
)
def test_missing_sources_are_usage_errors(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="^" + re.escape(message) + "$"):
        expand_sources(["-", spec], stdin=io.StringIO("ok.jpg\n"))


def test_folder_without_images_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path, "empty/readme.md", "empty/.hidden.jpg")
    with pytest.raises(UsageError, match=r"^no images or videos found in 'empty' \(other files: \.md 1\)$"):
        expand_sources(["empty"])  # the hidden image is not counted: hidden files are not looked at


def test_empty_list_and_stdin_are_usage_errors(tmp_path):
    (tmp_path / "l.txt").write_text("# nothing\n\n")
    with pytest.raises(UsageError, match="no paths listed in"):
        expand_sources([str(tmp_path / "l.txt")])
    with pytest.raises(UsageError, match="no paths read from stdin"):
        expand_sources(["-"], stdin=io.StringIO(""))


def test_duplicates_kept_once_first_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path, "d/a.jpg", "d/b.jpg")
    os.symlink(tmp_path / "d" / "b.jpg", tmp_path / "alias.jpg")
    items = expand_sources(["d/a.jpg", "d", "alias.jpg", "d/*.jpg", "-"], stdin=io.StringIO("./d/a.jpg\n"))
    assert _names(items) == ["d/a.jpg", "b.jpg"]
    assert items[0].path == Path("d/a.jpg")


def test_same_file_name_from_two_sources_is_disambiguated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path, "day1/img.jpg", "day1/day2/img.jpg", "day2/img.jpg", "x/day2/img.jpg")
    items = expand_sources(["day1", "day2", "x/day2"])
    names = _names(items)
    assert names == ["day2/img.jpg", "img.jpg", "day2-2/img.jpg", "day2-3/img.jpg"]
    assert len(set(names)) == len(names)
    assert items[2].path == Path("day2/img.jpg") and items[3].path == Path("x/day2/img.jpg")
    # Deterministic: the same arguments give the same names.
    assert _names(expand_sources(["day1", "day2", "x/day2"])) == names


def test_folders_pick_up_videos_beside_images(tmp_path):
    from segcli.data.sources import VIDEO_EXTENSIONS

    assert {".mp4", ".avi", ".mkv", ".mov", ".webm"} <= VIDEO_EXTENSIONS
    _touch(tmp_path, "b.jpg", "cam/a.MP4", "c.mkv", "d.webm", "notes.srt", ".hidden.mov")
    items = expand_sources([str(tmp_path)])
    assert _names(items) == ["b.jpg", "c.mkv", "cam/a.MP4", "d.webm"]
    assert [item.is_video for item in items] == [False, True, True, True]
    assert expand_sources([str(tmp_path / "c.mkv")])[0].is_video  # a video named directly

"""gag_export/atomic.py: artifacts renamed into place get the mode a plain open()/mkdir() gives."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from gag_export.core.atomic import as_if_created_plainly, swap_into_place, umask


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(umask_022):
    assert umask() == 0o022
    os.umask(0o027)
    assert umask() == 0o027 and umask() == 0o027


def test_temp_files_and_folders_take_the_umask_mode(tmp_path, umask_022):
    # mkstemp/mkdtemp make 0600/0700 whatever the umask; renamed into place, an export would be
    # readable by its owner alone
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    assert (_mode(Path(name)), _mode(folder)) == (0o600, 0o700)
    assert _mode(as_if_created_plainly(Path(name))) == 0o644
    assert _mode(as_if_created_plainly(folder)) == 0o755
    swap_into_place(folder, tmp_path / "export")
    assert _mode(tmp_path / "export") == 0o755


def test_a_png_rewritten_in_place_stays_readable(tmp_path, umask_022):
    from PIL import Image

    from gag_export.images import save_png

    path = tmp_path / "image.png"
    save_png(Image.new("RGB", (4, 4)), path, {"prompt": "x"})
    assert _mode(path) == 0o644
    save_png(Image.new("RGB", (4, 4)), path, {"prompt": "y"})
    assert _mode(path) == 0o644

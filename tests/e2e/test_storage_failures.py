"""An export or a report of the session's FDT-guided run on a full disk: one line, and the same
command writes it again. (Whole runs that meet storage faults: tests/e2e/test_disturbances.py.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.checks import visible_files
from support.faults import mount_tmpfs

from dtm_ray import cli


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib
    import json

    found = {}
    for path in visible_files(folder):
        data = path.read_bytes()
        if path.name == "export.json":  # its time and run dir are the export's own
            meta = {k: v for k, v in json.loads(data).items() if k not in ("exported", "run_dir")}
            data = json.dumps(meta, sort_keys=True).encode()
        found[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return found


def _fill(path: Path, leave: int = 0) -> None:
    """Write zeros into `path` until its disk has `leave` bytes free (or none)."""
    with open(path, "ab") as fill:
        try:
            while True:
                room = os.statvfs(path.parent)
                left = room.f_bavail * room.f_frsize - leave
                if left <= 0:
                    return
                fill.write(b"\0" * min(left, 1 << 20))
                fill.flush()
        except OSError:
            pass  # full


def test_an_export_or_report_on_a_full_disk_is_one_line_and_the_same_command_writes_it_again(
    fdt_sparsify_run, tmp_path: Path, capsys
) -> None:
    """The export's weights (safetensors, which reports the disk in its own words) and the
    report's files fail like a run's tables: one line, exit 1, nothing that looks finished; once
    space is freed the same command writes the export the run wrote itself, byte for byte."""
    run, _ = fdt_sparsify_run
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "64m"):
        pytest.skip("mounting a tmpfs needs root and the mount command")
    try:
        ballast = disk / "ballast"
        _fill(ballast, leave=4 << 20)  # the tiny Llama's weights are 26 MB
        out = disk / "export"
        command = ["export", str(run), "--out", str(out)]
        code = cli.main(command)
        err = capsys.readouterr().err
        assert code == 1, err
        assert err == (
            f"dtm-ray: error: cannot write model.safetensors of the export to {out}: No space "
            "left on device (ENOSPC); run the same command again to resume once storage is back\n"
        )
        assert [p.name for p in disk.iterdir()] == ["ballast"]  # no export, no hidden folder

        _fill(ballast)  # not even a report's plots fit
        assert cli.main(["report", str(run), "--out", str(disk / "report")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dtm-ray: error: cannot write ") and err.count("\n") == 1
        assert f"of the report in {disk / 'report'}: No space left on device (ENOSPC)" in err

        ballast.unlink()  # space again: the same command
        assert cli.main(command) == 0, capsys.readouterr().err
        assert _hashes(out) == _hashes(run / "export")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)

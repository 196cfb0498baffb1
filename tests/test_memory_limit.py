"""The container's memory limit, as the service reads it from its cgroup (cgroup v1 and v2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.runtime import memory_limit_bytes, memory_limit_files


def tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc").write_text(proc)
    return tmp_path / "proc", root


@pytest.mark.parametrize(
    ("proc", "files", "limit"),
    [
        # v2 in a container (its own cgroup is the namespace's root)
        ("0::/\n", {"memory.max": "536870912\n"}, 536870912),
        ("0::/\n", {"memory.max": "max\n"}, None),
        # v2 on a host: the process's own cgroup, not the root's
        ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/memory.max": "268435456\n"}, 268435456),
        # v1: the memory controller's line
        (
            "9:cpu:/\n4:memory:/process_api/abc\n0::/\n",
            {"memory/process_api/abc/memory.limit_in_bytes": "1073741824\n"},
            1073741824,
        ),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),
        ("5:cpuacct,memory:/x\n", {"memory/x/memory.limit_in_bytes": "4096\n"}, 4096),
        # nothing readable, or nonsense
        ("0::/\n", {}, None),
        ("garbage\n", {"memory.max": "oops\n"}, None),
    ],
)
def test_memory_limit_bytes(
    tmp_path: Path, proc: str, files: dict[str, str], limit: int | None
) -> None:
    proc_cgroup, root = tree(tmp_path, proc, files)
    assert memory_limit_bytes(memory_limit_files(proc_cgroup, root)) == limit


def test_no_proc_file_falls_back_to_the_root(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "memory.max").write_text("1000\n")
    assert memory_limit_bytes(memory_limit_files(tmp_path / "missing", root)) == 1000


def test_the_files_are_found_once_and_the_limit_read_each_time(tmp_path: Path) -> None:
    proc_cgroup, root = tree(tmp_path, "0::/c\n", {"c/memory.max": "1000\n"})
    files = memory_limit_files(proc_cgroup, root)
    assert memory_limit_bytes(files) == 1000
    (root / "c" / "memory.max").write_text("2000\n")  # resized in place
    assert memory_limit_bytes(files) == 2000

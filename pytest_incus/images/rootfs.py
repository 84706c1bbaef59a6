"""Looking into a cached root filesystem from the host: paths resolved inside it, and whether
its init was damaged (cut short) in the cache.

Everything here reads the image's files as files of the image: a symlink is followed inside
the rootfs (an absolute target starts again at the rootfs, never at the host's ``/``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

MAX_LINKS = 40  # symlinks followed to find a program, as the kernel's limit
_PT_LOAD = 1


def inside(rootfs: Path, path: str) -> Path | None:
    """Where ``path`` (absolute, as the instance sees it) leads in ``rootfs``, symlinks
    followed inside it; None if it leads nowhere."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    current = rootfs
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != rootfs else rootfs
            continue
        step = current / part
        if step.is_symlink():
            links += 1
            if links > MAX_LINKS:
                return None
            target = os.readlink(step)
            parts[:0] = [p for p in target.split("/") if p not in ("", ".")]
            if target.startswith("/"):
                current = rootfs
            continue
        if not step.exists():
            return None
        current = step
    return current


def _elf_problem(head: bytes, size: int, read_at: Path) -> str | None:
    """What makes an ELF file of ``size`` bytes (``head``: its first 64) unloadable: a header
    or a loaded segment that reaches past its end (a truncated copy)."""
    wide = len(head) > 4 and head[4] == 2
    if len(head) < (64 if wide else 52) or head[4] not in (1, 2) or head[5] not in (1, 2):
        return f"truncated or damaged ({size} bytes, no whole ELF header)"
    order = "<" if head[5] == 1 else ">"
    if wide:
        (phoff,) = struct.unpack_from(order + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 0x36)
        entry = order + "IIQQQQ"  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz
    else:
        (phoff,) = struct.unpack_from(order + "I", head, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 0x2A)
        entry = order + "IIIII"  # p_type, p_offset, p_vaddr, p_paddr, p_filesz
    end = phoff + phentsize * phnum
    if end > size or phentsize < struct.calcsize(entry):
        return f"truncated ({size} bytes, but its program headers end at byte {end})"
    with open(read_at, "rb") as f:
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        fields = struct.unpack_from(entry, table, i * phentsize)
        if wide:
            p_type, offset, filesz = fields[0], fields[2], fields[5]
        else:
            p_type, offset, filesz = fields[0], fields[1], fields[4]
        if p_type == _PT_LOAD and offset + filesz > size:
            return f"truncated ({size} bytes, but it loads bytes up to {offset + filesz})"
    return None


def init_damage(rootfs: Path) -> str | None:
    """How the ``/sbin/init`` of ``rootfs`` was cut short (an empty file, or an ELF program
    whose headers or loaded segments reach past its end: what a full disk or a killed copy
    leaves), or None. A missing init, or one that is no program, is the image's own doing, not
    damage: its start says so. Reads a few hundred bytes."""
    target = inside(rootfs, "/sbin/init")
    if target is None or not target.is_file():
        return None
    where = "/" + str(target.relative_to(rootfs))
    named = "/sbin/init" if where == "/sbin/init" else f"/sbin/init ({where})"
    size = target.stat().st_size
    if size == 0:
        return f"{named} is empty"
    with open(target, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"\x7fELF"):
        return None
    problem = _elf_problem(head, size, target)
    return None if problem is None else f"{named} is {problem}"

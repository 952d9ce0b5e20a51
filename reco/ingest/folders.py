"""Images from an ImageFolder class tree (root/<class>/<image>), captions from a template."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .sources import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_BYTES,
    ItemSource,
    RawItem,
    _check_count,
    _file_reader,
    _fingerprint,
    _stat_folder,
)


def _check_template(template: object) -> None:
    probe = ""
    if isinstance(template, str):
        try:
            probe = template.format("\0")
        except (IndexError, KeyError, ValueError, AttributeError, TypeError):
            pass
    if "\0" not in probe:
        raise ValueError(
            f"template {template!r} must hold one '{{}}' for the class name (and other braces "
            "doubled: '{{' and '}}')"
        )


def iter_image_folder(
    root: str | os.PathLike,
    template: str = "a photo of a {}.",
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> ItemSource:
    """An ImageFolder tree (root/<class>/<image>): captions from the template, labels = the class
    folders (sorted; ItemSource.label_names). The tree is listed now.

    Identity: {"kind": "image_folder", "path": <root, resolved>, "template": template,
    "fingerprint": <sha256 of the listing: class, file name, size, mtime_ns of every image>}.
    """
    _check_template(template)
    _check_count("max_image_bytes", max_image_bytes)
    root = Path(root)
    _stat_folder(root, "image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class folders (<dir>/<class>/<image>)")
    listing: list[tuple[str, str, int, int]] = []
    for cls in classes:
        for name in sorted(os.listdir(root / cls)):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                try:
                    st = os.stat(root / cls / name)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:  # e.g. a dangling symlink: unreadable when read
                    size, mtime = -1, -1
                listing.append((cls, name, size, mtime))
    source = {
        "kind": "image_folder",
        "path": str(root.resolve()),
        "template": template,
        "fingerprint": _fingerprint(listing),
    }

    def items() -> Iterator[RawItem]:
        for cls, name, _, _ in listing:
            path = root / cls / name
            caption = template.format(cls.replace("_", " "))
            yield RawItem(str(path), caption, _file_reader(path, max_image_bytes), cls)

    return ItemSource(source, items, classes)

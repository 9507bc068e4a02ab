"""How often a merge opens each file: open images are passed through a merge, not paths."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import vhdx.ops.merge.run
from vhdx.errors import MergeError
from vhdx.file.image import Image

from support.merging import merge
from .test_merge_finish import small_chain


def count_opens(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count Image.open calls by (file name, mode) from now on."""
    opens: Counter = Counter()
    real = Image.open.__func__

    def counting(cls: Any, path: Any, mode: str = "r", **kwargs: Any) -> Image:
        opens[(Path(path).name, mode)] += 1
        return real(cls, path, mode, **kwargs)

    monkeypatch.setattr(Image, "open", classmethod(counting))
    return opens


@pytest.mark.parametrize("into", [False, True])
def test_a_merge_of_three_files_opens_the_destination_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              into: bool) -> None:
    base, mid, leaf, _model = small_chain(tmp_path)
    role = {Path(base).name: "base", Path(mid).name: "mid", Path(leaf).name: "leaf"}
    opens = count_opens(monkeypatch)
    merge(leaf, base if into else None)
    by_role = {(role[name], mode): n for (name, mode), n in sorted(opens.items())}
    print(f"opens: {sum(opens.values())}: {by_role}")
    dest = "base" if into else "mid"
    assert by_role.get((dest, "r"), 0) <= 1 and by_role.get((dest, "r+"), 0) <= 1, by_role


def test_finishing_an_interrupted_merge_opens_the_destination_twice(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge that stopped after its copy: the re-run reads the journal from the resolved chain."""
    base, mid, leaf, _model = small_chain(tmp_path)
    role = {Path(base).name: "base", Path(mid).name: "mid", Path(leaf).name: "leaf"}
    cleanup = vhdx.ops.merge.run.complete

    def stop(*args: Any) -> list[str]:
        raise OSError(5, "simulated crash before the cleanup")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vhdx.ops.merge.run, "complete", stop)
        with pytest.raises(MergeError):
            merge(leaf, base)
    assert vhdx.ops.merge.run.complete is cleanup
    opens = count_opens(monkeypatch)
    result = merge(leaf, base)
    assert result.plan.resuming and not result.bytes_copied and len(result.deleted) == 2
    by_role = {(role[name], mode): n for (name, mode), n in sorted(opens.items())}
    print(f"opens: {sum(opens.values())}: {by_role}")
    assert by_role.get(("base", "r"), 0) <= 1 and by_role.get(("base", "r+"), 0) <= 1, by_role

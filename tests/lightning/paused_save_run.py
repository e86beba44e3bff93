"""``lit-lowrank`` whose NTH checkpoint save at global step STEP stops half-way through, waiting to be killed: that
save writes the first half of its bytes to the file it was given, puts that file's path in the MARKER file, and
sleeps. Run by test_atomic_checkpoint.py, which kills it there (SIGKILL) and resumes from the previous checkpoint.

    python paused_save_run.py STEP NTH MARKER fit --config ...
"""
import io
import os
import sys
import time
from pathlib import Path

import torch


def pausing(save, step: int, nth: int, marker: Path):
    """``torch.save`` that, for the ``nth`` save of a checkpoint of global step ``step``, writes half of it and
    waits forever."""
    saves = []

    def paused_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == step:
            saves.append(f)
            if len(saves) == nth:
                pause_half_way(save, obj, f, marker)
        return save(obj, f, *args, **kwargs)

    return paused_save


def pause_half_way(save, obj, f, marker: Path) -> None:
    buffer = io.BytesIO()
    save(obj, buffer)
    half = buffer.getvalue()[:buffer.tell() // 2]
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as file:
            file.write(half)
    else:  # a buffer (Lightning's own TorchCheckpointIO): nothing on disk yet
        f.write(half)
    written = marker.with_name(marker.name + ".tmp")
    written.write_text(str(f) if isinstance(f, (str, os.PathLike)) else repr(f))
    os.replace(written, marker)  # whole, for the test that polls it
    time.sleep(600)


def main() -> None:
    step, nth, marker, *cli_args = sys.argv[1:]
    torch.save = pausing(torch.save, int(step), int(nth), Path(marker))
    from lit_lowrank.cli import main as cli_main

    cli_main(cli_args)


if __name__ == "__main__":
    main()

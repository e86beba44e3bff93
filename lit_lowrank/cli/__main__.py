"""``python -m lit_lowrank.cli fit --config ...``: the same command as ``lit-lowrank`` and ``python cli.py``."""
from lit_lowrank.cli.entry import main

if __name__ == "__main__":  # not when imported (the docstring test imports every module)
    main()

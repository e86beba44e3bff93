"""Entry point: ``python cli.py fit --config configs/quickstart.yaml`` (see ``python cli.py --help``)."""
from lit_lowrank.cli import main

if __name__ == "__main__":
    main()

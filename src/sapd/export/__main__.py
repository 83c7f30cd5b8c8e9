"""``python -m sapd.export``: the command of :mod:`sapd.export.cli`."""

from sapd.export.cli import main

if __name__ == "__main__":
    main()

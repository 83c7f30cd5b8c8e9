"""``python -m sapd.report``: the command of :mod:`sapd.report.command`."""

from sapd.report.command import main

if __name__ == "__main__":
    main()

"""``python -m sdmaker`` = the ``sdmaker`` command."""

from sdmaker.cli import main

if __name__ == "__main__":
    main()

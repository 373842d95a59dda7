"""``python -m mproxy``."""

from mproxy.cli import main

if __name__ == "__main__":
    main()

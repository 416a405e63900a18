"""atheris harness: the snapshot parser (see fuzz/targets.py and fuzz/README.md)."""

import sys

import atheris

with atheris.instrument_imports():
    from targets import TARGETS


def main() -> None:
    atheris.Setup(sys.argv, TARGETS["snapshot"])
    atheris.Fuzz()


if __name__ == "__main__":
    main()

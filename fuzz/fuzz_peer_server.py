"""atheris harness: the peer_server parser (see fuzz/targets.py and fuzz/README.md)."""

import sys

import atheris

with atheris.instrument_imports():
    from targets import TARGETS


def main() -> None:
    atheris.Setup(sys.argv, TARGETS["peer_server"])
    atheris.Fuzz()


if __name__ == "__main__":
    main()

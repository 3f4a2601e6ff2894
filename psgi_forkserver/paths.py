"""Where the Perl side is: inside the installed package, or in the repository."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def perl_dir() -> Path:
    """psgi_forkserver/perl/ when installed from a wheel, else the repo's perl/."""
    installed = HERE / "perl"
    if (installed / "ForkServer.pm").is_file():
        return installed
    return HERE.parent / "perl"


def vassal_program() -> Path:
    return perl_dir() / "ForkServer.pm"

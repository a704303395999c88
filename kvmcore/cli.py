"""The ``kvmcore`` command."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="kvmcore")
def main() -> None:
    """kvmcore: an executable, pluggable model of the Linux KVM MMU."""

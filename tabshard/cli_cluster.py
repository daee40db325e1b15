"""Cluster commands (serve, worker, status, demo); filled in as the coordinator lands."""


def add_commands(sub) -> None:
    return None

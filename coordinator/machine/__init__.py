"""The coordinator's sub-machines, one owner each (coordinator/state.py composes them)."""

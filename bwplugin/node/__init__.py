"""Processes on the node: the resident agent, the thin executable, the installer.

The top layer: may import everything below it."""

"""bwplugin: a CNI bandwidth meta-plugin shaping pod traffic with eBPF, tc and ifb."""

__version__ = "0.1.0"

"""The kernel side: rtnetlink, tc objects, the eBPF loader and maps, TBF/HTB maths, probes.

Imports only the CNI contract below it."""

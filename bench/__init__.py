"""bwplugin benchmarks: shaping accuracy and cost, side by side with the
reference Go bandwidth plugin, in one interleaved run."""

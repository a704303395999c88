"""The project's performance figures, each measured in one run so that ratios are honest on a
noisy machine. ``kvmcore bench`` and ``benchmarks/`` call these functions."""

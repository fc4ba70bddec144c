"""Benchmarks, run by hand on the CPU; results go to BENCHMARKS.md.

    python3 -m bench                         # training: Danlu vs diffusers' example scripts (quick)
    python3 -m bench --full                  # the same on an SD1.5-shaped model at 256 px
    python3 -m bench.preprocess_throughput   # dataset preparation vs a plain PIL loop

Modules: fixtures (models, photos), danlu_run (one Danlu run per process), baselines +
script_timer (one diffusers script run per process, torchvision_standin for its imports),
ui_overhead, matmul_peak, flopcount (step clocks, FLOP counting), report (markdown).
"""

"""Running a job: one round at a time (reference, calibration, probes), the sparsify and quantize
loops, the driver that ties them to the final evaluation, and the cost estimate."""

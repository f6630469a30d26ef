"""The machine: its hardware, the auto settings, the environment report, the process group, throughput."""

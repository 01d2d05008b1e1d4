"""Running a whole mesh on one machine: the process launcher and the NATS server behind `hivewire up`."""

"""Running a whole mesh on one machine: the launcher and NATS server behind `hivewire up`."""

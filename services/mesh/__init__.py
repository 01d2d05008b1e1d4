"""Running a whole mesh on one machine: the launcher, the NATS server and the development
PKI behind `hivewire up` and `hivewire certs`.
"""

"""Runtimes: the round loop, client selection, and the transports clients sit behind."""

"""`vtn demo`."""


def register(sub, bench_sub) -> None:
    pass

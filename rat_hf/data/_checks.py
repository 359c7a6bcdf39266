"""Argument checks shared by the data modules: a clear ValueError that names the argument."""


def check_int(name: str, value, minimum: int) -> int:
    """Return `value` if it is an integer >= `minimum` (bools rejected), else raise ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value

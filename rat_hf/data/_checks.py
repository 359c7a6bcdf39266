"""Checks shared by the data modules: a clear ValueError that names the argument, or why a file line is unreadable."""


def check_int(name: str, value, minimum: int) -> int:
    """Return `value` if it is an integer >= `minimum` (bools rejected), else raise ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def decode_utf8_line(raw: bytes, lineno: int) -> str:
    """One line of a JSONL file read in binary, as text; ValueError with the reason if it is not UTF-8.

    A UTF-8 byte-order mark on line 1 is dropped. UTF-16/UTF-32 (NUL bytes, byte-order marks) and Latin-1/cp1252
    bytes are named as such, so the caller can report `path:line: reason`.
    """
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors) is harmless
        raw = raw[3:]
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise ValueError("not UTF-8 text: NUL bytes or a byte-order mark, as in UTF-16/UTF-32; "
                         "re-save the file as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text: byte 0x{raw[err.start]:02x} at column {err.start + 1} cannot be decoded "
                         "(Latin-1 or cp1252?); re-save the file as UTF-8") from None



def version_string(prog: str) -> str:
    """``--version`` text: the installed distribution's version (``policymesh``), or "unknown" from a
    bare source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("policymesh")
    except PackageNotFoundError:
        v = "unknown"
    return f"{prog} (policymesh) {v}"

"""meddet: shared components of the pre-trained 3D detection bundle collection.

Every bundle's JSON references this package by full dotted path; `require_version` is the first step of
each bundle's `initialize` so that a missing or outdated installation fails before any work is done.
"""

__version__ = "0.4.0"


def _as_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_version(minimum: str) -> bool:
    """Raise a clear error when the installed meddet is older than `minimum`; return True otherwise.

    Versions compare numerically (0.10.0 > 0.9.0), never as strings.
    """
    if _as_tuple(__version__) < _as_tuple(minimum):
        raise RuntimeError(
            f"this bundle needs meddet >= {minimum}, but meddet {__version__} is installed "
            f"(from {__file__}); install a newer meddet (pip install -e . in the collection's repository)"
        )
    return True

"""meddet: shared components of the pre-trained 3D detection bundle collection.

Every bundle's JSON references this package by full dotted path; `require_version` is the first step of
each bundle's `initialize` so that a missing or outdated installation fails before any work is done.
"""

import re

__version__ = "0.4.0"


VERSION_PATTERN = r"\d+(\.\d+)*"
#: a whole version string: digits separated by dots, nothing else
VERSION_RE = re.compile(rf"^{VERSION_PATTERN}$")


def version_key(version: str) -> tuple[int, ...]:
    """Numeric sort key of a dotted version: "0.10.0" -> (0, 10, 0), so 0.10.0 sorts after 0.9.0; anything that is
    not digits separated by dots is an error."""
    if not VERSION_RE.match(str(version)):
        raise ValueError(f"version {version!r} is not a dotted number such as 0.1.0")
    return tuple(int(part) for part in str(version).split("."))


def require_version(minimum: str) -> bool:
    """Raise a clear error when the installed meddet is older than `minimum`; return True otherwise.

    Versions compare numerically (0.10.0 > 0.9.0), never as strings.
    """
    # a source checkout's local part ("0.4.0+abc") does not change what it provides
    if version_key(__version__.split("+", 1)[0]) < version_key(minimum):
        raise RuntimeError(
            f"this bundle needs meddet >= {minimum}, but meddet {__version__} is installed "
            f"(from {__file__}); install a newer meddet (pip install -e . in the collection's repository)"
        )
    return True

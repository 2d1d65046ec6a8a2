"""Kubernetes object names and value formats, shared by manifest rendering and validation.

The name limits are the KubeRay operator's (its generated Service names append suffixes to the object
name); the patterns are the API server's (DNS-1035 / DNS-1123 names, label keys and values, quantities).
"""

from __future__ import annotations

import re

__all__ = [
    "DNS1035_LABEL",
    "DNS1123_LABEL",
    "DNS1123_SUBDOMAIN",
    "LABEL_KEY",
    "LABEL_VALUE",
    "MAX_NAME_LEN",
    "QUANTITY",
    "derived_name",
    "sanitize_name",
]

# Limits the KubeRay operator enforces on names (its Service names append suffixes to them).
MAX_NAME_LEN = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


def sanitize_name(raw: str, *, max_len: int = 47, what: str = "name") -> str:
    """Turn `raw` into a DNS-1035 label (lowercase letters, digits and `-`, starting with a letter).

    Cosmetic problems are fixed: upper case is lowered and runs of other characters (`_`, `.`, spaces, `/`) become
    one `-`. Anything that would need a guess is an error (`ValueError` naming the input): nothing left after
    cleaning, a first character that is not a letter, or more than `max_len` characters (47 for a RayJob or
    RayService, whose generated cluster and Service names add suffixes; 53 for a RayCluster; 63 for a label).
    """
    if not isinstance(raw, str):
        raise TypeError(f"{what} must be a string, got {type(raw).__name__}")
    name = re.sub(r"[^a-z0-9]+", "-", raw.strip().lower()).strip("-")
    if not name:
        raise ValueError(f"{what} {raw!r} has no letters or digits: cannot make a Kubernetes name from it")
    if not name[0].isalpha():
        raise ValueError(
            f"{what} {raw!r} must start with a letter (Kubernetes DNS-1035 label, e.g. 'run-{name}')"
        )
    if len(name) > max_len:
        raise ValueError(
            f"{what} {raw!r} is {len(name)} characters after cleaning ({name!r}); the limit is {max_len}"
        )
    return name


def derived_name(prefix: str, slug: str | None, digest: str, max_len: int) -> str:
    """`prefix-slug` (slug cleaned and cut to fit) or `prefix-digest` when there is no usable slug."""
    if slug:
        cleaned = re.sub(r"[^a-z0-9]+", "-", str(slug).lower()).strip("-")
        if cleaned:
            room = max_len - len(prefix) - 1
            return f"{prefix}-{cleaned[:room].rstrip('-')}"
    return f"{prefix}-{digest}"[:max_len].rstrip("-")

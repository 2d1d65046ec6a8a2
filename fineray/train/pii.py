"""Personal data and secrets in text: find them by kind, and redact them with placeholder tokens.

`presidio-analyzer` does not run offline here: its `AnalyzerEngine` downloads a spaCy model (`en_core_web_lg`)
from GitHub on first use, and no spaCy model ships on PyPI under its own name. So fineray uses this documented
set of recognisers, pure Python and deterministic (what is and is not found is the contract tests check):

    kind     placeholder  what is found
    email    <EMAIL>      local@domain.tld
    phone    <PHONE>      +CC followed by 8-15 digits, NANP (555) 123-4567 / 555-123-4567 / 555.123.4567,
                          national numbers with a leading 0 and separators (020 7946 0958)
    card     <CARD>       13-19 digits (spaces/dashes allowed) that pass the Luhn check
    iban     <IBAN>       country code + check digits + BBAN of the country's length, passing ISO 7064 mod 97
    ip       <IP>         IPv4 (every octet <= 255) and IPv6 addresses
    secret   <SECRET>     AWS access keys, sk-/pk-/rk- API keys, GitHub/Slack/Google tokens, JWTs, PEM private
                          keys, and `api_key=...`, `password: ...`, `token=...` style assignments
    name     <NAME>       a capitalised name after a cue: "my name is", "I am", "Dear", "Hi/Hello", "Mr/Ms/Dr",
                          "Regards,"/"Thanks,", or a signature line "- Maria" at the end of a text

Names without a cue are not found (that needs a trained NER model). Spans are found in the order above; a
later kind never overlaps an earlier one (a card number is not also a phone number).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

__all__ = ["PII_KINDS", "PLACEHOLDERS", "PiiFinding", "find_pii", "iban_valid", "luhn_valid", "redact"]

PII_KINDS = ("email", "secret", "card", "iban", "ip", "phone", "name")
PLACEHOLDERS = {k: f"<{k.upper()}>" for k in PII_KINDS}


@dataclass(frozen=True)
class PiiFinding:
    """One span of personal data: `text[start:end]` is of `kind`."""

    kind: str
    start: int
    end: int
    value: str


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) checksum of payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IBAN length per country (ISO 13616 registry); a wrong length is not an IBAN.
_IBAN_LEN = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21,
    "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18,
    "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23,
    "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_valid(iban: str) -> bool:
    """Country length and the ISO 7064 mod-97 check of an IBAN (spaces ignored)."""
    s = iban.replace(" ", "").upper()
    if _IBAN_LEN.get(s[:2]) != len(s):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
_SECRET = re.compile(
    r"\bAKIA[0-9A-Z]{16}\b"
    r"|\b(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{16,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\bAIza[0-9A-Za-z_-]{35}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|(?i:\b(?:api[_-]?key|secret(?:[_-]key)?|access[_-]?token|auth[_-]?token|token|password|passwd|pwd)"
    r"\b\s*[:=]\s*[\"']?)(?P<v>[^\s\"',;]{8,})"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}(?!\d)"
    r"|(?<!\w)\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?!\d)"
    r"|(?<![\w-])\d{3}[.-]\d{3}[.-]\d{4}(?![\w-])"
    r"|(?<![\w-])0\d{2,4}[ -]\d{3,4}[ -]?\d{3,4}(?![\w-])"
)
_NAME_WORD = r"[A-Z][a-z]+(?:[-'][A-Z]?[a-z]+)?"
_NAME = re.compile(
    r"\b(?:[Mm]y name is|I am|I'm|[Tt]his is|Dear|Hi|Hello|Hey|Mr\.?|Mrs\.?|Ms\.?|Dr\.?|[Rr]egards,|"
    rf"[Tt]hanks,|[Cc]heers,|[Ss]incerely,)\s+(?P<n>{_NAME_WORD}(?: {_NAME_WORD})?)"
    # A signature: "- Maria" (or an en/em dash) closing a line or the text.
    rf"|(?:^|\s)[-\u2013\u2014~]\s?(?P<s>{_NAME_WORD}(?: {_NAME_WORD})?)[.!]?\s*$",
    re.MULTILINE,
)
# Words after a cue that are not names ("Hi Support", "I am Unable", "- Thanks").
_NOT_NAMES = frozenset(["The", "A", "An", "And", "Or", "But", "Not", "No", "Yes", "Support", "Team", "Sir", "Madam", "All", "There", "Everyone", "Customer", "Service", "Thanks", "Thank", "Please", "Sorry", "Unable", "Writing", "Here", "Still", "Also", "Just", "So", "Good", "Morning", "Afternoon", "Evening", "Again", "Urgent", "Re", "Fwd", "Order", "Product", "Your", "Our", "My", "This", "That", "It", "We", "They", "He", "She", "You", "Hope"])


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


# Cheap gates (substring tests and simple scans run in C) before the full patterns, which cost ~0.1-0.5 ms each
# on a 400-character text: most texts hold none of these kinds.
_SECRET_HINTS = ("akia", "sk-", "pk-", "rk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "xox", "aiza", "eyj", "-----begin")
_ASSIGN_HINT = re.compile(r"(?i)(?:key|secret|token|passw(?:or)?d|pwd)\s*[:=]")
_NAME_HINTS = ("name is", "I am", "I'm", "his is", "Dear", "Hi ", "Hello", "Hey", "Mr", "Ms", "Dr", "egards,",
               "hanks,", "heers,", "incerely,", "- ", "\u2013", "\u2014", "~")
_DIGIT_RUN = re.compile(r"\d[\d ().-]{5,}\d")  # 7+ digits-and-separators: a card, phone or IBAN tail
_IBAN_HEAD = re.compile(r"[A-Z]{2}\d\d")
_NO_DIGITS = str.maketrans("", "", "0123456789")


def _candidates(text: str) -> list[PiiFinding]:
    out: list[PiiFinding] = []
    if "@" in text:
        out += [PiiFinding("email", m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)]
    low = text.lower()
    if any(h in low for h in _SECRET_HINTS) or (("=" in text or ":" in text) and _ASSIGN_HINT.search(text)):
        for m in _SECRET.finditer(text):  # of `password=VALUE` only VALUE is secret
            g = "v" if m.group("v") else 0
            out.append(PiiFinding("secret", m.start(g), m.end(g), m.group(g)))
    digits = len(text) - len(text.translate(_NO_DIGITS))
    if digits >= 7 and _DIGIT_RUN.search(text):
        out += [PiiFinding("card", m.start(), m.end(), m.group()) for m in _CARD.finditer(text)
                if luhn_valid(_digits(m.group()))]
        out += [PiiFinding("phone", m.start(), m.end(), m.group()) for m in _PHONE.finditer(text)
                if 7 <= len(_digits(m.group())) <= 15]
    if digits >= 2 and _IBAN_HEAD.search(text):
        out += [PiiFinding("iban", m.start(), m.end(), m.group()) for m in _IBAN.finditer(text)
                if iban_valid(m.group())]
    if digits >= 4 and text.count(".") >= 3:
        out += [PiiFinding("ip", m.start(), m.end(), m.group()) for m in _IPV4.finditer(text)
                if _is_ip(m.group())]
    if text.count(":") >= 2:
        out += [PiiFinding("ip", m.start(), m.end(), m.group()) for m in _IPV6.finditer(text)
                if m.group().count(":") >= 2 and _is_ip(m.group())]
    if not any(h in text for h in _NAME_HINTS):
        return out
    for m in _NAME.finditer(text):
        group = "n" if m.group("n") else "s"
        name = m.group(group)
        first = name.split(" ")[0]
        if first in _NOT_NAMES:
            continue
        if name.split(" ")[-1] in _NOT_NAMES:  # "Dear Maria Thanks" -> "Maria"
            name = first
        out.append(PiiFinding("name", m.start(group), m.start(group) + len(name), name))
    return out


def find_pii(text: str) -> list[PiiFinding]:
    """Non-overlapping findings in `text`, by position; on overlap the kind listed first in `PII_KINDS` wins.

    Args:
        text: any string (a prompt, a response, a whole record rendered as text).

    Returns:
        Findings sorted by start offset.
    """
    if not text:
        return []
    rank = {k: i for i, k in enumerate(PII_KINDS)}
    kept: list[PiiFinding] = []
    for f in sorted(_candidates(text), key=lambda f: (rank[f.kind], f.start)):
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def redact(text: str, kinds: tuple[str, ...] | None = None) -> tuple[str, Counter[str]]:
    """`text` with every finding replaced by its placeholder (`<EMAIL>`, `<CARD>`, ...) and counts by kind.

    Args:
        kinds: only these kinds (default: all of `PII_KINDS`).
    """
    findings = [f for f in find_pii(text) if kinds is None or f.kind in kinds]
    if not findings:
        return text, Counter()
    parts, pos = [], 0
    for f in findings:
        parts.append(text[pos:f.start])
        parts.append(PLACEHOLDERS[f.kind])
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts), Counter(f.kind for f in findings)

"""PII recognisers: each kind is found and redacted, checksums gate cards and IBANs, clean text stays clean."""

from __future__ import annotations

import pytest

from fineray.train.pii import PLACEHOLDERS, find_pii, iban_valid, luhn_valid, redact

PLANTED = {
    "email": ["Reach me at maria.lopez+shop@example.co.uk today", "cc: J.Doe@corp-mail.com"],
    "phone": ["call +44 20 7946 0958 after 5", "my cell is (555) 123-4567", "or 555.867.5309", "uk 020 7946 0958"],
    "card": ["card 4111 1111 1111 1111 exp 12/29", "paid with 5500-0000-0000-0004", "amex 378282246310005"],
    "iban": ["IBAN GB82 WEST 1234 5698 7654 32 please", "pay to DE89370400440532013000"],
    "ip": ["the server 192.168.10.254 is down", "from 2001:db8::8a2e:370:7334 at noon"],
    "secret": ["key sk-proj-AbCdEfGh1234567890XyZ", "AKIAIOSFODNN7EXAMPLE leaked", "password=hunter2hunter2",
               "ghp_" + "a1B2" * 9, "token: eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N"],
    "name": ["Dear Maria, thanks", "my name is John Smith.", "Thanks for checking. - Aisha", "Regards,\nAnna Lee"],
}
CLEAN = [
    "My order #12345 arrived broken. Please help.",
    "Version 1.2.3 of the app crashes on start",
    "Dear team, the kettle is late. Not urgent.",
    "I paid 49.99 on 2024-05-01 for order 55773",
    '{"product": "ZenKettle", "order_id": "55773", "issue": "damaged", "urgency": "low"}',
    "Hi, the FlexDesk wobbles - Thanks",
    "call me maybe, room 101, build 4411",
]


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_each_kind_is_found_and_redacted(kind):
    for text in PLANTED[kind]:
        # Execute
        found = find_pii(text)
        red, counts = redact(text)
        # Assert
        assert [f.kind for f in found] == [kind], (text, found)
        assert counts == {kind: 1} and PLACEHOLDERS[kind] in red
        assert found[0].value not in red


def test_clean_text_stays_clean():
    for text in CLEAN:
        assert find_pii(text) == [], text
        assert redact(text) == (text, {})


def test_checksums_gate_cards_and_ibans():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB83 WEST 1234 5698 7654 32")
    # Luhn-invalid digit runs and IBAN-shaped strings with a bad check are not flagged.
    assert find_pii("ref 4111 1111 1111 1112 and GB83WEST12345698765432") == []


def test_redaction_keeps_the_text_around_the_findings():
    red, counts = redact("Mail a@b.io or call +1 415 555 0100, card 4111111111111111.")
    assert red == "Mail <EMAIL> or call <PHONE>, card <CARD>."
    assert counts == {"email": 1, "phone": 1, "card": 1}
    assert redact("a@b.io and c@d.io", kinds=("phone",)) == ("a@b.io and c@d.io", {})

"""Phone numbers: the one E.164 check and the one masking helper."""

from __future__ import annotations

from botonera_bridge.ids import as_e164, is_e164, mask_phone, message_ref


def test_e164() -> None:
    assert is_e164("+573001112233")
    assert not is_e164("573001112233")  # config wants the plus
    assert not is_e164("+0573001112233")
    assert not is_e164("+57300")
    assert as_e164("573001112233") == "+573001112233"  # gateways send bare digits
    assert as_e164("+573001112233") == "+573001112233"
    assert as_e164("5730011122334455667788") is None
    assert as_e164("status") is None


def test_message_ids_are_masked_like_numbers() -> None:
    assert message_ref("false_573001112233@c.us_ABC") == "false_+57******2233@c.us_ABC"
    ref = message_ref("wamid.HBgMNTczMDAxMTEyMjMzFQIAEhgg")
    assert ref.startswith("wamid#")
    assert "NTcz" not in ref
    assert mask_phone("+573001112233") == "+57******2233"

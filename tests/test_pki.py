"""The pure PKI helpers: serials, validity, key rules, names, signatures, template info, durations."""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import secrets
from collections.abc import Iterator
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certpulse.durations import format_duration, parse_duration
from certpulse.errors import Reason, Refusal
from certpulse.pki import build, names, signing, template_info
from certpulse.pki.build import (
    MIN_SERIAL,
    build_ca_certificate,
    end_entity_builder,
    inclusive_not_after,
    random_serial,
    signature_hash,
    simple_name,
)
from certpulse.pki.keys import PrivateKey, check_public_key, describe_public_key
from certpulse.pki.names import RequestedNames

NOW = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
SETTINGS = settings(max_examples=75, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.cache
def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ec_key(curve: str = "secp256r1") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVES[curve])


_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
    "secp256k1": ec.SECP256K1(),
}


@functools.cache
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_ca_certificate(
        subject=simple_name("Test Root", "certpulse tests"), public_key=key.public_key(),
        issuer_cert=None, signing_key=key, not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=3650), path_length=None,
    )
    return cert, key


def end_entity(
    serial: int, extra: tuple[x509.ExtensionType, ...] = (), key: PrivateKey | None = None
) -> x509.Certificate:
    issuer_cert, issuer_key = ca()
    subject_key = key or ec_key()
    return end_entity_builder(
        subject=simple_name("leaf.example.internal"), public_key=subject_key.public_key(),
        issuer_cert=issuer_cert, issuer_key=issuer_key,
        not_before=NOW, not_after=inclusive_not_after(NOW, dt.timedelta(days=1)),
        sans=[x509.DNSName("leaf.example.internal")],
        key_usage=x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False,
        ),
        ekus=("1.3.6.1.5.5.7.3.2",), extra=extra,
    ).serial_number(serial).sign(issuer_key, signature_hash(issuer_key))


# --- serials --------------------------------------------------------------------------------


def _der_length(data: bytes, offset: int) -> tuple[int, int]:
    """(length, offset of the content) of the DER TLV whose length octets start at ``offset``."""
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    count = first & 0x7F
    return int.from_bytes(data[offset + 1:offset + 1 + count], "big"), offset + 1 + count


def serial_octets(cert: x509.Certificate) -> bytes:
    """The content octets of the serialNumber INTEGER, read from the TBSCertificate's DER."""
    tbs = cert.tbs_certificate_bytes
    assert tbs[0] == 0x30
    _, pos = _der_length(tbs, 1)
    if tbs[pos] == 0xA0:  # [0] EXPLICIT version
        length, content = _der_length(tbs, pos + 1)
        pos = content + length
    assert tbs[pos] == 0x02, "serialNumber must be an INTEGER"
    length, content = _der_length(tbs, pos + 1)
    return tbs[content:content + length]


def der_integer_octets(value: int) -> bytes:
    """Minimal two's-complement encoding of a non-negative INTEGER, as DER requires."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def test_random_serials_are_in_bounds_and_distinct() -> None:
    serials = [random_serial() for _ in range(2000)]
    assert all(MIN_SERIAL <= s < 2**159 for s in serials)
    assert min(serials) >= 2**64
    assert len(set(serials)) == len(serials)
    # ~159 bits in practice: the top bits are used
    assert max(s.bit_length() for s in serials) == 159


def test_serial_in_a_built_certificate_is_at_most_20_octets_and_positive() -> None:
    for _ in range(20):
        serial = random_serial()
        cert = end_entity(serial)
        assert cert.serial_number == serial
        assert 0 < cert.serial_number.bit_length() <= 159
        octets = serial_octets(cert)
        assert 1 <= len(octets) <= 20
        assert octets[0] < 0x80  # positive
        assert octets == der_integer_octets(serial)
        assert int.from_bytes(octets, "big") == serial


def test_largest_possible_serial_fits_20_octets() -> None:
    largest = 2**159 - 1
    assert len(der_integer_octets(largest)) == 20
    assert len(der_integer_octets(2**159)) == 21  # which is why 159 bits is the bound
    assert serial_octets(end_entity(largest)) == der_integer_octets(largest)


@SETTINGS
@given(st.lists(st.integers(min_value=0, max_value=2**159 - 1), min_size=1, max_size=5))
def test_random_serial_rejects_small_draws(draws: list[int]) -> None:
    """Whatever the CSPRNG returns, the result is the first draw that is >= 2**64."""
    sequence = [*draws, MIN_SERIAL + 12345]
    calls: Iterator[int] = iter(sequence)

    def fake_randbits(bits: int) -> int:
        assert bits == build.SERIAL_BITS
        return next(calls)

    with mock.patch.object(secrets, "randbits", fake_randbits):
        serial = random_serial()
    assert serial == next(s for s in sequence if s >= MIN_SERIAL)
    assert MIN_SERIAL <= serial < 2**159


def test_ca_certificate_serial_is_random_and_bounded() -> None:
    cert, _ = ca()
    assert MIN_SERIAL <= cert.serial_number < 2**159
    assert len(serial_octets(cert)) <= 20


# --- validity -------------------------------------------------------------------------------


def test_inclusive_not_after_for_one_day() -> None:
    not_before = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert inclusive_not_after(not_before, dt.timedelta(days=1)) == dt.datetime(
        2030, 1, 1, 23, 59, 59, tzinfo=dt.UTC
    )


def test_built_certificate_carries_the_inclusive_window() -> None:
    cert = end_entity(random_serial())
    assert cert.not_valid_before_utc == NOW
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=1) - dt.timedelta(seconds=1)


@SETTINGS
@given(
    st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1),
                 timezones=st.just(dt.UTC)),
    st.integers(min_value=2, max_value=100 * 365 * 86400),
)
def test_inclusive_not_after_property(not_before: dt.datetime, seconds: int) -> None:
    validity = dt.timedelta(seconds=seconds)
    not_after = inclusive_not_after(not_before, validity)
    assert not_after > not_before
    assert not_after - not_before == validity - dt.timedelta(seconds=1)
    assert not_after.tzinfo is not None


# --- key rules ------------------------------------------------------------------------------

ALL = ("ec-p256", "ec-p384", "ec-p521", "rsa")


def rsa_public(bits: int) -> rsa.RSAPublicKey:
    return rsa_key(bits).public_key()


@functools.cache
def rsa_1024() -> rsa.RSAPublicKey:
    # deliberately weak: the key rules must refuse it
    return rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()  # noqa: S505


def rsa_e3() -> rsa.RSAPublicKey:
    modulus = rsa_public(2048).public_numbers().n
    return rsa.RSAPublicNumbers(3, modulus).public_key()


def rsa_odd_size() -> rsa.RSAPublicKey:
    modulus = secrets.randbits(2052) | (1 << 2051) | 1
    return rsa.RSAPublicNumbers(65537, modulus).public_key()


KEY_CASES: list[tuple[str, object, tuple[str, ...], bool]] = [
    ("rsa-1024", "rsa1024", ALL, False),
    ("rsa-2048", "rsa2048", ALL, True),
    ("rsa-3072", "rsa3072", ALL, True),
    ("rsa-4096", "rsa4096", ALL, True),
    ("rsa e=3", "rsa_e3", ALL, False),
    ("rsa 2052 bits (not a multiple of 8)", "rsa_odd", ALL, False),
    ("ec-p256", "secp256r1", ALL, True),
    ("ec-p384", "secp384r1", ALL, True),
    ("ec-p521", "secp521r1", ALL, True),
    ("secp256k1", "secp256k1", (*ALL, "ec"), False),
    ("ed25519", "ed25519", (*ALL, "ec", "rsa"), False),
    # template families and specific specs
    ("rsa-3072 under the rsa family", "rsa3072", ("rsa",), True),
    ("rsa-3072 when only rsa-2048 is allowed", "rsa3072", ("rsa-2048",), False),
    ("rsa-2048 when rsa-2048 is allowed", "rsa2048", ("rsa-2048",), True),
    ("rsa-4096 when rsa-2048/3072 are allowed", "rsa4096", ("rsa-2048", "rsa-3072"), False),
    ("rsa-2048 on an EC-only template", "rsa2048", ("ec-p256", "ec-p384"), False),
    ("ec-p384 when only ec-p256 is allowed", "secp384r1", ("ec-p256",), False),
    ("ec-p521 under the ec family", "secp521r1", ("ec",), True),
    ("ec-p256 on an RSA-only template", "secp256r1", ("rsa",), False),
    ("rsa-1024 even under the rsa family", "rsa1024", ("rsa", "rsa-2048"), False),
    ("rsa e=3 even when rsa-2048 is allowed", "rsa_e3", ("rsa-2048",), False),
]


def public_key_for(label: object) -> object:
    match label:
        case "rsa1024":
            return rsa_1024()
        case "rsa2048":
            return rsa_public(2048)
        case "rsa3072":
            return rsa_public(3072)
        case "rsa4096":
            return rsa_public(4096)
        case "rsa_e3":
            return rsa_e3()
        case "rsa_odd":
            return rsa_odd_size()
        case "ed25519":
            return ed25519.Ed25519PrivateKey.generate().public_key()
        case str(curve):
            return ec_key(curve).public_key()
    raise AssertionError(label)


@pytest.mark.parametrize(("key_label", "allowed", "ok"), [c[1:] for c in KEY_CASES],
                         ids=[c[0] for c in KEY_CASES])
def test_check_public_key(key_label: str, allowed: tuple[str, ...], ok: bool) -> None:
    key = public_key_for(key_label)
    if ok:
        assert check_public_key(key, allowed) is key
    else:
        with pytest.raises(Refusal) as info:
            check_public_key(key, allowed)
        assert info.value.reason is Reason.KEY_NOT_ALLOWED


def test_key_refusals_say_why() -> None:
    with pytest.raises(Refusal, match="1024"):
        check_public_key(rsa_1024(), ALL)
    with pytest.raises(Refusal, match="exponent"):
        check_public_key(rsa_e3(), ALL)
    with pytest.raises(Refusal, match="secp256k1"):
        check_public_key(ec_key("secp256k1").public_key(), ALL)
    with pytest.raises(Refusal, match="rsa-3072"):
        check_public_key(rsa_public(3072), ("rsa-2048",))


@pytest.mark.parametrize(("label", "spec"), [
    ("secp256r1", "ec-p256"), ("secp384r1", "ec-p384"), ("secp521r1", "ec-p521"),
    ("secp256k1", "ec-secp256k1"), ("rsa2048", "rsa-2048"), ("rsa3072", "rsa-3072"),
])
def test_describe_public_key(label: str, spec: str) -> None:
    assert describe_public_key(public_key_for(label)) == spec


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "wildcard", "expected"), [
    ("host.example.internal", False, True),
    ("localhost", False, True),
    ("a-b.c1.example", False, True),
    ("x" * 63 + ".example", False, True),
    ("x" * 64 + ".example", False, False),
    (".".join(["abcdefg"] * 32), False, False),  # 255 characters: too long
    ("", False, False),
    ("-lead.example", False, False),
    ("trail-.example", False, False),
    ("under_score.example", False, False),
    ("double..dot", False, False),
    ("trailing.dot.", False, False),
    ("has space.example", False, False),
    ("*.example.internal", True, True),
    ("*.example.internal", False, False),
    ("*.com", True, False),
    ("*", True, False),
    ("a.*.example", True, False),
    ("*.*.example.com", True, False),
])
def test_is_hostname(name: str, wildcard: bool, expected: bool) -> None:
    assert names.is_hostname(name, allow_wildcard=wildcard) is expected


def test_is_hostname_length_limit() -> None:
    at_limit = ".".join(["a" * 62] * 4) + ".x"  # 4*63 + 1 = 253
    assert len(at_limit) == 253
    assert names.is_hostname(at_limit, allow_wildcard=False)
    assert not names.is_hostname(at_limit + "x", allow_wildcard=False)


@pytest.mark.parametrize(("name", "allowed", "expected"), [
    # exact names
    ("localhost", ("localhost",), True),
    ("a.example.com", ("a.example.com",), True),
    ("b.example.com", ("a.example.com",), False),
    ("sub.a.example.com", ("a.example.com",), False),
    # .suffix: any name strictly below
    ("a.example.com", (".example.com",), True),
    ("deep.a.example.com", (".example.com",), True),
    ("example.com", (".example.com",), False),
    ("badexample.com", (".example.com",), False),
    ("example.com.evil", (".example.com",), False),
    # * allows anything
    ("anything.at.all", ("*",), True),
    ("*.anything", ("*",), True),
    # wildcards under a suffix
    ("*.example.com", (".example.com",), True),
    ("*.a.example.com", (".example.com",), True),
    ("*.com", (".example.com",), False),
    ("*.example.com", ("example.com",), False),
    ("*.example.com", ("a.example.com",), False),
    ("*.example.com", ("*.example.com",), True),
    # nothing allowed
    ("a.example.com", (), False),
    # several rules
    ("localhost", (".example.com", "localhost"), True),
])
def test_dns_name_matches(name: str, allowed: tuple[str, ...], expected: bool) -> None:
    assert names.dns_name_matches(name, allowed) is expected


@pytest.mark.parametrize(("value", "ranges", "expected"), [
    ("127.0.0.1", ("127.0.0.0/8",), True),
    ("10.1.2.3", ("127.0.0.0/8", "10.0.0.0/8"), True),
    ("11.0.0.1", ("127.0.0.0/8", "10.0.0.0/8"), False),
    ("::1", ("::1/128",), True),
    ("::2", ("::1/128",), False),
    ("::1", ("127.0.0.0/8",), False),  # families never match each other
    ("127.0.0.1", ("::/0",), False),
    ("192.0.2.7", ("192.0.2.7",), True),  # a bare address is a /32
    ("192.0.2.9", ("192.0.2.1/24",), True),  # host bits tolerated (strict=False)
    ("192.0.2.9", (), False),
])
def test_ip_in_ranges(value: str, ranges: tuple[str, ...], expected: bool) -> None:
    assert names.ip_in_ranges(value, ranges) is expected


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_dns = st.lists(_label, min_size=1, max_size=4).map(".".join)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)


@SETTINGS
@given(
    st.lists(_dns, max_size=4).map(tuple),
    st.lists(st.one_of(_ipv4, _ipv6), max_size=4).map(tuple),
    st.lists(st.emails(), max_size=3).map(tuple),
    st.lists(st.text(min_size=1, max_size=20), max_size=3).map(tuple),
)
def test_names_json_round_trip(
    dns: tuple[str, ...], ip: tuple[str, ...], email: tuple[str, ...], uri: tuple[str, ...]
) -> None:
    value = RequestedNames(dns=dns, ip=ip, email=email, uri=uri)
    assert names.names_from_json(names.names_to_json(value)) == value
    assert value.all() == (*dns, *ip, *email, *uri)


def test_names_json_omits_empty_kinds() -> None:
    assert names.names_to_json(RequestedNames()) == "{}"
    assert names.names_from_json("{}") == RequestedNames()
    assert names.names_to_json(RequestedNames(dns=("a.b",))) == '{"dns": ["a.b"]}'


def test_requested_names_and_general_names() -> None:
    key = ec_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(simple_name("www.example.internal"))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("WWW.Example.Internal"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
            x509.RFC822Name("ops@example.internal"),
            x509.UniformResourceIdentifier("https://example.internal/"),
        ]), critical=False)
        .sign(key, build.signature_hash(key))
    )
    requested = names.requested_names(csr)
    assert requested == RequestedNames(
        dns=("www.example.internal",), ip=("10.0.0.1",), email=("ops@example.internal",),
        uri=("https://example.internal/",),
    )
    general = names.to_general_names(requested)
    assert general[0] == x509.DNSName("www.example.internal")
    assert general[1] == x509.IPAddress(ipaddress.ip_address("10.0.0.1"))
    assert len(general) == 4


# --- signatures -----------------------------------------------------------------------------

SIGNERS = ["secp256r1", "secp384r1", "secp521r1", "rsa2048", "rsa3072"]


def private_key_for(label: str) -> PrivateKey:
    return rsa_key(int(label[3:])) if label.startswith("rsa") else ec_key(label)


@pytest.mark.parametrize("label", SIGNERS)
def test_sign_and_verify(label: str) -> None:
    key = private_key_for(label)
    data = b"the DER of a certificate signing request"
    signature = signing.sign_bytes(key, data)
    assert signing.verify_bytes(key.public_key(), signature, data)
    # tampered data
    assert signing.verify_bytes(key.public_key(), signature, data + b"!") is False
    # tampered signature
    flipped = bytes([signature[0] ^ 0x01]) + signature[1:]
    assert signing.verify_bytes(key.public_key(), flipped, data) is False
    assert signing.verify_bytes(key.public_key(), signature[:-1], data) is False
    assert signing.verify_bytes(key.public_key(), b"", data) is False
    assert signing.verify_bytes(key.public_key(), b"\x00" * 600, data) is False


@pytest.mark.parametrize(("signer", "verifier"), [
    ("secp256r1", "secp384r1"),
    ("secp384r1", "secp256r1"),
    ("rsa2048", "secp256r1"),
    ("secp256r1", "rsa2048"),
    ("rsa2048", "rsa3072"),
])
def test_wrong_key_returns_false(signer: str, verifier: str) -> None:
    data = b"payload"
    signature = signing.sign_bytes(private_key_for(signer), data)
    assert signing.verify_bytes(private_key_for(verifier).public_key(), signature, data) is False


def test_same_curve_other_key_returns_false() -> None:
    data = b"payload"
    signature = signing.sign_bytes(ec_key(), data)
    other = ec.generate_private_key(ec.SECP256R1())
    assert signing.verify_bytes(other.public_key(), signature, data) is False


def test_unsupported_public_keys_return_false() -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    signature = ed.sign(b"x")
    assert signing.verify_bytes(ed.public_key(), signature, b"x") is False
    assert signing.verify_bytes(None, b"sig", b"x") is False
    assert signing.verify_bytes("not a key", b"sig", b"x") is False


@SETTINGS
@given(st.binary(max_size=256), st.binary(min_size=1, max_size=256))
def test_verify_never_raises_on_garbage(data: bytes, signature: bytes) -> None:
    for label in ("secp256r1", "rsa2048"):
        assert signing.verify_bytes(private_key_for(label).public_key(), signature, data) is False


# --- certificate template information -------------------------------------------------------


def test_template_info_round_trip() -> None:
    info = template_info.TemplateInfo(oid=template_info.new_template_oid(), major=3, minor=7)
    cert = end_entity(random_serial(), extra=(template_info.encode(info),))
    assert template_info.decode(cert) == info
    ext = cert.extensions.get_extension_for_oid(template_info.TEMPLATE_INFO_OID)
    assert not ext.critical


@SETTINGS
@given(
    st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=6),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.integers(min_value=0, max_value=2**31 - 1),
)
def test_template_info_encode_decode_property(arcs: list[int], major: int, minor: int) -> None:
    info = template_info.TemplateInfo(oid="1.3." + ".".join(map(str, arcs)), major=major,
                                      minor=minor)
    extension = template_info.encode(info)
    # through a real certificate (parsed back by cryptography) ...
    built = end_entity(random_serial(), extra=(extension,))
    cert = x509.load_der_x509_certificate(built.public_bytes(serialization.Encoding.DER))
    assert template_info.decode(cert) == info

    # ... and through the raw DER value, as an unrecognised extension
    class _Holder:
        """Just enough of a certificate for ``decode``."""

        extensions = x509.Extensions([x509.Extension(extension.oid, False, extension)])

    assert template_info.decode(_Holder()) == info  # type: ignore[arg-type]


def test_new_template_oid_is_under_the_uuid_arc() -> None:
    first, second = template_info.new_template_oid(), template_info.new_template_oid()
    assert first.startswith("2.25.") and first != second
    x509.ObjectIdentifier(first)  # a valid OID


def test_template_info_absent_is_none() -> None:
    assert template_info.decode(end_entity(random_serial())) is None
    assert template_info.decode(ca()[0]) is None


def test_template_info_without_minor_version_decodes_minor_zero() -> None:
    # SEQUENCE { OID 1.2.3, INTEGER 5 }: the minor version is optional
    value = b"\x30\x07\x06\x02\x2a\x03\x02\x01\x05"
    ext = x509.UnrecognizedExtension(template_info.TEMPLATE_INFO_OID, value)
    cert = end_entity(random_serial(), extra=(ext,))
    assert template_info.decode(cert) == template_info.TemplateInfo("1.2.3", 5, 0)


def test_template_info_malformed_is_none() -> None:
    ext = x509.UnrecognizedExtension(template_info.TEMPLATE_INFO_OID, b"\x30\x03\x02\x01\x01")
    assert template_info.decode(end_entity(random_serial(), extra=(ext,))) is None


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1y", dt.timedelta(days=365)),
    ("365d", dt.timedelta(days=365)),
    ("6w", dt.timedelta(weeks=6)),
    ("1d12h", dt.timedelta(hours=36)),
    ("1d 12h", dt.timedelta(hours=36)),
    ("8h", dt.timedelta(hours=8)),
    ("90s", dt.timedelta(seconds=90)),
    ("5m", dt.timedelta(minutes=5)),
    ("2W", dt.timedelta(weeks=2)),
    ("1y1w1d1h1m1s", dt.timedelta(days=373, hours=1, minutes=1, seconds=1)),
    (3600, dt.timedelta(hours=1)),
])
def test_parse_duration(text: str | int, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", [
    "", " ", "d", "1", "1.5d", "-1d", "1q", "1d1", "d1", "0s", "0d0h", "1 d x", "1dd", 0, -5,
    True, None, 1.5,
])
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(Refusal) as info:
        parse_duration(text)  # type: ignore[arg-type]
    assert info.value.reason is Reason.INVALID_ARGUMENT


@pytest.mark.parametrize(("delta", "text"), [
    (dt.timedelta(days=365), "365d"),
    (dt.timedelta(weeks=6), "6w"),
    (dt.timedelta(days=7), "1w"),
    (dt.timedelta(hours=36), "36h"),
    (dt.timedelta(seconds=90), "90s"),
    (dt.timedelta(minutes=2), "2m"),
    (dt.timedelta(seconds=1), "1s"),
])
def test_format_duration(delta: dt.timedelta, text: str) -> None:
    assert format_duration(delta) == text


@SETTINGS
@given(st.integers(min_value=1, max_value=200 * 365 * 86400))
def test_duration_round_trip(seconds: int) -> None:
    delta = dt.timedelta(seconds=seconds)
    text = format_duration(delta)
    assert parse_duration(text) == delta
    assert parse_duration(seconds) == delta

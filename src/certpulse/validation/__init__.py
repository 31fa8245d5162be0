"""ACME challenge validation (RFC 8555 section 8, RFC 8737): the part trusted to connect out.

Like Boulder's validation authority, this is the only part of certpulse that makes outbound
connections to the names being validated. It holds no state and no database: given a challenge
(type, identifier, token, key authorization) and settings (ports, resolver, timeout), it
answers valid or a typed failure. The front end runs it off the event loop and hands the
outcome to the CA core.
"""

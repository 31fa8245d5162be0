"""The enrollment service's core: templates, request policy, issuance, revocation. No HTTP here."""

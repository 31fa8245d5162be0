"""Pure X.509 and key helpers over ``cryptography``: no I/O beyond what a caller passes in."""

"""Rebind: renewed certificates reach the services that use them, and a probe proves it.

``bindings`` records which consumer uses which certificate; ``deployers`` put a certificate in
place for one kind of consumer (files, nginx, haproxy, a command; others through entry points);
``probe`` asks a TLS endpoint what it serves; ``engine`` moves bindings on replacement (1001),
rolls back what does not take, and runs the drift check.
"""

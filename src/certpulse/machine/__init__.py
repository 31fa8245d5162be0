"""The machine-local side of certpulse: what this machine holds and what happened to it.

One SQLite database (``meta.db``, :mod:`.schema`, migrated by :mod:`.db`) beside the certificate
folders, shared by the three parts that work on a machine:

* :mod:`.certstore`: the certificate store: versions on disk, live links, flights (requests at
  the CA), and every change with its lifecycle event in one transaction;
* :mod:`.events`, :mod:`.log`, :mod:`.cursors`, :mod:`.syslog`: what an event is, the append-only
  log, each consumer's place in it, and forwarding to syslog;
* :mod:`.current`: the one rule for "the current certificate of a template";
* :mod:`.locks`: who may work on the store now.

The agent (enrollment), ``events`` (notification tasks) and ``rebind`` all build on this package
and on none of each other; only the daemon and the command line put them together.
"""

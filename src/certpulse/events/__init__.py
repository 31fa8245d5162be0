"""Lifecycle events (the seed's CertificateServicesClient-Lifecycle logs) and notification tasks.

``model`` says what an event is, ``log`` appends and reads them (inside the store's own
transaction), ``commands`` checks and runs a task's command safely, ``tasks`` delivers events to
tasks at least once, in order, with a durable cursor per task.
"""

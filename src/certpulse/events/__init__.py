"""Notification tasks: the seed's New-CertificateNotificationTask.

``tasks`` registers the commands operators want run for lifecycle events and delivers the
machine's events (:mod:`certpulse.machine.log`) to them at least once, in order, each task from
its own durable cursor (:mod:`certpulse.machine.cursors`); the commands run through
:mod:`certpulse.sandbox`.
"""

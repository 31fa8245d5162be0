"""certpulse: certificate autoenrollment, lifecycle notifications and rebind for any machine."""

__version__ = "0.1.0"

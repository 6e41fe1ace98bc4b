"""The error a user's settings raise when they cannot work; shared by the policy and the correctors it carries."""


class PolicyError(ValueError):
    """A setting the user chose that cannot work; the message says which and how to fix it."""

"""Security: envelope encryption of artifacts (crypto); API keys, rate limits and anomaly detection follow (DESIGN.md §1)."""

from dynray.security.crypto import Keyring, MasterKey, generate_master_key

__all__ = ["Keyring", "MasterKey", "generate_master_key"]

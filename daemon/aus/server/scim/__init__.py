"""SCIM 2.0 (RFC 7643/7644) as Microsoft Entra ID's provisioning service uses it."""

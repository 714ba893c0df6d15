"""aus-server: the policy server.

Microsoft Entra ID pushes users and groups over SCIM 2.0 (``scim/``); an
administrator writes rules whose sources are those groups (``api.py``);
every ``ausd`` long-polls a versioned bundle of the rules, the groups they
name and those groups' members (``bundle.py``). State lives in SQLite or
PostgreSQL through SQLAlchemy (``db.py``, migrations in ``migrations/``).
"""

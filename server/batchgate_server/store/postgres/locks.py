"""Advisory lock keys (pg_advisory_lock(NAMESPACE, key)): one namespace for batchgate, so its
locks cannot collide with another application's on a shared database. Add new keys here."""

NAMESPACE = 0x62617463  # "batc"
MIGRATIONS = 1  # held while one server migrates the schema (the others wait)
LEDGER = 2  # held from a ledger row's insert to its commit: rows commit in the order of their seq
# A namespace of its own for per-project quota locks, pg_advisory_xact_lock(QUOTAS, hashtext(project)):
# held from a limited insert to its commit. Two projects whose names hash alike merely take turns.
QUOTAS = 0x62617471  # "batq"

"""prunehub's service core: settings, database, use cases (``services``) and the HTTP API (``api``)."""

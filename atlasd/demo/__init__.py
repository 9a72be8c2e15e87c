"""`atlasd demo`: the whole loop on this machine with a throw-away Postgres, MLflow on sqlite and
small offline models (see README, "The demo")."""

"""Protocol frontends over the CA core. Only here do HTTP status codes exist."""

"""The agent: keeps a machine's certificates enrolled and renewed. It never imports the CA."""
